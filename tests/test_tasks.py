"""Every task spec loads its real data with the right splits, labels and inputs."""
import pytest

from peftbench.data.encode import tokenize
from peftbench.data.preprocessors import mark_wsc_spans
from peftbench.data.tasks import available_tasks, load_task

# Record counts of Fu et al.'s splits (tasks/data/PROVENANCE.md): train, val, test.
SIZES = {"cb": (225, 25, 56), "cola": (7695, 856, 1043), "copa": (360, 40, 100),
         "mrpc": (3294, 374, 408), "rte": (2241, 249, 277), "stsb": (5166, 583, 1500),
         "wsc": (495, 59, 104)}
# The CPU leaderboards' SST-2: a seeded sample of GLUE train, test = GLUE dev.
OTHER_SIZES = {"sst2": (4000, 872, 872)}


def test_the_seven_tasks_of_fu_table1_exist():
    assert set(SIZES) <= set(available_tasks())


@pytest.mark.parametrize("name", sorted(SIZES) + sorted(OTHER_SIZES))
def test_splits_and_labels(name):
    task = load_task(name)
    splits = task.load_splits()
    assert tuple(len(splits[s]) for s in ("train", "validation", "test")) == {**SIZES, **OTHER_SIZES}[name]
    for split in splits.values():
        ids = [task.label_id(v) for v in split["label"]]
        if task.kind == "regression":
            assert min(ids) >= 0 and max(ids) <= 5
        else:
            assert set(ids) <= set(range(max(task.num_labels, len(task.choices))))


@pytest.mark.parametrize("name, shape", [("rte", 2), ("copa", 3), ("stsb", 2), ("wsc", 2)])
def test_tokenized_batches(name, shape, tiny_model):
    from peftbench.training.trainer import make_loader

    _, tokenizer = tiny_model
    task = load_task(name)
    data = tokenize(task, tokenizer, task.load_splits(limit=8), 64)
    batch = next(iter(make_loader(data["train"], tokenizer, task, 4, False, 0)))
    assert batch["input_ids"].dim() == shape
    assert batch["labels"].shape == (4,)
    if name == "copa":
        assert batch["input_ids"].shape[1] == 2  # two choices


def test_main_metrics_follow_jiant():
    assert load_task("mrpc").main_metric == ["accuracy", "f1"]
    assert load_task("stsb").main_metric == ["pearson", "spearman"]
    assert load_task("cb").main_metric == ["accuracy", "macro_f1"]
    assert load_task("cola").main_metric == ["mcc"]


def test_wsc_marks_both_spans():
    row = {"text": "The sculpture rolled off the shelf because it wasn't anchored.",
           "target": {"span1_index": 0, "span1_text": "The sculpture", "span2_index": 7,
                      "span2_text": "it"}}
    assert mark_wsc_spans(row)["text"] == \
        "* The sculpture * rolled off the shelf because # it # wasn't anchored."


def test_wsc_spans_point_at_their_words():
    task = load_task("wsc")
    for row in task.load_splits()["train"].select(range(100)):
        assert "* " in row["text"] and "# " in row["text"]


def test_copa_context_names_the_question():
    task = load_task("copa")
    row = task.load_splits(limit=1)["train"][0]
    (context, choice1), (_, choice2) = task.choice_inputs(row)
    assert row["question"] in context and choice1 == row["choice1"] and choice2 == row["choice2"]


def test_extra_task_folder_from_environment(tmp_path, monkeypatch):
    spec = load_task("rte").path.read_text().replace("name: rte", "name: myrte")
    spec = spec.replace("data/", str(load_task("rte").path.parent / "data") + "/")
    (tmp_path / "myrte.yaml").write_text(spec)
    monkeypatch.setenv("PEFTBENCH_TASKS_PATH", str(tmp_path))
    assert load_task("myrte").name == "myrte"


def test_every_wsc_span_is_marked_around_its_own_words():
    """Splitting on spaces and trusting every index misaligned 4 of 1,316 spans."""
    import json

    from peftbench.data.preprocessors import _norm, mark_wsc_spans, wsc_span_start
    from peftbench.data.tasks import load_task

    task = load_task("wsc")
    checked = 0
    for path in task.data_files()[1:]:
        for line in open(path):
            row = json.loads(line)
            words, target = row["text"].split(), row["target"]
            for key in ("span1", "span2"):
                span = target[f"{key}_text"].split()
                start = wsc_span_start(words, target[f"{key}_index"], span)
                assert [_norm(w) for w in words[start:start + len(span)]] == [_norm(w) for w in span]
                checked += 1
            marked = mark_wsc_spans(row)["text"].split()
            assert marked.count("*") == 2 and marked.count("#") == 2
    assert checked == 1316


def test_sst2_test_is_glue_dev_and_shares_no_text_with_training():
    splits = load_task("sst2").load_splits()
    test = set(splits["test"]["text"])
    assert not test & (set(splits["train"]["text"]) | set(splits["validation"]["text"]))
    assert sum(v == "1" for v in splits["test"]["label"]) == 444  # GLUE dev: 444 positive of 872


def _classification(tmp_path, labels, rows, kind="classification", **extra):
    import json

    import yaml

    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "t", "kind": kind, "data": {"files": {s: f"{s}.jsonl" for s in ("train", "validation", "test")}},
            "metrics": ["accuracy"] if kind != "regression" else ["pearson"], **extra}
    if labels is not None:
        spec["labels"] = labels
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "t.yaml")


def test_labels_of_mixed_types_are_refused(tmp_path):
    """1 == True in Python: labels [1, true] would be one class."""
    from peftbench.core.errors import UsageError
    from peftbench.data.tasks import load_task

    with pytest.raises(UsageError, match="mix bool and int"):
        load_task(_classification(tmp_path, [1, True], [{"text": "a", "label": 1}], text=["text"]))
    task = load_task(_classification(tmp_path, [0, 1], [{"text": "a", "label": 1}], text=["text"]))
    with pytest.raises(UsageError, match="label True is not in the spec's labels"):
        task.label_id(True)


def test_regression_labels_beyond_a_sane_range_are_refused(tmp_path):
    from peftbench.core.errors import UsageError
    from peftbench.data.tasks import load_task

    task = load_task(_classification(tmp_path, None, [{"text": "a", "label": 1.7e308}], kind="regression",
                                     text=["text"]))
    with pytest.raises(UsageError, match="within \\+-1e\\+06"):
        task.load_splits()


def test_an_empty_multiple_choice_option_is_refused(tmp_path):
    from peftbench.core.errors import UsageError
    from peftbench.data.tasks import load_task

    task = load_task(_classification(tmp_path, None, [{"q": "x", "a": "yes", "b": "", "label": 0}],
                                     kind="multiple_choice", context="q", choices=["a", "b"]))
    with pytest.raises(UsageError, match="choice 1 is empty"):
        task.load_splits()

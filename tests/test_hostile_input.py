"""Hostile input: a crafted file, folder, storage or spec is refused by name before anything is
written, lost or executed. Each case is one test or one row of a table, named by what it does."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_line_error

from peftbench.analysis import frame, overlap
from peftbench.board import paths
from peftbench.cli import main as cli_main
from peftbench.cli.main import main
from peftbench.sweep import grid, search, storage
from peftbench.sweep import records as sweep_records
from peftbench.sweep import spec as sweep_spec
from peftbench.training import experiment


class _Payload:
    """Unpickling this runs `touch <flag>`: what a crafted .pt file could do."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def _crafted(path: Path, flag: Path) -> Path:
    torch.save({"scores": _Payload(flag), "seconds": 1.0, "about": {}}, path)
    return path


# --- data loss -------------------------------------------------------------------------------

def test_cache_clear_on_a_folder_that_is_not_a_cache_deletes_nothing(capsys, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("model.pt", "run.lock", "half.tmp"):
        (folder / name).write_bytes(b"precious")
    msg = one_line_error(capsys, "cache", "clear", str(folder))
    assert "is not a peftbench score-cache folder" in msg and "e.g. 'half.tmp'" in msg
    assert sorted(p.name for p in folder.iterdir()) == ["half.tmp", "model.pt", "run.lock"]


def test_cache_clear_removes_only_the_caches_own_files(capsys, tmp_path):
    from peftbench.training.cache import ScoreCache

    cache = ScoreCache(tmp_path / "scores")  # made and marked by peftbench
    cache.get_or_compute("a" * 64, lambda: {"w": torch.ones(2)})
    (tmp_path / "scores" / "notes.pt").write_bytes(b"mine")  # a user's file put there later
    assert main(["cache", "clear", str(tmp_path / "scores")]) == 0
    assert "removed 1 cached score files" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == [".peftbench", "notes.pt"]


def test_a_cache_from_before_markers_is_still_recognised(tmp_path):
    from peftbench.training.cache import ScoreCache

    old = tmp_path / "scores"
    old.mkdir()
    torch.save({"scores": {"w": torch.ones(1)}, "seconds": 0.5, "about": {}}, old / f"{'b' * 64}.pt")
    assert ScoreCache(old, create=False).clear() == 1


def test_a_board_given_as_a_path_never_writes_the_folder_above_it(tmp_path, monkeypatch):

    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    users = tmp_path / "some" / "path"
    (users / "board").mkdir(parents=True)
    assert paths.shared_root(users / "board") is None
    (tmp_path / "boards" / "b").mkdir(parents=True)
    assert paths.shared_root(tmp_path / "boards" / "b") == (tmp_path / "boards").resolve()
    repository = Path(__file__).resolve().parents[1] / "leaderboards"
    assert paths.shared_root(repository / "quickstart-sst2") == repository  # marked


@pytest.mark.parametrize("mine", ["README.md", "index.html"])
@pytest.mark.parametrize("command", ["run", "report"])
def test_a_spec_in_a_folder_of_the_users_files_never_overwrites_them(capsys, tmp_path, tiny_model_dir, mine,
                                                                      command):
    """`leaderboard run ./myproject`: a folder holding a spec beside the user's own README.md or
    index.html (files every board command rewrites) is refused, the files untouched."""
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "spec.yaml").write_text(yaml.safe_dump({
        "name": "p", "model": tiny_model_dir, "tasks": ["rte"], "methods": {"random": {}}, "budgets": [0.01],
        "seeds": 1, "limit": 8, "train": {"epochs": 1}, "output_dir": str(tmp_path / "out")}))
    (project / mine).write_text("my own notes\n")
    assert f"{mine} was not written by peftbench" in one_line_error(capsys, "leaderboard", command, str(project))
    assert (project / mine).read_text() == "my own notes\n" and sorted(p.name for p in project.iterdir()) == [
        mine, "spec.yaml"]


def _journal_spec(tmp_path, model):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "model": model, "tasks": ["rte"], "methods": {"random": {}}, "budgets": [0.01],
        "seeds": 1, "limit": 8, "train": {"epochs": 1}, "output_dir": str(tmp_path / "out"),
        "storage": f"journal:{tmp_path}/study.log"}))
    return path


def test_status_on_a_journal_with_a_cut_last_line_leaves_it_as_it_was(capsys, tmp_path, tiny_model_dir):

    spec_path = _journal_spec(tmp_path, tiny_model_dir)
    spec = sweep_spec.load_spec(spec_path)
    grid.enqueue_missing(storage.open_study(spec), spec)
    journal = tmp_path / "study.log"
    journal.write_bytes(journal.read_bytes()[:-7])  # a crash mid-write
    before = journal.read_bytes()
    msg = one_line_error(capsys, "status", str(spec_path))
    assert "the journal's last line is cut" in msg
    assert journal.read_bytes() == before


def test_status_before_a_study_starts_writes_nothing(capsys, tmp_path, tiny_model_dir):
    spec_path = _journal_spec(tmp_path, tiny_model_dir)
    assert main(["status", str(spec_path)]) == 0
    assert "0/1 cells done; study 't' not started" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_sweep_into_a_folder_of_someone_elses_files_is_refused(capsys, tmp_path, tiny_model_dir):
    spec_path = _journal_spec(tmp_path, tiny_model_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    assert "holds files peftbench did not write (e.g. 'thesis.tex')" in one_line_error(
        capsys, "sweep", str(spec_path))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["thesis.tex"]


def test_report_out_on_a_file_is_refused_before_writing(capsys, tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("precious")
    runs = tmp_path / "runs"
    runs.mkdir()
    msg = one_line_error(capsys, "report", "--runs", str(runs), "--out", str(target))
    assert target.read_text() == "precious" and "is a file, not a folder" in msg


# --- code execution --------------------------------------------------------------------------

def test_cache_list_never_runs_code_from_a_crafted_file(capsys, tmp_path):
    from peftbench.training.cache import ScoreCache

    cache = ScoreCache(tmp_path / "scores")
    flag = tmp_path / "pwned"
    _crafted(cache.path("c" * 64), flag)
    assert main(["cache", "list", str(tmp_path / "scores")]) == 0
    assert "[unreadable]" in capsys.readouterr().out
    assert not flag.exists()


def test_the_score_cache_recomputes_a_crafted_entry_instead_of_running_it(tmp_path, capsys):
    from peftbench.training.cache import ScoreCache

    cache = ScoreCache(tmp_path / "scores")
    flag = tmp_path / "pwned"
    _crafted(cache.path("d" * 64), flag)
    scores, _, cached, _ = cache.get_or_compute("d" * 64, lambda: {"w": torch.zeros(3)})
    assert not cached and torch.equal(scores["w"], torch.zeros(3)) and not flag.exists()


def test_report_reads_masks_without_running_code(tmp_path):
    from peftbench.core.safeload import UnsafeFile

    (tmp_path / "seed-0").mkdir()
    flag = tmp_path / "pwned"
    torch.save(_Payload(flag), tmp_path / "seed-0" / "mask.pt")
    with pytest.raises(UnsafeFile, match="not a plain tensor file"):
        overlap._mask(str(tmp_path), 0)
    assert not flag.exists()


def test_nothing_peftbench_reads_back_uses_unsafe_loading():
    """The one safe loader is the only torch.load in the package."""
    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for folder in ("peftbench", "methods")
                 for p in (root / folder).rglob("*.py")
                 if "torch.load(" in p.read_text() and p.name != "safeload.py"]
    assert offenders == []


# --- task files: checked where they enter, before anything is written -------------------------

def _small_task(tmp_path, name: str, edit) -> str:
    """A copy of a built-in task with a 20-row train file; `edit(spec_path, train_path)` breaks it."""
    from conftest import copy_task

    path = Path(copy_task(tmp_path, name))
    text = path.read_text()
    source = text.split("train: ")[1].split("\n")[0]
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"".join(Path(source).read_bytes().splitlines(keepends=True)[:20]))
    path.write_text(text.replace(source, str(train)))
    edit(path, train)
    return str(path)


def _replace(old: str, new: str):
    return lambda spec, train: spec.write_text(spec.read_text().replace(old, new, 1))


def _first_label(value: str):
    def edit(spec, train):
        lines = train.read_text().splitlines()
        row = json.loads(lines[0])
        lines[0] = json.dumps({**row, "label": 123.25}).replace("123.25", value, 1)
        train.write_text("\n".join(lines) + "\n")
    return edit


TASK_CASES = {
    "duplicated label": ("rte", _replace("labels: [entailment, not_entailment]",
                                         "labels: [entailment, not_entailment, entailment]"),
                         "label 'entailment' is listed twice"),
    "third text field": ("rte", _replace("text: [premise, hypothesis]", "text: [premise, hypothesis, premise]"),
                         "text names 3 fields"),
    "accuracy on a regression task": ("stsb", _replace("metrics: [pearson, spearman]", "metrics: [accuracy]"),
                                      "metric 'accuracy' cannot score a regression task: allowed pearson, spearman"),
    "main metric not in metrics": ("stsb", _replace("metrics: [pearson, spearman]", "metrics: [pearson]"),
                                   "main_metric 'spearman' is not in metrics ['pearson']"),
    "f1 on three classes": ("cb", _replace("metrics: [accuracy, macro_f1]", "metrics: [accuracy, macro_f1, f1]"),
                            "metric 'f1' needs two classes"),
    "NaN regression label": ("stsb", _first_label("NaN"), "regression label nan is not a finite number"),
    "Infinity regression label": ("stsb", _first_label("Infinity"), "regression label inf is not a finite number"),
    "task name with ../": ("rte", _replace("name: rte", "name: ../../escaped"), "is not file-safe"),
    "invalid UTF-8 in a data file": ("rte", lambda spec, train: train.write_bytes(
        train.read_bytes().replace(b"a", b"\xff", 1)), "train.jsonl:1: not UTF-8 text (byte 0xff)"),
    "invalid UTF-8 in the task YAML": ("rte", lambda spec, train: spec.write_bytes(
        spec.read_bytes().replace(b"Recognising", b"Recogn\xe9sing", 1)), "not UTF-8 text (byte 0xe9)"),
    # bounded work: small input that would cost minutes or gigabytes
    "a YAML alias bomb": ("rte", lambda spec, train: spec.write_text(spec.read_text().replace(
        "name: rte", "name: rte\nlaughs: " + "".join(f"\n  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'x'}]"
                                                   for i in range(9)), 1)),
        "once its aliases (*name) are expanded; at most 100,000"),
    "a template that pads each row to 400 MB": ("rte", _replace("text: [premise, hypothesis]",
                                                                 "text: ['{premise:>400000000}', hypothesis]"),
                                                "formats a field ({premise:>400000000})"),
}


@pytest.mark.parametrize("case", sorted(TASK_CASES))
def test_bad_task_files_are_refused_before_anything_is_written(capsys, tmp_path, tiny_model_dir, case):
    name, edit, expected = TASK_CASES[case]
    task = _small_task(tmp_path, name, edit)
    msg = one_line_error(capsys, "run", "--method", "random", "--task", task, "--model",
                         tiny_model_dir, "--quiet", "--output-dir", str(tmp_path / "runs"))
    assert expected in msg
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escaped").exists()


# --- wrong numbers with exit 0 -----------------------------------------------------------------

def test_a_one_step_run_trains_at_its_learning_rate():
    """HF's warm-up starts at rate 0: held to steps - 1, a one-step run is not a no-op."""
    from transformers import get_linear_schedule_with_warmup

    from peftbench.training.trainer import warmup_steps

    assert warmup_steps(0.1, 1) == 0 and warmup_steps(0.1, 150) == 15 and warmup_steps(0.5, 2) == 1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.9)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps(0.1, 1), 1)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.9)


def test_a_model_folder_without_tokenizer_files_is_refused(capsys, tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model_dir) / name, folder / name)
    msg = one_line_error(capsys, "run", "--method", "random", "--task", "rte", "--model", str(folder),
                         "--quiet", "--output-dir", str(tmp_path / "runs"))
    assert "has no tokenizer files" in msg and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device", ["mps", "meta", "cuda:7"])
def test_unsupported_devices_are_refused(capsys, tmp_path, tiny_model_dir, device):
    msg = one_line_error(capsys, "run", "--method", "random", "--task", "rte", "--model", tiny_model_dir,
                         "--device", device, "--quiet", "--output-dir", str(tmp_path / "runs"))
    assert f"device {device!r}" in msg and "allowed auto, cpu" in msg or "not available" in msg


@pytest.mark.slow
def test_task_data_edited_during_a_sweep_is_not_recorded_under_the_old_fingerprint(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):

    task = _small_task(tmp_path, "rte", lambda spec, train: None)
    train = tmp_path / "train.jsonl"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "model": tiny_model_dir, "tasks": [task], "methods": {"random": {}},
        "budgets": [0.01], "seeds": 2, "limit": 8, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "out")}))
    spec = sweep_spec.load_spec(path)
    real = experiment.run_experiment

    def edit_after_the_first(config, **kw):
        out = real(config, **kw)
        train.write_text("\n".join(train.read_text().splitlines()[:-1]) + "\n")  # one row fewer
        return out

    monkeypatch.setattr(experiment, "run_experiment", edit_after_the_first)
    study = grid.run_grid(spec, log=lambda *a: None)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "FAIL"]
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "data files changed since this sweep started" in failed.user_attrs["failure"]


def test_a_cut_search_json_is_one_line(capsys, tmp_path, tiny_model_dir):
    from peftbench.core.errors import UsageError

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": tiny_model_dir, "tasks": ["rte"],
                                    "methods": {"random": {}}, "budgets": [0.01], "seeds": 1,
                                    "output_dir": str(tmp_path / "out")}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "search.json").write_text('{"rte/random": {"train": {"lr"')
    with pytest.raises(UsageError, match="search.json is not valid JSON"):
        sweep_records.best_search_params(sweep_spec.load_spec(path))


@pytest.mark.parametrize("text, message", [
    ('{"cb/random": [{"params": {"lr"', r"search-trials.json is not valid JSON .* remove it to train its trials again"),
    ('{"cb/random": {"lr": 0.01}}', r"search-trials.json is not a trial log \(\{key: \[trial, ...\]\}\)"),
])
def test_a_damaged_trial_log_is_one_line_naming_the_file_and_the_way_out(tmp_path, text, message):
    from peftbench.core.errors import UsageError
    from peftbench.sweep.records import read_trial_log

    (tmp_path / "search-trials.json").write_text(text)
    with pytest.raises(UsageError, match=message):
        read_trial_log(tmp_path / "search-trials.json")


def _fake_run(folder: Path, model: str, seed: int, task_files: list[str]) -> None:
    (folder / f"seed-{seed}").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "method": "random", "task": "rte", "budget": "0.01", "model": model, "task_files": task_files}))
    from peftbench.training.record import RunRecord

    RunRecord(seed=seed, test={"main": 0.5}, validation={"main": 0.5}, best_epoch=1, steps=4,
              trainable={"encoder": 10, "new": 0, "head": 2, "trainable": 10, "total": 12},
              budget_entries=10, pretrained_entries=1000, scoring_time_s=0.0, scores_from_cache=False,
              train_time_s=1.0, constant_predictor={"prediction": 0, "test_rows": 8, "validation": {"main": 0.5},
                                                    "test": {"main": 0.5}}).write(folder / f"seed-{seed}" / "result.json")


@pytest.mark.parametrize("other, expected", [
    ({"model": "other-model"}, "the runs are of 2 models"),
    ({"task_files": ["changed"]}, "different data files"),
])
def test_report_runs_of_two_models_or_datasets_are_refused_not_dropped(tmp_path, other, expected):
    from peftbench.core.errors import UsageError

    _fake_run(tmp_path / "a", "default", 0, ["x"])
    _fake_run(tmp_path / "b", other.get("model", "default"), 0, other.get("task_files", ["x"]))
    with pytest.raises(UsageError, match=expected):
        frame.load_runs([tmp_path])


@pytest.mark.parametrize("damage, expected", [
    (lambda run: (run / "seed-0" / "result.json").write_text('{"seed": 0, "te'), "cannot be read"),
    (lambda run: (run / "config.json").unlink(), "config.json is missing"),
    (lambda run: (run / "seed-0" / "result.json").write_text(
        (run / "seed-0" / "result.json").read_text().replace('"encoder": 10', '"encoder": "ten"')),
     "is not a run record: trainable.encoder"),
])
def test_report_on_a_damaged_run_folder_is_one_line(tmp_path, damage, expected):
    from peftbench.core.errors import UsageError

    _fake_run(tmp_path / "a", "default", 0, ["x"])
    damage(tmp_path / "a")
    with pytest.raises(UsageError, match=expected):
        frame.load_runs([tmp_path])


# --- tracebacks that are one line now ------------------------------------------------------------

def test_a_preprocessors_missing_field_is_one_line(capsys, tmp_path, tiny_model_dir):
    def drop_target(spec, train):  # from every split, so the files still agree on columns
        rows = [json.loads(l) for l in train.read_text().splitlines()]
        train.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "target"}) for r in rows) + "\n")
        text = spec.read_text()
        for split in ("validation", "test"):
            text = text.replace(text.split(f"{split}: ")[1].split("\n")[0], str(train))
        spec.write_text(text)

    task = _small_task(tmp_path, "wsc", drop_target)
    msg = one_line_error(capsys, "run", "--method", "random", "--task", task, "--model", tiny_model_dir,
                         "--quiet", "--output-dir", str(tmp_path / "runs"))
    assert "preprocessor 'mark_wsc_spans' needs field 'target'" in msg


def test_a_hub_data_source_while_offline_is_one_line(capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = tmp_path / "hubtask.yaml"
    task.write_text("name: hubtask\nkind: classification\ndata:\n  hub: {path: nobody/no-such-dataset-xyz}\n"
                    "text: [sentence]\nlabels: [0, 1]\nmetrics: [accuracy]\n")
    msg = one_line_error(capsys, "run", "--method", "random", "--task", str(task), "--model", tiny_model_dir,
                         "--quiet", "--output-dir", str(tmp_path / "runs"))
    assert "cannot load hub dataset 'nobody/no-such-dataset-xyz' (offline" in msg
    assert not (tmp_path / "runs").exists()


def test_a_damaged_study_database_is_one_line_exit_1(capsys, tmp_path, tiny_model_dir):

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": tiny_model_dir, "tasks": ["rte"],
                                    "methods": {"random": {}}, "budgets": [0.01], "seeds": 1, "limit": 8,
                                    "output_dir": str(tmp_path / "out")}))
    spec = sweep_spec.load_spec(path)
    grid.enqueue_missing(storage.open_study(spec), spec)
    db = tmp_path / "out" / "study.db"
    raw = bytearray(db.read_bytes())
    raw[4096:3 * 4096] = b"Z" * len(raw[4096:3 * 4096])
    db.write_bytes(bytes(raw))
    for command in ("status", "sweep"):
        assert main([command, str(path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the study's storage failed: database disk image is malformed" in err[0]


def test_a_task_file_removed_before_report_is_one_line(capsys, tmp_path, tiny_model_dir):
    task = _small_task(tmp_path, "rte", lambda spec, train: None)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": tiny_model_dir, "tasks": [task],
                                    "methods": {"random": {}}, "budgets": [0.01], "seeds": 1, "limit": 8,
                                    "train": {"epochs": 1}, "output_dir": str(tmp_path / "out")}))
    assert main(["sweep", str(path)]) == 0
    (tmp_path / "train.jsonl").unlink()
    capsys.readouterr()
    msg = one_line_error(capsys, "report", str(path))
    assert "train.jsonl is missing" in msg


def test_a_search_whose_every_trial_fails_is_an_error_not_an_empty_record(tmp_path, tiny_model_dir, monkeypatch):
    from peftbench.core.errors import UsageError

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "model": tiny_model_dir, "tasks": ["rte"], "methods": {"random": {}},
        "budgets": [0.01], "seeds": 1, "limit": 8, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "out"),
        "search": {"params": {"lr": {"choices": [1e-3, 1e-2]}}, "trials": 2, "pruner": "none"}}))

    def broken(config, **kw):
        raise ValueError("a space the method cannot take")

    monkeypatch.setattr(experiment, "run_experiment", broken)
    with pytest.raises(UsageError, match="search rte/random: none of its 2 trials completed: "
                                         "ValueError: a space the method cannot take"):
        search.run_search(sweep_spec.load_spec(path), log=lambda *a: None)
    assert not (tmp_path / "out" / "search.json").exists()


# --- a fresh hostile pass (cases not in the issue) ---------------------------------------------

def _board_folder(tmp_path) -> Path:
    board = tmp_path / "board"
    (board / "runs").mkdir(parents=True)
    for name in ("spec.yaml", "results.csv", "README.md", "search.json"):
        (board / name).write_text("committed\n")
    return board


def test_report_out_into_a_boards_folder_is_refused(capsys, tmp_path):
    board = _board_folder(tmp_path)
    (tmp_path / "runs").mkdir()
    msg = one_line_error(capsys, "report", "--runs", str(tmp_path / "runs"), "--out", str(board))
    assert "holds files peftbench did not write" in msg
    assert (board / "results.csv").read_text() == "committed\n" and not (board / ".peftbench").exists()


def test_a_sweep_whose_output_dir_is_a_boards_folder_is_refused(capsys, tmp_path, tiny_model_dir):
    board = _board_folder(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": tiny_model_dir, "tasks": ["rte"],
                                    "methods": {"random": {}}, "budgets": [0.01], "seeds": 1, "limit": 8,
                                    "output_dir": str(board)}))
    assert "holds files peftbench did not write" in one_line_error(capsys, "sweep", str(path))
    assert sorted(p.name for p in board.iterdir()) == ["README.md", "results.csv", "runs", "search.json", "spec.yaml"]


def test_check_method_refuses_a_bad_param_once(capsys):
    msg = one_line_error(capsys, "check-method", "lora", "--param", "r=0")
    assert "method 'lora' parameter r=0" in msg


def test_a_storage_fault_in_a_background_thread_is_one_line(capsys):
    """Optuna's heartbeat thread on a locked database: a warning line, not a traceback."""
    import sqlite3
    import threading


    def heartbeat():
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as err:
            raise RuntimeError("heartbeat failed") from err

    previous = threading.excepthook
    threading.excepthook = cli_main._thread_fault
    try:
        worker = threading.Thread(target=heartbeat, name="heartbeat")
        worker.start()
        worker.join()
    finally:
        threading.excepthook = previous
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the study's storage failed: database is locked" in err[0]


def test_report_out_on_a_read_only_report_folder_is_one_line(capsys, tmp_path):
    import os

    from peftbench.core.ownership import claim

    out = claim(tmp_path / "rep", "report")
    os.chmod(out, 0o500)
    try:
        if os.access(out, os.W_OK):  # root ignores permissions: nothing to check here
            pytest.skip("running as a user who may write anywhere")
        _fake_run(tmp_path / "runs" / "a", "default", 0, ["x"])
        assert "cannot write there" in one_line_error(capsys, "report", "--runs", str(tmp_path / "runs"),
                                                      "--out", str(out))
    finally:
        os.chmod(out, 0o700)


def test_diffpruning_on_a_one_step_run_says_to_train_longer(tiny_model_dir, tmp_path):
    """Not 'give burnin < 1 (e.g. burnin=1)': no burn-in fits one step."""
    from peftbench.contract.settings import TrainConfig
    from peftbench.core.errors import UsageError
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(method="diffpruning", task="rte", budget="0.01", seeds=[0], model=tiny_model_dir,
                       method_params={"burnin": 1}, train=TrainConfig(epochs=1, batch_size=4, max_steps=1),
                       limit=8, output_dir=str(tmp_path))
    with pytest.raises(UsageError, match="needs at least 2 training steps"):
        run_experiment(config, progress=False)


@pytest.mark.parametrize("seeds, expected", [(10 ** 9, "give a count from 1 to 1000"),
                                             (list(range(1001)), "1001 seeds; at most 1000")])
def test_a_study_of_a_billion_seeds_is_refused_before_building_it(seeds, expected):
    from peftbench.core.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(expected)):
        sweep_spec.parse_spec({"name": "x", "tasks": ["rte"], "methods": {"random": {}}, "seeds": seeds})


def test_a_causal_task_generating_a_hundred_thousand_tokens_is_refused(tmp_path):
    from peftbench.core.errors import UsageError
    from peftbench.data.tasks import load_task

    spec = (Path(__file__).resolve().parents[1] / "tasks" / "arith.yaml").read_text()
    data = Path(__file__).resolve().parents[1] / "tasks" / "data"
    path = tmp_path / "arith.yaml"
    path.write_text(spec.replace("max_new_tokens: 16", "max_new_tokens: 100000").replace(
        "data/arith/", f"{data}/arith/"))
    with pytest.raises(UsageError, match="max_new_tokens"):
        load_task(str(path))


@pytest.mark.parametrize("make", ["fifo", "symlink-to-dev-zero", "symlink-to-a-marker", "huge"])
def test_a_marker_that_is_not_a_small_regular_file_is_not_read(tmp_path, make):
    """A `.peftbench` marker is read only as a small regular file: a FIFO would block, a link to
    /dev/zero would eat memory, a link could lend another folder's ownership."""
    import os

    from peftbench.core import ownership
    from peftbench.core.errors import UsageError

    folder = tmp_path / "out"
    folder.mkdir()
    marker = folder / ownership.MARKER
    if make == "fifo":
        os.mkfifo(marker)
    elif make == "symlink-to-dev-zero":
        marker.symlink_to("/dev/zero")
    elif make == "symlink-to-a-marker":
        real = tmp_path / "real"
        real.mkdir()
        (real / ownership.MARKER).write_text('{"kind": "sweep"}')
        marker.symlink_to(real / ownership.MARKER)
    else:
        marker.write_text('{"kind": "sweep", "pad": "' + "x" * 10_000 + '"}')
    assert ownership.kind_of(folder) is None
    with pytest.raises(UsageError, match="holds files peftbench did not write"):
        ownership.check(folder, "sweep", None, "output folder")


@pytest.mark.parametrize("target", ["app-sqlite", "not-sqlite", "foreign-journal"])
def test_a_storage_file_that_is_not_optunas_is_refused_untouched(capsys, tmp_path, tiny_model_dir, target):
    """`storage:` naming an application's SQLite database, a file that is not SQLite, or a log
    that is not an Optuna journal: refused by name before Optuna writes its tables or records."""
    import sqlite3

    path = tmp_path / ("app.log" if target == "foreign-journal" else "app.db")
    if target == "app-sqlite":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE invoices (id INTEGER)")
    else:
        path.write_text("2026-12-06 server started\n")
    before = path.read_bytes()
    url = f"journal:{path}" if target == "foreign-journal" else f"sqlite:///{path}"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "t", "model": tiny_model_dir, "tasks": ["rte"],
                                         "methods": {"random": {}}, "budgets": [0.01], "seeds": 1, "limit": 8,
                                         "output_dir": str(tmp_path / "out"), "storage": url}))
    expected = {"app-sqlite": "tables that are not an Optuna study's (e.g. 'invoices')",
                "not-sqlite": "is not a SQLite database", "foreign-journal": "is not an Optuna journal"}[target]
    assert expected in one_line_error(capsys, "sweep", str(spec_path), "--enqueue-only")
    assert path.read_bytes() == before


def test_enqueue_only_into_a_folder_of_someone_elses_files_is_refused(capsys, tmp_path, tiny_model_dir):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "t", "model": tiny_model_dir, "tasks": ["rte"],
                                         "methods": {"random": {}}, "budgets": [0.01], "seeds": 1, "limit": 8,
                                         "output_dir": str(tmp_path / "mine")}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert "holds files peftbench did not write (e.g. 'notes.txt')" in one_line_error(
        capsys, "sweep", str(spec_path), "--enqueue-only")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_scores_read_back_from_the_cache_are_checked_as_fresh_ones_are(tmp_path, tiny_model_dir):
    """A cache entry whose scores hold a NaN (a damaged or hand-edited file) is refused by name,
    as a score() returning it is, instead of selecting from it."""
    from peftbench.contract.settings import TrainConfig
    from peftbench.core.errors import UsageError
    from peftbench.core.safeload import load_pt
    from peftbench.training.cache import ScoreCache
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(method="sam", task="rte", budget="0.01", model=tiny_model_dir, limit=8,
                       method_params={"burnin": 2}, train=TrainConfig(epochs=1, batch_size=4, max_length=32, max_steps=1),
                       output_dir=str(tmp_path / "runs"))
    cache = ScoreCache(tmp_path / "scores")
    run_experiment(config, progress=False, score_cache=cache)
    (entry,) = [p for p in (tmp_path / "scores").rglob("*.pt")]
    saved = load_pt(entry)
    name = next(iter(saved["scores"]))
    saved["scores"][name].view(-1)[0] = float("nan")
    torch.save(saved, entry)
    with pytest.raises(UsageError, match="NaN"):
        run_experiment(config, progress=False, score_cache=ScoreCache(tmp_path / "scores"))


def test_workers_claiming_one_folder_at_once_never_refuse_each_other(tmp_path):
    """`run --workers N` starts N processes that claim the sweep folder together: one saw the
    other's marker empty (written in place) or its temporary file, read "holds files peftbench
    did not write ... no .peftbench marker", and the search phase failed. The marker is written
    whole, and a marker being written is not a user's file."""
    from peftbench.core import ownership
    from peftbench.core.errors import UsageError
    from peftbench.core.files import is_temporary_of

    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / ".peftbench.k2x9.tmp").write_text("")  # another worker's marker, mid-write
    assert ownership.claim(folder, "sweep", what="study") == folder
    assert ownership.kind_of(folder) == "sweep"
    assert sorted(p.name for p in folder.iterdir()) == [".peftbench", ".peftbench.k2x9.tmp"]
    writes = []
    real = Path.write_text
    Path.write_text = lambda self, *a, **k: writes.append(self.name) or real(self, *a, **k)
    try:
        ownership._mark(tmp_path, "sweep")
    finally:
        Path.write_text = real
    assert ".peftbench" not in writes and ownership.kind_of(tmp_path) == "sweep"
    assert writes and all(is_temporary_of(name, ".peftbench") for name in writes)  # what `claim` passes over
    other = tmp_path / "other"  # a user's file beside a marker being written is still refused
    other.mkdir()
    (other / "mine.txt").write_text("user")
    (other / ".peftbench.a1.tmp").write_text("")
    with pytest.raises(UsageError, match="mine.txt"):
        ownership.claim(other, "sweep", what="study")

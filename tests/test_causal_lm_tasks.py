"""The causal-LM task kind (issue: decoder LLMs): prompt and answer templates, an extraction for
exact match, metrics that only it can use; the synthetic arithmetic task that ships with it."""
from __future__ import annotations

from pathlib import Path

import pytest

from peftbench import metrics
from peftbench.data import load_task
from peftbench.errors import UsageError

ARITH = Path(__file__).parents[1] / "tasks" / "arith.yaml"


def test_the_arithmetic_task_reads_prompt_answer_and_its_extraction():
    task = load_task(str(ARITH))
    assert task.kind == "causal_lm" and task.fields() == ["question", "answer"]
    splits = task.load_splits()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [400, 100, 100]
    row = splits["test"][0]
    a, op, b, _, result = row["answer"].split("\n")[0].split()
    assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]  # computed
    assert task.prompt_text(row).startswith("Question: What is") and task.prompt_text(row).endswith("Answer:")
    assert task.extract_answer(task.answer_text(row)) == result
    assert task.extract_answer("so it is 12 #### -7 then") == "-7" and task.extract_answer("no number") == ""
    questions = [set(splits[s]["question"]) for s in ("train", "validation", "test")]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])


def test_the_generator_reproduces_the_files(tmp_path):
    import shutil
    import subprocess
    import sys

    source = ARITH.parent / "data" / "arith"
    shutil.copy(source / "generate.py", tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "generate.py")], check=True)
    for split in ("train", "validation", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (source / f"{split}.jsonl").read_bytes()


def _task(tmp_path, **change):
    import yaml

    spec = yaml.safe_load(ARITH.read_text())
    spec["data"]["files"] = {s: str(ARITH.parent / f) for s, f in spec["data"]["files"].items()}
    spec.update(change)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize("change, expected", [
    ({"prompt": None}, "needs 'prompt' and 'answer'"),
    ({"extract": "(a)(b)"}, "give at most one"),
    ({"extract": "(unclosed"}, "is not a regular expression"),
    ({"metrics": ["accuracy"], "main_metric": "accuracy"}, "cannot score a causal_lm task"),
    ({"kind": "classification", "labels": ["a", "b"], "text": ["question"], "metrics": ["accuracy"],
      "main_metric": "accuracy"}, "belong to a causal_lm task"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_causal_lm_task_files_are_refused_by_name(tmp_path, change, expected):
    with pytest.raises(UsageError, match=expected):
        load_task(_task(tmp_path, **change))


def test_causal_lm_metrics_take_one_prediction_array_each():
    out = metrics.compute(["exact_match", "answer_loglik"], ["exact_match"],
                          {"exact_match": ["3", "4", ""], "answer_loglik": [-1.0, -2.0, -3.0]},
                          ["3", "5", "6"])
    assert out == {"exact_match": pytest.approx(1 / 3), "answer_loglik": -2.0, "main": pytest.approx(1 / 3)}

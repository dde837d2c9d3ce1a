"""Bad input and faults: one line naming the problem and what is allowed, exit 2, no traceback,
nothing written (or a clearly marked partial directory). One parametrized test per class."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_task, one_line_error

from peftbench.analysis import frame
from peftbench.cli.main import main
from peftbench.sweep import grid, state, storage
from peftbench.sweep import spec as sweep_spec


def run_args(model, out, *extra):
    return ["run", "--method", "random", "--task", "rte", "--model", model, "--limit", "8",
            "--epochs", "1", "--quiet", "--output-dir", str(out), *extra]


# --- task specs and data --------------------------------------------------------------------

def _broken_task(tmp_path, edit) -> str:
    """A copy of RTE whose train file (or spec) `edit` breaks."""
    path = Path(copy_task(tmp_path, "rte"))
    train = tmp_path / "train.jsonl"
    lines = Path(path.read_text().split("train: ")[1].split("\n")[0]).read_text().splitlines()[:20]
    train.write_text("\n".join(lines) + "\n")
    text = path.read_text()
    text = text.replace(text.split("train: ")[1].split("\n")[0], str(train))
    path.write_text(text)
    edit(path, train)
    return str(path)


TASK_CASES = {
    "broken JSON line": (lambda spec, train: train.write_text(train.read_text().replace("}\n", "\n", 1)),
                         "train.jsonl:1: not valid JSON"),
    "no label column": (lambda spec, train: train.write_text("\n".join(
        json.dumps({k: v for k, v in json.loads(l).items() if k != "label"})
        for l in train.read_text().splitlines()) + "\n"), "no field(s) ['label']"),
    "empty train file": (lambda spec, train: train.write_text(""), "has no rows"),
    "text field not in data": (lambda spec, train: spec.write_text(
        spec.read_text().replace("text: [premise, hypothesis]", "text: [premise, claim]")), "['claim']"),
    "unclosed template brace": (lambda spec, train: spec.write_text(
        spec.read_text().replace("text: [premise, hypothesis]", 'text: ["{premise", hypothesis]')),
        "template '{premise' is broken"),
    "label not in labels": (lambda spec, train: train.write_text(
        train.read_text().replace('"entailment"', '"maybe"', 1)), "label 'maybe' is not in the spec's labels"),
    "wrong type in spec": (lambda spec, train: spec.write_text(
        spec.read_text().replace("labels: [entailment, not_entailment]", "labels: entailment")),
        "labels = 'entailment': Input should be a valid list"),
    "duplicated key": (lambda spec, train: spec.write_text(spec.read_text() + "kind: regression\n"),
                       "key 'kind' appears twice"),
}


@pytest.mark.parametrize("case", sorted(TASK_CASES))
def test_bad_task_specs_and_data(capsys, tmp_path, tiny_model_dir, case):
    edit, expected = TASK_CASES[case]
    task = _broken_task(tmp_path, edit)
    msg = one_line_error(capsys, "run", "--method", "random", "--task", task, "--model",
                         tiny_model_dir, "--quiet", "--output-dir", str(tmp_path / "runs"))
    assert expected in msg
    assert not (tmp_path / "runs").exists()  # nothing written


def test_bad_regression_and_multiple_choice_labels(tmp_path):
    from peftbench.core.errors import UsageError
    from peftbench.data.tasks import load_task

    for name, bad, expected in (("stsb", '"label": "high"', "regression label 'high' is not a number"),
                                ("copa", '"label": 7', "multiple-choice label 7 is not a choice index")):
        path = Path(copy_task(tmp_path, name))
        source = Path(path.read_text().split("train: ")[1].split("\n")[0])
        rows = [json.loads(l) for l in source.read_text().splitlines()[:5]]
        train = tmp_path / f"{name}-train.jsonl"
        train.write_text("\n".join(json.dumps(r) for r in rows).replace(
            f'"label": {json.dumps(rows[2]["label"])}', bad, 1) + "\n")
        path.write_text(path.read_text().replace(str(source), str(train)))
        with pytest.raises(UsageError, match=expected):
            load_task(str(path)).load_splits()


# --- run options ---------------------------------------------------------------------------------

RUN_CASES = [
    (["--budget", "inf"], "not finite"),
    (["--budget", "nan"], "not finite"),
    (["--budget", "1e-9"], "selects 0 of the"),
    (["--lr=-1e-3"], "lr = -0.001: Input should be greater than 0"),
    (["--lr", "-1e-3"], "argument --lr: expected one argument"),  # argparse reads -1e-3 as an option
    (["--lr", "nan"], "lr = nan: Input should be a finite number"),
    (["--max-length", "100000"], "beyond the model's position table"),
    (["--param", "clip=big", "--method", "sam"], "parameter clip='big'"),
    (["--param", "r=0", "--method", "lora"], "parameter r=0: Input should be greater than 0"),
    (["--param", "r=abc", "--method", "lora"], "parameter r='abc'"),
    (["--param", "targets=[\"nope\"]", "--method", "lora"], "match no module"),
    (["--param", "burnin=abc", "--method", "sam"], "parameter burnin='abc'"),
    (["--param", "bogus=1"], "has no parameter 'bogus': accepted scope="),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_bad_run_options(capsys, tmp_path, tiny_model_dir, extra, expected):
    msg = one_line_error(capsys, *run_args(tiny_model_dir, tmp_path / "runs", *extra))
    assert expected in msg
    if "match no module" not in expected:  # refused before any run directory exists
        assert not (tmp_path / "runs").exists()


def test_output_dir_that_is_a_file_or_not_writable(capsys, tmp_path, tiny_model_dir):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "must be a writable folder" in one_line_error(capsys, *run_args(tiny_model_dir, afile))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "must be a writable folder" in one_line_error(capsys, *run_args(tiny_model_dir, locked))


@pytest.mark.slow
def test_disk_full_marks_the_run_incomplete(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """A failing write (ENOSPC) mid-run: one line, the directory marked INCOMPLETE, no
    truncated mask.pt, and reports skip it."""
    import errno

    import torch


    real_save = torch.save

    def full(obj, f, *a, **k):
        if Path(f).name.startswith("mask.pt.") and str(f).endswith(".tmp"):
            Path(f).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    msg = one_line_error(capsys, *run_args(tiny_model_dir, tmp_path / "runs"))
    assert "No space left on device" in msg and "INCOMPLETE" in msg
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "INCOMPLETE").exists()
    assert not list(run_dir.glob("**/mask.pt*"))
    from peftbench.core.errors import UsageError

    with pytest.raises(UsageError, match="skipped 1 run directories marked INCOMPLETE"):
        frame.load_runs([tmp_path / "runs"])


# --- study specs -----------------------------------------------------------------------------------

def _spec(tmp_path, model, **change):
    spec = {"name": "t", "model": model, "tasks": ["rte"], "methods": {"random": {}},
            "budgets": [0.01], "seeds": 1, "limit": 8, "train": {"epochs": 1},
            "output_dir": str(tmp_path / "out"), **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


SPEC_CASES = [
    ({"seeds": "3"}, "seeds = '3'"),
    ({"seeds": []}, "must not be empty"),
    ({"budgets": []}, "must not be empty"),
    ({"budgets": [1, 1.0]}, "name the same budget twice"),
    ({"limit": 0}, "limit = 0: Input should be greater than 0"),
    ({"train": {"epochs": 0}}, "train.epochs = 0"),
    ({"train": {"lr": "fast"}}, "train.lr = 'fast'"),
    ({"heartbeat_interval": "abc"}, "heartbeat_interval = 'abc'"),
    ({"methods": {"random": 5}}, "methods"),
    ({"heartbeat_interval": 60, "grace_period": 30}, "at least twice heartbeat_interval"),
    ({"search": {"params": {"lr": {"low": 1e-2, "high": 1e-5}}}}, "low 0.01 is above high 1e-05"),
    ({"storage": "mongodb://x"}, "unknown scheme"),
    ({"storage": "postgresql://nobody@127.0.0.1:9/none"}, "cannot open storage"),
    ({"tasks": ["rte", "rte"]}, "name the task(s) ['rte'] more than once"),
    ({"name": "../escape"}, "name '../escape' is not file-safe"),
]


@pytest.mark.parametrize("change, expected", SPEC_CASES, ids=[str(c[0])[:40] for c in SPEC_CASES])
def test_bad_study_specs(capsys, tmp_path, tiny_model_dir, change, expected):
    msg = one_line_error(capsys, "sweep", str(_spec(tmp_path, tiny_model_dir, **change)))
    assert expected in msg
    assert not (tmp_path / "out" / "runs").exists()


def test_a_folder_where_a_spec_or_a_cache_is_expected_is_named_as_what_it_is(capsys, tmp_path):
    (tmp_path / "runs").mkdir()
    assert "is a folder, not a spec YAML (to read run directories: peftbench report --runs" in one_line_error(
        capsys, "report", str(tmp_path / "runs"))
    (tmp_path / "scores").write_text("x")
    assert "is a file, not a folder" in one_line_error(capsys, "cache", "list", str(tmp_path / "scores"))


def test_duplicated_method_key_is_refused(capsys, tmp_path, tiny_model_dir):
    path = _spec(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace("methods:\n  random: {}\n",
                                             "methods:\n  random: {}\n  random: {scope: tensor}\n"))
    assert "key 'random' appears twice" in one_line_error(capsys, "sweep", str(path))


def test_yaml_floats_are_numbers(tmp_path, tiny_model_dir):
    from peftbench.sweep.spec import load_spec

    path = _spec(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace("epochs: 1", "epochs: 1\n  lr: 1e-3"))
    assert load_spec(path).train.lr == 1e-3


def test_journal_storage_in_a_missing_folder_works(tmp_path, tiny_model_dir, capsys):
    path = _spec(tmp_path, tiny_model_dir, storage=f"journal:{tmp_path}/new/folder/study.log")
    assert main(["sweep", str(path)]) == 0
    assert (tmp_path / "new" / "folder" / "study.log").is_file()


def test_journal_storage_reclaims_a_dead_local_workers_trial(tmp_path, tiny_model_dir):
    """No heartbeat in the journal storage: a trial of a dead local worker is failed and its
    cell queued again, instead of waiting forever."""
    import optuna


    path = _spec(tmp_path, tiny_model_dir, storage=f"journal:{tmp_path}/study.log")
    spec = sweep_spec.load_spec(path)
    study = storage.open_study(spec)
    grid.enqueue_missing(study, spec)
    trial = study.ask()  # pops the queued cell, as a worker would
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study._storage.set_trial_user_attr(trial._trial_id, "worker", f"{__import__('socket').gethostname()}:{dead.pid}")
    done = grid.run_grid(spec, log=lambda *a: None)
    states = [t.state for t in done.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 1
    assert done.trials[0].user_attrs["failure"].startswith("worker ")


# --- interrupts --------------------------------------------------------------------------------------

def _launch(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # SIGINT at its default in the child whatever the caller's disposition (a shell's `&` or
    # nohup ignores it, and an ignored signal stays ignored across exec)
    return subprocess.Popen([sys.executable, "-m", "peftbench", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _interrupt_when(proc, ready, timeout=120):
    start = time.time()
    while not ready() and time.time() - start < timeout:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=120)


@pytest.mark.slow
def test_ctrl_c_during_run_says_what_happens_and_marks_the_directory(tmp_path, tiny_model_dir):
    out = tmp_path / "runs"
    proc = _launch(run_args(tiny_model_dir, out, "--seeds", "3", "--epochs", "30", "--limit", "32"))
    _, err = _interrupt_when(proc, lambda: list(out.glob("*/seed-0/metrics.jsonl")))
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("peftbench: interrupted; the run directory is marked INCOMPLETE")
    (run_dir,) = out.iterdir()
    assert (run_dir / "INCOMPLETE").read_text().startswith("interrupted")


@pytest.mark.slow
def test_ctrl_c_during_sweep_prints_one_line_and_resumes(tmp_path, tiny_model_dir):

    path = _spec(tmp_path, tiny_model_dir, train={"epochs": 30}, limit=32, seeds=2)
    proc = _launch(["sweep", str(path)])
    _, err = _interrupt_when(proc, lambda: list((tmp_path / "out" / "runs").glob("*/seed-0/metrics.jsonl")))
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("peftbench: interrupted; completed cells are kept")
    states = state.cell_states(storage.open_study(sweep_spec.load_spec(path)), state.Fingerprints(sweep_spec.load_spec(path)))
    assert any(v["state"] == "failed" for v in states.values())

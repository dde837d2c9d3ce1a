"""Sweeps on a tiny model and real RTE rows: resume after kill -9, two workers, score once."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from peftbench.core.errors import UsageError
from peftbench.sweep import grid, search, state
from peftbench.sweep import spec as sweep_spec
from peftbench.sweep import storage as sweep_storage
from peftbench.sweep import workers as sweep_workers
from peftbench.sweep.search import method_study


def write_spec(tmp_path: Path, model: str, **extra) -> Path:
    spec = {"name": "t", "model": model, "tasks": ["rte"], "methods": {"random": {}, "magpruning": {}},
            "budgets": [0.01, 0.05], "seeds": 2, "limit": 16, "train": {"epochs": 1},
            "heartbeat_interval": 1, "grace_period": 3, "output_dir": str(tmp_path / "out"), **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_trials(spec_path: Path):
    spec = sweep_spec.load_spec(spec_path)
    return spec, sweep_storage.open_study(spec).get_trials(deepcopy=False)


def finished_runs(out: Path) -> Counter:
    """Run directories that finished training, per cell (method, budget, seed)."""
    found = Counter()
    for result in (out / "runs").glob("*/seed-*/result.json"):
        config = json.loads((result.parent.parent / "config.json").read_text())
        found[(config["method"], config["budget"], config["seeds"][0])] += 1
    return found


def launch(spec_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftbench", "sweep", str(spec_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_midway_then_same_command_finishes_without_rerunning(tmp_path, tiny_model_dir):
    """2 methods x 3 budgets x 2 seeds, as the issue asks, on a tiny model and real RTE rows."""
    spec_path = write_spec(tmp_path, tiny_model_dir, budgets=[0.01, 0.05, 0.1])
    worker = launch(spec_path)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill -9 while a cell trains, once two are complete
        time.sleep(0.5)
        if (tmp_path / "out" / "study.db").exists():
            _, trials = study_trials(spec_path)
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and \
                    any(t.state == TrialState.RUNNING for t in trials):
                break
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    spec, before = study_trials(spec_path)
    done_before = {t.number: t.user_attrs["run_dir"] for t in before if t.state == TrialState.COMPLETE}
    assert 2 <= len(done_before) < len(sweep_spec.cells(spec))
    assert any(t.state == TrialState.RUNNING for t in before)  # the trial killed mid-run

    again = launch(spec_path)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    _, after = study_trials(spec_path)
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["cell"] for t in complete) == sorted(c.key for c in sweep_spec.cells(spec))
    for number, run_dir in done_before.items():  # completed trials kept as they were
        assert after[number].state == TrialState.COMPLETE and after[number].user_attrs["run_dir"] == run_dir
    assert all(n == 1 for n in finished_runs(tmp_path / "out").values())  # nothing trained twice
    killed = [t for t in after if t.state == TrialState.FAIL]
    assert len(killed) == 1 and killed[0].system_attrs.get("failed_trial") is None
    assert any(t.system_attrs.get("failed_trial") == killed[0].number for t in complete)  # retried


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_each_cell_once(tmp_path, tiny_model_dir):
    spec_path = write_spec(tmp_path, tiny_model_dir)
    spec = sweep_spec.load_spec(spec_path)
    grid.enqueue_missing(sweep_storage.open_study(spec), spec)  # one coordinator queues, then both work
    workers = [launch(spec_path), launch(spec_path)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    _, trials = study_trials(spec_path)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert Counter(t.user_attrs["cell"] for t in complete) == Counter(c.key for c in sweep_spec.cells(spec))
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both did work
    assert all(n == 1 for n in finished_runs(tmp_path / "out").values())


@pytest.mark.slow
def test_workers_option_runs_local_workers_with_a_share_of_the_cores_each(tmp_path, tiny_model_dir):
    """`sweep --workers 2`: every cell once, each worker with half the cores as its threads."""
    spec_path = write_spec(tmp_path, tiny_model_dir)
    done = subprocess.run([sys.executable, "-m", "peftbench", "sweep", str(spec_path), "--workers", "2"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 worker(s)" in done.stdout and "cells done" in done.stdout
    spec, trials = study_trials(spec_path)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert Counter(t.user_attrs["cell"] for t in complete) == Counter(c.key for c in sweep_spec.cells(spec))
    cores = len(os.sched_getaffinity(0))
    assert {t.user_attrs["threads"] for t in complete} <= {cores // 2, cores - cores // 2, 1}


def test_workers_beyond_the_cores_are_refused():
    from peftbench.core.errors import UsageError

    with pytest.raises(UsageError, match="allowed 1.."):
        sweep_workers.worker_environments(len(os.sched_getaffinity(0)) + 1)
    envs = sweep_workers.worker_environments(1)
    assert envs == [{"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))),
                     "MKL_NUM_THREADS": str(len(os.sched_getaffinity(0)))}]


@pytest.mark.slow
def test_sweeping_four_budgets_scores_once(tmp_path, tiny_model_dir, monkeypatch):
    from peftbench.methods.magpruning import MagPruning

    calls = []
    original = MagPruning.score
    monkeypatch.setattr(MagPruning, "score", lambda self, model, data: calls.append(1) or original(self, model, data))
    spec_path = write_spec(tmp_path, tiny_model_dir, methods=["magpruning"], seeds=[0],
                           budgets=[0.001, 0.01, 0.05, 0.1])
    study = grid.run_grid(sweep_spec.load_spec(spec_path), log=lambda *a: None)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4 and len(calls) == 1
    assert sorted(t.user_attrs["record"]["scores_from_cache"] for t in trials) == [False, True, True, True]
    assert len({round(t.user_attrs["record"]["scoring_time_s"], 9) for t in trials}) == 1  # scored once, reported 4x
    assert sorted(t.values[1] for t in trials) == sorted(
        int(b * trials[0].user_attrs["record"]["pretrained_entries"]) for b in (0.001, 0.01, 0.05, 0.1))


def test_natural_count_methods_run_once_per_seed(tmp_path, tiny_model_dir):
    spec = sweep_spec.load_spec(write_spec(tmp_path, tiny_model_dir, methods=["bitfit", "random"]))
    keys = [c.key for c in sweep_spec.cells(spec)]
    assert keys.count("rte/bitfit/bnatural/s0") == 1 and len(keys) == 2 + 4


@pytest.mark.parametrize("change, message", [
    ({"methods": ["nope"]}, "nope"),
    ({"tasks": ["nope"]}, "nope"),
    ({"budgets": [2.5]}, "budget"),
    ({"colour": 1}, "unknown key 'colour'"),
    ({"train": {"learning_rate": 1}}, "unknown train settings"),
    ({"methods": {"random": {"bogus": 1}}}, "bogus"),
    ({"search": {"params": {"dropout": {"low": 0, "high": 1}}}}, "not a train setting"),
])
def test_bad_specs_are_refused_with_what_is_allowed(tmp_path, tiny_model_dir, change, message):
    with pytest.raises(UsageError, match=message):
        sweep_spec.load_spec(write_spec(tmp_path, tiny_model_dir, **change))


@pytest.mark.slow
def test_search_samples_learning_rates_and_records_the_best(tmp_path, tiny_model_dir):
    spec_path = write_spec(tmp_path, tiny_model_dir, methods=["random"], budgets=[0.01],
                           train={"epochs": 2},
                           search={"trials": 3, "params": {"lr": {"low": 1e-5, "high": 1e-2, "log": True}}})
    spec = sweep_spec.load_spec(spec_path)
    best = search.run_search(spec, log=lambda *a: None)
    assert 1e-5 <= best["rte/random"]["train"]["lr"] <= 1e-2
    study = optuna.load_study(study_name=method_study("t/search/rte/random", "random"), storage=spec.storage_url)
    assert len(study.trials) == 3 and len({t.params["lr"] for t in study.trials}) == 3
    assert all(len(t.intermediate_values) >= 1 for t in study.trials)  # pruner sees each epoch
    # the grid then trains with the searched learning rate
    objective = grid.GridObjective(spec, cache=None)
    cell = sweep_spec.cells(spec)[0]
    assert sweep_spec.cell_run_config(spec, cell, objective.prints.best).train.lr == best["rte/random"]["train"]["lr"]


POSTGRES = os.environ.get("PEFTBENCH_TEST_POSTGRES")


@pytest.mark.skipif(not POSTGRES, reason="set PEFTBENCH_TEST_POSTGRES=postgresql://... (.ci/run starts a server)")
def test_two_workers_share_one_postgresql_study_each_cell_once(tmp_path, tiny_model_dir):
    name = f"pg-{os.getpid()}-{int(time.time())}"
    spec_path = write_spec(tmp_path, tiny_model_dir, name=name, storage=POSTGRES, seeds=[0])
    spec = sweep_spec.load_spec(spec_path)
    storage = sweep_storage.open_storage(spec)
    assert sweep_storage.uses_heartbeat(spec) and storage.get_heartbeat_interval() == spec.heartbeat_interval
    workers = [launch(spec_path), launch(spec_path)]  # both enqueue: the duplicate guard holds
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = sweep_storage.open_study(spec).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert Counter(t.user_attrs["cell"] for t in complete) == Counter(c.key for c in sweep_spec.cells(spec))
    assert all(n == 1 for n in finished_runs(tmp_path / "out").values())


def _one_cell_spec(tmp_path, model, **extra):
    return write_spec(tmp_path, model, methods=["random"], budgets=[0.01], seeds=[0], **extra)


@pytest.mark.slow
def test_a_spec_that_contradicts_the_study_is_refused_naming_the_keys(tmp_path, tiny_model_dir, capsys):
    """Changing lr and rerunning used to print '0 queued now' and report the old-lr numbers."""
    from peftbench.cli.main import main

    grid.run_grid(sweep_spec.load_spec(_one_cell_spec(tmp_path, tiny_model_dir)), log=lambda *a: None)
    changed = _one_cell_spec(tmp_path, tiny_model_dir, train={"epochs": 1, "lr": 0.5})
    assert main(["sweep", str(changed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr: 0.0001 -> 0.5" in err[0] and "--restart-changed" in err[0]
    # with the flag the cell runs afresh; the report reads only the new trial
    assert main(["sweep", str(changed), "--restart-changed"]) == 0
    frame = state.finished_frame(sweep_spec.load_spec(changed))
    assert len(frame) == 1
    trial = sweep_storage.open_study(sweep_spec.load_spec(changed)).trials[frame.trial.iloc[0]]
    assert trial.user_attrs["train_config"]["lr"] == 0.5
    # the old spec still reads its own trial, never the new one
    old = state.finished_frame(sweep_spec.load_spec(_one_cell_spec(tmp_path, tiny_model_dir)))
    assert list(old.trial) == [0]


@pytest.mark.slow
def test_reports_show_only_the_current_specs_cells(tmp_path, tiny_model_dir):
    """A method removed from the spec (or a same-named spec with other cells) stays out."""
    both = write_spec(tmp_path, tiny_model_dir, methods=["random", "magpruning"], budgets=[0.01], seeds=[0])
    grid.run_grid(sweep_spec.load_spec(both), log=lambda *a: None)
    spec = sweep_spec.load_spec(_one_cell_spec(tmp_path, tiny_model_dir))
    study = grid.run_grid(spec, log=lambda *a: None)
    frame = state.finished_frame(spec)
    assert list(frame.method) == ["random"]
    assert frame.peak_memory_mb.gt(50).all() and frame.steps_per_s.gt(0).all()  # cost per cell
    assert state.progress_line(study, state.Fingerprints(spec)).startswith("1/1 cells done")


@pytest.mark.slow
def test_a_diverged_cell_fails_once_with_its_reason_and_the_sweep_exits_1(tmp_path, tiny_model_dir, capsys):
    from peftbench.cli.main import main

    spec_path = write_spec(tmp_path, tiny_model_dir, methods=["random"], budgets=[0.05], seeds=[0],
                           train={"epochs": 1, "lr": 1e6, "batch_size": 4})
    assert main(["sweep", str(spec_path)]) == 1
    err = capsys.readouterr().err
    assert "1 cell(s) failed" in err and "rte/random/b0.05/s0: diverged at step" in err
    assert main(["sweep", str(spec_path)]) == 1  # not retried: it would diverge again
    trials = sweep_storage.open_study(sweep_spec.load_spec(spec_path)).trials
    assert [t.state for t in trials] == [TrialState.FAIL]


def test_method_train_sets_one_methods_settings_and_is_checked(tmp_path, tiny_model_dir):
    """`method_train` gives a method its own settings over `train` (here its learning rate);
    it reaches the run and the cell's fingerprint; a bad key or an unlisted method is refused."""
    from peftbench.core.errors import UsageError

    spec_path = write_spec(tmp_path, tiny_model_dir, methods=["random", "magpruning"], seeds=[0],
                           budgets=[0.01])
    text = spec_path.read_text() + "method_train: {random: {lr: 0.005}}\n"
    spec_path.write_text(text)
    spec = sweep_spec.load_spec(spec_path)
    by_method = {c.method: sweep_spec.cell_run_config(spec, c, {}) for c in sweep_spec.cells(spec)}
    assert by_method["random"].train.lr == 0.005 and by_method["magpruning"].train.lr == spec.train.lr
    prints = state.Fingerprints(spec)
    lrs = {c.method: json.dumps(prints.config(c)) for c in sweep_spec.cells(spec)}
    assert '"lr": 0.005' in lrs["random"] and '"lr": 0.005' not in lrs["magpruning"]
    for bad, message in (("{random: {lr: -1}}", "method_train.random.lr"),
                         ("{sam: {lr: 0.1}}", "not in 'methods'"),
                         ("{random: {lrr: 0.1}}", "unknown train settings")):
        spec_path.write_text(text.replace("{random: {lr: 0.005}}", bad))
        with pytest.raises(UsageError, match=re.escape(message)):
            sweep_spec.load_spec(spec_path)


@pytest.mark.slow
def test_search_over_choices_tries_each_choice_once(tmp_path, tiny_model_dir):
    """A search whose settings are all lists of choices is a grid: each value once, even when
    `trials` is larger (TPE would repeat values)."""
    spec_path = write_spec(tmp_path, tiny_model_dir, methods=["random"], seeds=[0], budgets=[0.01],
                           search={"params": {"lr": {"choices": [1.0e-3, 1.0e-2]}}, "trials": 5,
                                   "pruner": "none"})
    spec = sweep_spec.load_spec(spec_path)
    best = search.run_search(spec, log=lambda *a: None)
    assert best["rte/random"]["trials"] == 2 and best["rte/random"]["train"]["lr"] in (1.0e-3, 1.0e-2)
    study = optuna.load_study(study_name=method_study("t/search/rte/random", "random"), storage=spec.storage_url)
    assert sorted(t.params["lr"] for t in study.trials) == [1.0e-3, 1.0e-2]
    assert json.loads((spec.out / "search.json").read_text()) == best


def test_uses_heartbeat_says_what_open_storage_built(tmp_path, tiny_model_dir):
    """The grid decides between stale-trial detection and reclaiming dead local workers from
    `uses_heartbeat`; it must agree with the storage `open_storage` really built."""
    for storage, expected in ((None, True), (f"journal:{tmp_path}/j.log", False)):
        extra = {"storage": storage} if storage else {}
        spec = sweep_spec.load_spec(write_spec(tmp_path, tiny_model_dir, name=f"hb{int(expected)}", **extra))
        built = sweep_storage.open_storage(spec)
        has = hasattr(built, "get_heartbeat_interval") and bool(built.get_heartbeat_interval())
        assert sweep_storage.uses_heartbeat(spec) == has == expected


@pytest.mark.slow
def test_sigterm_to_a_sweep_with_workers_ends_the_workers(tmp_path, tiny_model_dir):
    """A scheduler's `kill PID` (SIGTERM) on `sweep --workers 2` reaches the workers: none is
    left training, orphaned, after the parent is gone."""
    import signal
    import time

    spec_path = write_spec(tmp_path, tiny_model_dir, seeds=30, train={"epochs": 1, "max_steps": 50})
    parent = subprocess.Popen([sys.executable, "-m", "peftbench", "sweep", str(spec_path), "--workers", "2"],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def children() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    deadline = time.time() + 120
    while len(children()) < 2 and time.time() < deadline:
        time.sleep(0.5)
    workers = children()
    assert len(workers) == 2, "the workers did not start"
    time.sleep(3)
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=60)
    deadline = time.time() + 30
    alive = workers
    while alive and time.time() < deadline:
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        time.sleep(0.5)
    for pid in alive:  # never leave them running after a failure
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the SIGTERM'd sweep"


@pytest.mark.slow
def test_a_cell_past_its_time_limit_fails_for_good_and_the_sweep_goes_on(tmp_path, tiny_model_dir, monkeypatch):
    """A hung `select` (its heartbeat keeps the trial alive) is ended at the spec's
    cell_time_limit, recorded as failed for good with the reason; the other cells run."""
    import time

    from peftbench.methods.magpruning import MagPruning

    def hang(self, model, scores, budget, generator):
        time.sleep(600)

    monkeypatch.setattr(MagPruning, "select", hang)
    spec_path = write_spec(tmp_path, tiny_model_dir, seeds=1, budgets=[0.01], cell_time_limit=3)
    start = time.perf_counter()
    grid.run_grid(sweep_spec.load_spec(spec_path), progress=False, log=lambda *a: None)
    assert time.perf_counter() - start < 120
    _, trials = study_trials(spec_path)
    by_method = {t.user_attrs["method"]: t for t in trials if "method" in t.user_attrs}
    assert by_method["random"].state == TrialState.COMPLETE
    failed = by_method["magpruning"]
    assert failed.state == TrialState.FAIL and failed.user_attrs["final_failure"]
    assert "time limit of 3 s" in failed.user_attrs["failure"]


def test_a_cell_recorded_by_another_worker_first_does_not_stop_this_one(monkeypatch):
    """SQLite has no row locks, so two workers can pop the same waiting trial; the second to
    finish it gets Optuna's "Cannot tell a COMPLETE trial": the worker says so and goes on
    (seen once in a CI run of test_two_workers_share_one_sqlite_study_each_cell_once). Any
    other error still stops it."""
    from types import SimpleNamespace

    from peftbench.sweep import grid

    def study_raising(message):
        def optimize(*args, **kwargs):
            raise ValueError(message)
        return SimpleNamespace(optimize=optimize)

    for name, value in (("claim_out", lambda spec: None), ("enqueue_missing", lambda *a, **k: 0),
                        ("Fingerprints", lambda spec: SimpleNamespace(cells=[])),
                        ("GridObjective", lambda *a, **k: None), ("uses_heartbeat", lambda spec: False),
                        ("progress_line", lambda *a: "finished")):
        monkeypatch.setattr(grid, name, value)
    spec = SimpleNamespace(name="t", storage_url="sqlite:///x.db", out=Path("x"))
    for message, stops in (("Cannot tell a COMPLETE trial.", False), ("another problem", True)):
        # the opening line's count, then the loop's: one cell waiting, then none
        states = iter([{"waiting": 0, "running": 0}, {"waiting": 1, "running": 0}, {"waiting": 0, "running": 0}])
        monkeypatch.setattr(grid, "counts", lambda study: next(states))
        monkeypatch.setattr(grid, "open_study", lambda spec: study_raising(message))
        lines = []
        if stops:
            with pytest.raises(ValueError, match="another problem"):
                grid.run_grid(spec, log=lines.append, use_cache=False)
        else:
            grid.run_grid(spec, log=lines.append, use_cache=False)
            assert "recorded by another worker first (Cannot tell a COMPLETE trial.)" in lines[1]
            assert lines[-1] == "finished"


def test_a_run_that_queues_nothing_new_says_what_an_earlier_run_left_queued(tmp_path, tiny_model_dir,
                                                                            monkeypatch):
    """A board stopped mid-grid and started again printed '0 cells queued' while its workers went
    on to train the ten cells the stopped run had queued. The count is of the study, not of a
    run: each worker a run spawns finds its parent's cells queued too."""
    spec = sweep_spec.load_spec(write_spec(tmp_path, tiny_model_dir))
    study = sweep_storage.open_study(spec)
    assert grid.enqueue_missing(study, spec) == 8
    lines = []
    monkeypatch.setattr(grid, "spawn_workers", lambda *a, **k: 0)
    grid.run_workers(spec, [], workers=2, log=lines.append)
    assert lines[0] == "study 't': 0 cells queued now, 8 waiting or running in all"

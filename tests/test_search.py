"""The search: tuning seeds apart from the reported ones, and the edge rule that widens a grid
whose best value sits at its edge (fixed in the spec before the search runs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from peftbench.board import tables
from peftbench.core.errors import UsageError
from peftbench.sweep import budgets, search, state, storage
from peftbench.sweep import grid as sweep_grid
from peftbench.sweep import records as sweep_records
from peftbench.sweep import spec as sweep_spec
from peftbench.sweep.search import method_study
from peftbench.training import experiment


def _rows_match(actual, expected) -> bool:
    """Rows equal field by field, floats to pytest.approx (which refuses nested rows since pytest 9.2)."""
    def same(a, b):
        if isinstance(a, float) or isinstance(b, float):
            return a == pytest.approx(b)
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b
    assert len(actual) == len(expected), (actual, expected)
    for a, b in zip(actual, expected):
        assert same(a, b), f"{a!r} != {b!r}\n  in {actual!r}"
    return True


def _spec(tmp_path, **search):
    return sweep_spec.parse_spec({
        "name": "widen", "tasks": ["cb"], "methods": ["random"], "seeds": 5,
        "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-4, 1.0e-3, 1.0e-2]}}, "pruner": "none", **search}})


def _fake_runs(monkeypatch, peak: float):
    """Validation peaks at lr = `peak` (log scale); records each run's lr and seeds."""
    runs = []

    def run_experiment(config, **kwargs):
        runs.append((config.train.lr, tuple(config.seeds)))
        return {"validation_main_mean": -(math.log10(config.train.lr) - math.log10(peak)) ** 2}, Path("x")

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)
    return runs


def test_grid_best_at_its_low_edge_is_widened_until_inside(tmp_path, monkeypatch):
    runs = _fake_runs(monkeypatch, peak=2e-5)
    best = search.run_search(_spec(tmp_path, widen=3, seeds=[100, 101]), log=lambda *a: None)
    lrs = sorted(lr for lr, _ in runs)
    # 1e-4 best of the grid -> 1e-5 (best, edge again) -> 1e-6 (worse): 1e-5 is inside, stop
    assert lrs == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    assert best["cb/random"]["train"]["lr"] == pytest.approx(1e-5)
    assert {seeds for _, seeds in runs} == {(100, 101)} and best["cb/random"]["seeds"] == [100, 101]
    assert len(best["cb/random"]["tried"]) == 5


def test_widening_stops_at_its_limit_and_not_for_an_inside_best(tmp_path, monkeypatch):
    runs = _fake_runs(monkeypatch, peak=10.0)
    best = search.run_search(_spec(tmp_path, widen=1), log=lambda *a: None)
    assert sorted(lr for lr, _ in runs) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert best["cb/random"]["train"]["lr"] == pytest.approx(1e-1)  # at the limit: said, kept
    runs = _fake_runs(monkeypatch, peak=1e-3)
    search.run_search(_spec(tmp_path / "inside", widen=2), log=lambda *a: None)
    assert sorted(lr for lr, _ in runs) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert {seeds for _, seeds in runs} == {(0,)}  # default: the spec's first seed


@pytest.mark.slow
def test_a_resumed_search_says_how_many_pairs_are_tuned_in_one_line(tmp_path, monkeypatch):
    """Progress on long work: each pair a worker starts says k of n tuned so far; a resumed
    search names its tuned pairs in one line (not a line per pair and per worker)."""
    _fake_runs(monkeypatch, peak=1e-3)
    spec = sweep_spec.parse_spec({
        "name": "resume", "tasks": ["cb", "rte"], "methods": ["random", "bitfit"], "seeds": 5,
        "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-4, 1.0e-3, 1.0e-2]}}, "pruner": "none"}})
    lines = []
    search.run_search(spec, log=lines.append)
    started = [line for line in lines if "started" in line]
    assert started == [f"search {k}: started; {i} of 4 pairs tuned so far"
                       for i, k in enumerate(["cb/random", "cb/bitfit", "rte/random", "rte/bitfit"])]
    (tmp_path / "sweep" / "search.json").write_text(
        json.dumps({k: v for k, v in sweep_records.best_search_params(spec).items() if k != "rte/bitfit"}))
    lines.clear()
    search.run_search(spec, log=lines.append)
    assert lines[0].startswith("search: 3 of 4 (task, method) pairs tuned already in ")
    assert lines[0].endswith(": cb/random, cb/bitfit, rte/random")
    assert lines[1] == "search rte/bitfit: started; 3 of 4 pairs tuned so far"


def test_widen_needs_one_numeric_grid(tmp_path):
    with pytest.raises(UsageError, match="widen needs exactly one searched setting"):
        sweep_spec.parse_spec({"name": "w", "tasks": ["cb"], "methods": ["random"],
                          "search": {"params": {"lr": {"low": 1e-4, "high": 1e-2}}, "widen": 1}})
    with pytest.raises(UsageError, match="seeds"):
        sweep_spec.parse_spec({"name": "w", "tasks": ["cb"], "methods": ["random"],
                          "search": {"params": {"lr": {"choices": [1e-4]}}, "seeds": []}})


@pytest.mark.slow
def test_two_search_workers_split_the_pairs_and_lose_none(tmp_path, tiny_model_dir, monkeypatch):
    """`leaderboard run --workers 2` on a spec with a search: two `leaderboard search` workers
    take the untuned pairs between them (each pair searched once), and every pair's entry is in
    the committed search.json, whatever order they finish in."""
    import os

    import yaml

    from peftbench.cli.main import main

    board = tmp_path / "boards" / "split"
    board.mkdir(parents=True)
    methods = {"random": {}, "magpruning": {}, "bitfit": {}, "sam": {"burnin": 2}}
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "split", "model": tiny_model_dir, "tasks": ["cb"], "methods": methods,
        "budgets": [0.01], "seeds": 1, "limit": 16, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-3, 1.0e-2]}}, "pruner": "none"}}))
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH")])))
    assert main(["leaderboard", "run", "split", "--workers", "2"]) == 0
    tuned = json.loads((board / "search.json").read_text())
    assert sorted(tuned) == sorted(f"cb/{m}" for m in methods)
    assert all(entry["trials"] == 2 for entry in tuned.values())  # each pair searched once
    assert json.loads((tmp_path / "sweep" / "search-claims.json").read_text()) == {}


def test_the_grid_refuses_pairs_the_search_has_not_tuned(tmp_path, tiny_model_dir):
    """A spec with `search:` whose search.json lacks a (task, method) pair: the grid is refused,
    naming the pair, instead of running its cells at the untuned settings."""

    import yaml

    from peftbench.core.errors import UsageError

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "model": tiny_model_dir, "tasks": ["rte"], "methods": {"random": {}, "bitfit": {}},
        "budgets": [0.01], "seeds": 1, "limit": 8, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "out"),
        "search": {"params": {"lr": {"choices": [1e-3, 1e-2]}}, "trials": 2, "pruner": "none"}}))
    spec = sweep_spec.load_spec(path)
    storage.claim_out(spec)  # the sweep's folder, as a search leaves it
    (tmp_path / "out" / "search.json").write_text(json.dumps({"rte/random": {"train": {"lr": 0.01}, "method": {}}}))
    with pytest.raises(UsageError, match=r"1 \(task, method\) pair\(s\) are not tuned yet \(rte/bitfit;"):
        sweep_grid.run_grid(spec, log=lambda *a: None)
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("value, expected", [
    (3e-3, [1e-3, 3e-3, 1e-2]),  # inside the grid: its neighbours there
    (3e-2, [1e-2, 3e-2, 9e-2]),  # at the top: one step of the grid's ratio there beyond it
    (9e-5, [2.7e-5, 9e-5, 3e-4]),  # added by the edge rule below the grid: the grid above it
])
def test_the_carry_check_tries_the_carried_value_and_its_neighbours(value, expected):
    grid = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert budgets.neighbours(grid, value) == pytest.approx(expected)


def _carry_spec(tmp_path, **search):
    return sweep_spec.parse_spec({
        "name": "carry", "tasks": ["cb"], "methods": ["random", "bitfit"], "seeds": 3,
        "budgets": [0.001, 0.005, 0.02], "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-4, 1.0e-3, 1.0e-2]}}, "pruner": "none",
                   "seeds": [100, 101], "budget": 0.005, "carry_check": [100], **search}})


@pytest.mark.slow
def test_the_carry_check_measures_what_carrying_the_rate_costs_at_each_other_budget(tmp_path, monkeypatch):
    """Validation peaks at lr 1e-3 at the search's budget and at 1e-2 at 2%: the check, at 0.1%
    and 2% only, for the budget-parameterised method only (BitFit has its natural count), on
    its own seed, finds the cost of carrying at 2% (1.0) and none at 0.1%; the board's table
    sets each cost against the cell's seed spread and names the cell that exceeds it."""
    import pandas as pd


    runs = []

    def run_experiment(config, **kwargs):
        runs.append((config.method, config.budget, config.train.lr, tuple(config.seeds)))
        peak = 1e-2 if config.budget == "0.02" else 1e-3
        return {"validation_main_mean": -(math.log10(config.train.lr) - math.log10(peak)) ** 2}, Path("x")

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)
    spec = _carry_spec(tmp_path)
    with pytest.raises(UsageError, match="needs the search's setting of cb/random"):
        budgets.run_carry_check(spec, log=lambda *a: None)
    search.run_search(spec, log=lambda *a: None)
    runs.clear()
    carry = budgets.run_carry_check(spec, log=lambda *a: None)
    assert sorted(carry) == ["cb/random/0.001", "cb/random/0.02"] == sorted(sweep_records.carry_keys(spec))
    assert _rows_match(sorted((b, lr) for _, b, lr, _ in runs),
        [("0.001", 1e-4), ("0.001", 1e-3), ("0.001", 1e-2), ("0.02", 1e-4), ("0.02", 1e-3), ("0.02", 1e-2)])
    assert {seeds for *_, seeds in runs} == {(100,)}
    assert carry["cb/random/0.02"]["carried"] == {"lr": 1e-3} and carry["cb/random/0.02"]["train"]["lr"] == 1e-2
    assert carry["cb/random/0.02"]["carried_validation"] == pytest.approx(-1.0)
    runs.clear()
    assert budgets.run_carry_check(spec, log=lambda *a: None) == carry and not runs  # resumes: nothing again

    frame = pd.DataFrame({"task": "cb", "method": "random", "budget": ["0.001"] * 3 + ["0.02"] * 3,
                          "metric": [0.5, 0.7, 0.9, 0.60, 0.61, 0.62], "trainable": 10})
    table = tables.carry_table(spec, frame).set_index("budget")
    assert table.loc["0.001", "cost"] == 0 and table.loc["0.001", "within spread"]
    assert table.loc["0.02", "cost"] == pytest.approx(1.0) and not table.loc["0.02", "within spread"]
    assert table.loc["0.02", "seed spread"] == pytest.approx(pd.Series([0.60, 0.61, 0.62]).std(ddof=0))
    (section,) = tables.carry_sections(spec, frame)
    assert "within the seed spread in 1 of 2 cells; the other 1 exceed it: cb/random/0.02." in section.note
    section.write(tmp_path)
    assert (tmp_path / "carry.csv").is_file()
    # a cell whose seeds are not all in (re-running at its own rate, per_budget) is not judged,
    # and the verdict says so instead of counting only the keys that could be judged
    (section,) = tables.carry_sections(spec, frame[frame.budget == "0.001"])
    assert "within the seed spread in 1 of 1 cells. Not judged yet (no complete cell): cb/random/0.02." in section.note


def test_a_carry_check_needs_the_budget_it_carries_from(tmp_path):
    with pytest.raises(UsageError, match="carry_check needs 'budget'"):
        _carry_spec(tmp_path, budget=None)
    with pytest.raises(UsageError, match="carry_check needs exactly one searched setting"):
        _carry_spec(tmp_path, params={"lr": {"low": 1e-4, "high": 1e-2}})


def test_a_grid_point_whose_trial_was_cut_off_is_measured_before_the_search_chooses(tmp_path, monkeypatch):
    """A worker killed mid-trial: the heartbeat fails that trial and queues a copy, but Optuna's
    GridSampler counts the failed trial as finished and stops the study with the copy still
    waiting (all-methods-cpu's sst2/ggm lost its lr=0.03 so). The point runs before choosing."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from peftbench.sweep.storage import open_storage

    spec = _spec(tmp_path)
    grid = spec.search.params["lr"].choices
    study = optuna.create_study(study_name=method_study(f"{spec.name}/search/cb/random", "random"),
                                storage=open_storage(spec),
                                direction="maximize",
                                sampler=optuna.samplers.GridSampler({"lr": grid}, seed=spec.search.seed))
    cut = study.ask()  # the killed worker's trial: running, never to end
    cut_lr = cut.suggest_categorical("lr", grid)
    runs = []

    def run_experiment(config, **kwargs):
        runs.append(config.train.lr)
        if len(runs) == 2:  # meanwhile the heartbeat finds it stale: failed, a copy queued
            study.tell(cut.number, state=TrialState.FAIL)
            RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study.trials[cut.number])
        return {"validation_main_mean": 1.0 if config.train.lr == cut_lr else 0.0}, Path("x")

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)
    best = search.run_search(spec, log=lambda *a: None)
    assert sorted(runs) == pytest.approx(sorted(grid))  # every point measured, the cut one once
    assert best["cb/random"]["train"]["lr"] == pytest.approx(cut_lr)
    assert len(best["cb/random"]["tried"]) == len(grid)


def test_a_grid_point_that_keeps_being_cut_off_is_an_error_not_a_silent_choice():
    import optuna
    from optuna.trial import TrialState

    from peftbench.sweep.claims import measure_cut_off_points

    study = optuna.create_study(direction="maximize")
    grid = {"lr": [1e-3, 1e-2]}

    def cut_off(trial):  # fails with no reason recorded, as a killed worker's trial does
        trial.suggest_categorical("lr", grid["lr"])
        raise RuntimeError("killed")

    for lr in grid["lr"]:
        study.enqueue_trial({"lr": lr})
    study.optimize(cut_off, n_trials=2, catch=(Exception,))
    assert {t.state for t in study.trials} == {TrialState.FAIL}
    with pytest.raises(UsageError, match=r"still have no finished trial"):
        measure_cut_off_points(study, grid, cut_off, "cb/random")


def _per_seed_runs(monkeypatch, runs: list):
    """Validation per seed: peaks at lr 1e-2 at 2% and 1e-3 elsewhere (log scale); seed 101
    scores 0.1 lower, so a setting's score shows whether both seeds went into its mean."""
    def run_experiment(config, **kwargs):
        runs.append((config.budget, config.train.lr, tuple(config.seeds)))
        peak = 1e-2 if config.budget == "0.02" else 1e-3
        values = [-(math.log10(config.train.lr) - math.log10(peak)) ** 2 - 0.1 * (s == 101) for s in config.seeds]
        return {"validation_main_mean": sum(values) / len(values)}, Path("x")

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)


@pytest.mark.slow
def test_the_per_budget_search_reads_the_carry_check_back_and_trains_only_the_other_seeds(tmp_path, monkeypatch):
    """`search: per_budget` (carrying the rate tuned at 0.5% cost several methods
    more than their seed spread): each other budget is tuned on the search's two seeds from the
    carry check's three values; seed 100's runs there are read back from carry.json, so only
    seed 101 trains at them; a value the edge rule adds trains both. The grid then runs each
    budget at its own rate."""
    runs = []
    _per_seed_runs(monkeypatch, runs)
    spec = _carry_spec(tmp_path, per_budget=True, widen=1)
    search.run_search(spec, log=lambda *a: None)
    with pytest.raises(UsageError, match="starts from the carry check, and 2 of its keys are not checked yet"):
        budgets.run_per_budget_search(spec, log=lambda *a: None)
    budgets.run_carry_check(spec, log=lambda *a: None)
    with pytest.raises(UsageError, match=r"2 \(task, method, budget\) key\(s\) are not tuned yet \(cb/random/0.001"):
        sweep_grid.enqueue_missing(storage.open_study(spec), spec)
    runs.clear()
    said = []
    tuned = budgets.run_per_budget_search(spec, log=said.append)
    assert sorted(tuned) == ["cb/random/0.001", "cb/random/0.02"]
    assert "per-budget search cb/random/0.02: best at the grid's edge; trying lr=0.1" in said  # which key widens
    assert _rows_match(sorted(r for r in runs if r[0] == "0.02"),
        [("0.02", 1e-4, (101,)), ("0.02", 1e-3, (101,)), ("0.02", 1e-2, (101,)), ("0.02", 1e-1, (100, 101))])
    at2 = tuned["cb/random/0.02"]
    assert at2["train"]["lr"] == pytest.approx(1e-2) and at2["carried"] == {"lr": 1e-3}
    assert at2["validation"] == pytest.approx(-0.05)  # (0 from carry.json's seed 100 + -0.1) / 2
    assert at2["seeds"] == [100, 101] and at2["read_back"] == {"carry.json": [100]}
    assert tuned["cb/random/0.001"]["train"]["lr"] == pytest.approx(1e-3)
    runs.clear()
    assert budgets.run_per_budget_search(spec, log=lambda *a: None) == tuned and not runs  # resumes

    best = sweep_records.tuned_settings(spec)
    lrs = {b: sweep_spec.cell_run_config(spec, sweep_spec.Cell("cb", "random", b, 0), best).train.lr
           for b in ("0.001", "0.005", "0.02")}
    assert lrs == pytest.approx({"0.001": 1e-3, "0.005": 1e-3, "0.02": 1e-2})
    prints = state.Fingerprints(spec)
    of = {b: prints.of(sweep_spec.Cell("cb", "random", b, 0)) for b in ("0.001", "0.005", "0.02")}
    # a budget whose own rate is the carried one keeps its settings, so its cells stand
    assert of["0.02"] != of["0.005"] == of["0.001"]
    assert sweep_grid.enqueue_missing(storage.open_study(spec), spec) == 3 * 3 + 3  # random x 3 budgets, bitfit


def test_a_per_budget_search_needs_the_carry_check_on_the_search_seeds(tmp_path):
    with pytest.raises(UsageError, match="per_budget starts from the carry check"):
        _carry_spec(tmp_path, per_budget=True, carry_check=None)
    with pytest.raises(UsageError, match=r"carry_check: \[7\], seeds: \[100, 101\]"):
        _carry_spec(tmp_path, per_budget=True, carry_check=[7])
    spec = _carry_spec(tmp_path)
    with pytest.raises(UsageError, match="has no 'search: per_budget: true'"):
        budgets.run_per_budget_search(spec, log=lambda *a: None)


@pytest.mark.slow
def test_a_key_stopped_mid_way_resumes_on_another_machine_from_its_committed_trials(tmp_path, monkeypatch):
    """Boards outlive a machine: a search stopped after two of a key's three settings keeps
    them in the board's `search-trials.json`; on a fresh machine (the sweep folder and its
    Optuna database gone) only the third trains, the choice and the `tried` list are the
    uninterrupted search's, and the log's rows go once the key is recorded. A row of another
    `peftbench.__version__` or another source of the method is not read back."""
    import shutil

    runs = _fake_runs(monkeypatch, peak=1e-3)
    reference = search.run_search(_spec(tmp_path / "reference", seeds=[100, 101]), log=lambda *a: None)
    board = tmp_path / "board"
    board.mkdir()
    spec = _spec(tmp_path, seeds=[100, 101])
    runs.clear()
    fake = experiment.run_experiment

    def stopped_after_two(config, **kwargs):
        if len(runs) == 2:
            raise KeyboardInterrupt  # the sitting ends (not an Exception: Optuna lets it through)
        return fake(config, **kwargs)

    monkeypatch.setattr(experiment, "run_experiment", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(spec, log=lambda *a: None, mirror=board / "search.json")
    log = json.loads((board / "search-trials.json").read_text())
    assert [len(rows) for rows in log.values()] == [2] and list(log) == ["cb/random"]
    assert not (board / "search.json").exists()
    finished = sorted(row["params"]["lr"] for row in log["cb/random"])

    shutil.rmtree(spec.out)  # another machine: only the board's committed files
    monkeypatch.setattr(experiment, "run_experiment", fake)
    runs.clear()
    best = search.run_search(spec, log=lambda *a: None, mirror=board / "search.json")
    assert len(runs) == 1 and runs[0][0] not in finished  # only the unfinished setting trained
    entry, expected = best["cb/random"], reference["cb/random"]
    assert entry["train"] == expected["train"] and entry["validation"] == pytest.approx(expected["validation"])
    assert _rows_match(sorted((t["params"]["lr"], t["validation"]) for t in entry["tried"]),
                       sorted((t["params"]["lr"], t["validation"]) for t in expected["tried"]))
    assert not (board / "search-trials.json").exists() and not (spec.out / "search-trials.json").exists()

    def resume_from(rows: dict) -> list[float]:
        """A fresh machine holding only the board's search-trials.json `rows`: the rates trained."""
        (board / "search-trials.json").write_text(json.dumps(rows))
        (board / "search.json").unlink()
        shutil.rmtree(spec.out)
        runs.clear()
        search.run_search(spec, log=lambda *a: None, mirror=board / "search.json")
        return [lr for lr, _ in runs]

    # a row written by another version of peftbench trains again
    stale = json.loads(json.dumps(log))
    stale["cb/random"][0]["version"] = "0.0.0"
    trained = resume_from(stale)
    assert len(trained) == 2 and sum(math.isclose(lr, stale["cb/random"][0]["params"]["lr"]) for lr in trained) == 1

    # a row the method's code did not make (its source changed since, or a row from before the
    # digest was recorded) trains again: a search trial goes stale with the method, as a cell does
    for code in ("0" * 64, None):
        rows = json.loads(json.dumps(log))
        if code is None:
            del rows["cb/random"][1]["code"]
        else:
            rows["cb/random"][1]["code"] = code
        trained = resume_from(rows)
        assert len(trained) == 2 and sum(math.isclose(lr, rows["cb/random"][1]["params"]["lr"]) for lr in trained) == 1


def test_a_changed_method_is_searched_again_in_a_study_of_its_own(tmp_path, monkeypatch):
    """The search study of a key is named by its method's source: with search.json gone, the
    same code reads its finished trials back from the database (at most one setting trains again:
    an exhausted grid sampler proposes one more point before the trial cap stops it), a changed
    method (another source digest) trains every setting again instead of counting the old
    code's trials."""
    from peftbench.training import identity as fingerprint

    runs = _fake_runs(monkeypatch, peak=1e-3)
    spec = _spec(tmp_path, seeds=[100, 101])
    search.run_search(spec, log=lambda *a: None)
    assert len(runs) == 3
    (spec.out / "search.json").unlink()
    runs.clear()
    search.run_search(spec, log=lambda *a: None)
    assert len(runs) <= 1

    real = fingerprint.code_identity
    monkeypatch.setattr(fingerprint, "code_identity",
                        lambda method, strict=True: {**real(method, strict), "source": "f" * 64})
    (spec.out / "search.json").unlink()
    runs.clear()
    search.run_search(spec, log=lambda *a: None)
    assert sorted(lr for lr, _ in runs) == pytest.approx([1e-4, 1e-3, 1e-2])


@pytest.mark.slow
def test_a_search_entry_made_by_other_code_of_its_method_is_searched_again(tmp_path, monkeypatch):
    """search.json records the method's source digest with each entry: the grid and the search
    take an entry only while the method is the code that made it; an entry without a digest
    (recorded before entries carried one) is kept."""
    from peftbench.training import identity as fingerprint

    runs = _fake_runs(monkeypatch, peak=1e-3)
    spec = _spec(tmp_path, seeds=[100, 101])
    best = search.run_search(spec, log=lambda *a: None)
    assert best["cb/random"]["code"] == fingerprint.code_identity("random", strict=False)["source"]
    assert sweep_records.tuned_settings(spec).keys() == {"cb/random"}

    record = json.loads((spec.out / "search.json").read_text())
    legacy = {k: {n: v for n, v in e.items() if n != "code"} for k, e in record.items()}
    (spec.out / "search.json").write_text(json.dumps(legacy))
    assert sweep_records.tuned_settings(spec).keys() == {"cb/random"}  # no digest: kept

    (spec.out / "search.json").write_text(json.dumps(record))
    real = fingerprint.code_identity
    monkeypatch.setattr(fingerprint, "code_identity",
                        lambda method, strict=True: {**real(method, strict), "source": "e" * 64})
    assert sweep_records.tuned_settings(spec) == {}  # the grid waits for a new search
    runs.clear()
    again = search.run_search(spec, log=lambda *a: None)
    assert sorted(lr for lr, _ in runs) == pytest.approx([1e-4, 1e-3, 1e-2]) and again["cb/random"]["code"] == "e" * 64

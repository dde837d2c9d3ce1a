"""The search: tuning seeds apart from the reported ones, and the edge rule that widens a grid
whose best value sits at its edge (fixed in the spec before the search runs)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from peftbench import experiment, sweep
from peftbench.errors import UsageError


def _spec(tmp_path, **search):
    return sweep.parse_spec({
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
    best = sweep.run_search(_spec(tmp_path, widen=3, seeds=[100, 101]), log=lambda *a: None)
    lrs = sorted(lr for lr, _ in runs)
    # 1e-4 best of the grid -> 1e-5 (best, edge again) -> 1e-6 (worse): 1e-5 is inside, stop
    assert lrs == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    assert best["cb/random"]["train"]["lr"] == pytest.approx(1e-5)
    assert {seeds for _, seeds in runs} == {(100, 101)} and best["cb/random"]["seeds"] == [100, 101]
    assert len(best["cb/random"]["tried"]) == 5


def test_widening_stops_at_its_limit_and_not_for_an_inside_best(tmp_path, monkeypatch):
    runs = _fake_runs(monkeypatch, peak=10.0)
    best = sweep.run_search(_spec(tmp_path, widen=1), log=lambda *a: None)
    assert sorted(lr for lr, _ in runs) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert best["cb/random"]["train"]["lr"] == pytest.approx(1e-1)  # at the limit: said, kept
    runs = _fake_runs(monkeypatch, peak=1e-3)
    sweep.run_search(_spec(tmp_path / "inside", widen=2), log=lambda *a: None)
    assert sorted(lr for lr, _ in runs) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert {seeds for _, seeds in runs} == {(0,)}  # default: the spec's first seed


def test_widen_needs_one_numeric_grid(tmp_path):
    with pytest.raises(UsageError, match="widen needs exactly one searched setting"):
        sweep.parse_spec({"name": "w", "tasks": ["cb"], "methods": ["random"],
                          "search": {"params": {"lr": {"low": 1e-4, "high": 1e-2}}, "widen": 1}})
    with pytest.raises(UsageError, match="seeds"):
        sweep.parse_spec({"name": "w", "tasks": ["cb"], "methods": ["random"],
                          "search": {"params": {"lr": {"choices": [1e-4]}}, "seeds": []}})


def test_two_search_workers_split_the_pairs_and_lose_none(tmp_path, tiny_model_dir, monkeypatch):
    """`leaderboard run --workers 2` on a spec with a search: two `leaderboard search` workers
    take the untuned pairs between them (each pair searched once), and every pair's entry is in
    the committed search.json, whatever order they finish in."""
    import json
    import os

    import yaml

    from peftbench.cli import main

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
    import json

    import yaml

    from peftbench.errors import UsageError

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "model": tiny_model_dir, "tasks": ["rte"], "methods": {"random": {}, "bitfit": {}},
        "budgets": [0.01], "seeds": 1, "limit": 8, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "out"),
        "search": {"params": {"lr": {"choices": [1e-3, 1e-2]}}, "trials": 2, "pruner": "none"}}))
    spec = sweep.load_spec(path)
    sweep.claim_out(spec)  # the sweep's folder, as a search leaves it
    (tmp_path / "out" / "search.json").write_text(json.dumps({"rte/random": {"train": {"lr": 0.01}, "method": {}}}))
    with pytest.raises(UsageError, match=r"1 \(task, method\) pair\(s\) are not tuned yet \(rte/bitfit;"):
        sweep.run_grid(spec, log=lambda *a: None)
    assert not (tmp_path / "out" / "runs").exists()

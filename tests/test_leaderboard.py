"""Leaderboards end to end on a tiny model and real CB rows: run, files, show; plots' maths."""
from __future__ import annotations

import pandas as pd
import yaml

from peftbench import plots
from peftbench.cli import main


def test_leaderboard_run_writes_tables_and_plots_then_show_prints_them(tmp_path, tiny_model_dir,
                                                                        monkeypatch, capsys):
    board = tmp_path / "boards" / "tiny"
    board.mkdir(parents=True)
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "description": "test board", "model": tiny_model_dir, "tasks": ["cb"],
        "methods": {"magpruning": {}, "bitfit": {}}, "budgets": [0.01, 0.05], "seeds": 2,
        "limit": 16, "train": {"epochs": 1}, "output_dir": str(tmp_path / "sweep"),
        "published": {"cb": {"bitfit": "86.96±3.20", "magpruning": "81.25±3.50"}}}))
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    assert main(["leaderboard", "run", "tiny"]) == 0
    for name in ("README.md", "results.csv", "cells.csv", "table1-b0.01.csv", "tests.csv",
                 "published.csv", "overlap.csv", "pareto.png", "pareto.html", "spend.png"):
        assert (board / name).is_file() and (board / name).stat().st_size > 0, name
    results = pd.read_csv(board / "results.csv")
    assert len(results) == 2 * 2 + 2  # magpruning x 2 budgets x 2 seeds + bitfit x 2 seeds
    capsys.readouterr()
    assert main(["leaderboard", "show", "tiny"]) == 0
    shown = capsys.readouterr().out
    assert "Leaderboard tiny" in shown and "bitfit" in shown and "Against the published" in shown
    assert main(["leaderboard", "show", "nope"]) == 2


def test_pareto_points_are_the_non_dominated_ones():
    points = pd.DataFrame({"trainable": [10, 100, 1000, 100, 50], "mean": [0.5, 0.7, 0.6, 0.4, 0.7]})
    front = plots.pareto_points(points)
    assert front.index.tolist() == [0, 4]  # 1 (same mean, more params) and 2, 3 are dominated


def test_report_from_run_directories_and_status_and_bad_inputs(tmp_path, tiny_model_dir, capsys):
    for method in ("random", "magpruning"):
        assert main(["run", "--method", method, "--task", "cb", "--budget", "0.01", "--seeds", "2",
                     "--model", tiny_model_dir, "--epochs", "1", "--limit", "16",
                     "--output-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| magpruning |" in out and "Spearman" in out and "Jaccard" in out
    cells = pd.read_csv(tmp_path / "rep" / "cells.csv")
    assert sorted(cells.method) == ["magpruning", "random"] and set(cells.seeds) == {2}
    assert main(["report", "--runs", str(tmp_path / "empty")]) == 2
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert main(["report"]) == 2
    assert "needs a NAME" in (main(["leaderboard", "run"]) == 2 and capsys.readouterr().err)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "model": tiny_model_dir, "tasks": ["cb"],
                                    "methods": ["bitfit"], "seeds": 1, "limit": 8,
                                    "output_dir": str(tmp_path / "s")}))
    assert main(["status", str(spec)]) == 0
    assert "0/1 cells done" in capsys.readouterr().out


def test_fu_table1_runs_fus_variants_or_marks_the_row():
    from peftbench import leaderboard, sweep

    spec = sweep.load_spec(leaderboard.find("fu2023-table1") / "spec.yaml")
    assert spec.methods["random"]["scope"] == "tensor" and spec.methods["mixout"]["mode"] == "eval"
    assert spec.methods["adapter"] == {"placement": "pfeiffer", "activation": "relu"}
    assert {"mixout", "magpruning", "diffpruning", "lora"} <= set(spec.method_notes)
    shown = leaderboard.published_only(spec)
    assert all(f"- {m}: " in shown for m in spec.method_notes)

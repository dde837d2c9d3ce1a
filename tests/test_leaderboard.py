"""Leaderboards end to end on a tiny model and real CB rows: run, files, show; plots' maths."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from peftbench.analysis import checks, ranks
from peftbench.board import paths as board_paths
from peftbench.board import phases, tables, verify
from peftbench.cli.main import main
from peftbench.rendering import interactive, plots, styles
from peftbench.sweep import spec as sweep_spec


@pytest.mark.slow
def test_leaderboard_run_writes_tables_and_plots_then_show_prints_them(tmp_path, tiny_model_dir,
                                                                        monkeypatch, capsys):
    board = tmp_path / "boards" / "tiny"
    board.mkdir(parents=True)
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "description": "test board", "model": tiny_model_dir, "tasks": ["cb"],
        "protocol": "Cut: 1 task of 7, for time.",
        "methods": {"magpruning": {}, "bitfit": {}}, "budgets": [0.01, 0.05], "seeds": 2,
        "limit": 16, "train": {"epochs": 1}, "output_dir": str(tmp_path / "sweep"),
        "published": {"cb": {"bitfit": "86.96±3.20", "magpruning": "81.25±3.50"}}}))
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    assert main(["leaderboard", "run", "tiny"]) == 0
    for name in ("README.md", "results.csv", "cells.csv", "table1-b0.01.csv", "tests.csv",
                 "published.csv", "overlap.csv", "pareto.png", "pareto.pdf", "pareto.svg",
                 "pareto.html", "spend.png", "index.html"):
        assert (board / name).is_file() and (board / name).stat().st_size > 0, name
    results = pd.read_csv(board / "results.csv")
    assert len(results) == 2 * 2 + 2  # magpruning x 2 budgets x 2 seeds + bitfit x 2 seeds
    # every cell's config.json and result.json are committed beside the page and linked from it
    committed = sorted(p.relative_to(board).as_posix() for p in (board / "runs").rglob("*.json"))
    assert len([p for p in committed if p.endswith("result.json")]) == len(results)
    page = (board / "index.html").read_text()
    assert all(f'href="{p}"' in page for p in committed)
    assert not any(str(tmp_path) in p.read_text() for p in (board / "runs").rglob("*.json"))  # no path of this machine
    result = json.loads(next((board / "runs").rglob("*result.json")).read_text())
    assert result["peak_memory"]["training_bytes"] > 0 and result["steps_per_s"] > 0
    capsys.readouterr()
    assert main(["leaderboard", "show", "tiny"]) == 0
    shown = capsys.readouterr().out
    assert "Leaderboard tiny" in shown and "bitfit" in shown and "Against the published" in shown
    assert "### Protocol, and what was cut\n\nCut: 1 task of 7, for time." in shown
    from peftbench.training.identity import machine_fingerprint
    assert f"- cells ran on: {machine_fingerprint('cpu')['device']} (6 cells)\n" in shown
    assert main(["leaderboard", "show", "nope"]) == 2
    assert (tmp_path / "boards" / "plotly.min.js").is_file() and (tmp_path / "boards" / "index.html").is_file()
    assert 'src="../plotly.min.js"' in (board / "pareto.html").read_text()


def test_pareto_points_are_the_non_dominated_ones():
    points = pd.DataFrame({"trainable": [10, 100, 1000, 100, 50], "mean": [0.5, 0.7, 0.6, 0.4, 0.7]})
    front = styles.pareto_points(points)
    assert front.index.tolist() == [0, 4]  # 1 (same mean, more params) and 2, 3 are dominated


@pytest.mark.slow
def test_report_from_run_directories_and_status_and_bad_inputs(tmp_path, tiny_model_dir, capsys, monkeypatch):
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
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing is written into the working folder unless asked
    assert main(["report", "--runs", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "report" / "report.md").is_file() and not list(elsewhere.iterdir())
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

    spec = sweep_spec.load_spec(board_paths.find("fu2023-table1") / "spec.yaml")
    assert spec.methods["random"]["scope"] == "tensor" and spec.methods["mixout"]["mode"] == "eval"
    assert spec.methods["adapter"] == {"placement": "pfeiffer", "activation": "relu"}
    assert {"mixout", "magpruning", "diffpruning", "lora"} <= set(spec.method_notes)
    shown = verify.published_only(spec)
    assert all(f"- {m}: " in shown for m in spec.method_notes)


def _synthetic_frame():
    rows = []
    for budget in ("0.001", "0.005"):
        for i, method in enumerate(["random", "magpruning", "sam", "fish"]):
            for seed in range(3):
                rows.append({"task": "cb", "method": method, "budget": budget, "seed": seed,
                             "metric": 0.5 + 0.05 * i + 0.01 * seed, "trainable": int(float(budget) * 1000),
                             "pretrained_entries": 1000, "constant_metric": 0.4, "test_rows": 55,
                             "metric_name": "accuracy+macro_f1", "model": "default", "spend": {},
                             "scoring_time_s": 1.0, "train_time_s": 2.0})
    return pd.DataFrame(rows)


def test_pareto_figure_names_its_metric_dodges_equal_counts_and_writes_pdf_svg(tmp_path):
    import matplotlib

    frame = _synthetic_frame()
    paths = plots.pareto_png(frame, tmp_path / "pareto.png")
    assert [p.suffix for p in paths] == [".png", ".pdf", ".svg"] and all(p.stat().st_size for p in paths)
    svg = (tmp_path / "pareto.svg").read_text()
    assert "(accuracy + macro-F1)/2 x 100" in svg and "3 seeds" in svg and "budget 0.1%" in svg
    assert "p = 0.001" not in svg  # a budget line must not read as a p-value
    style = styles.styles(sorted(frame.method.unique()))
    assert len({v for v in style.values()}) == 4
    assert len({matplotlib.colors.to_rgb(c) for c, _, _ in style.values()}) == 4
    figure = interactive.pareto_figure(frame)  # the interactive plot dodges equal counts too
    xs = {trace.name: list(trace.x) for trace in figure.data if trace.name in style}
    natural = [x[0] for x in xs.values() if len(x) == 1]
    assert len(natural) == len(set(natural))


def test_the_legend_names_methods_that_ran_on_one_task_only(tmp_path):
    """A partial board (or a plugin tried on one task) has panels with different methods: the
    one legend must name them all, not only the last panel's; the interactive plot likewise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    axes[0].plot([1, 2], [1, 2], label="sam")
    axes[0].plot([1, 2], [2, 1], label="random")
    axes[1].plot([1, 2], [1, 2], label="random")
    styles.legend_beside(axes)
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["sam", "random"]
    plt.close(fig)

    frame = _synthetic_frame()
    other = frame[frame.method != "sam"].assign(task="rte")  # sam ran on cb only
    frame = pd.concat([frame, other], ignore_index=True)
    plots.pareto_png(frame, tmp_path / "pareto.png")
    svg = (tmp_path / "pareto.svg").read_text()
    assert "<!-- sam -->" in svg  # tasks sort cb, rte: sam is in the first panel only
    named = [t.name for t in interactive.pareto_figure(frame).data if t.showlegend is not False]
    assert sorted(named) == sorted(set(named)) and {"sam", "fish", "Pareto front"} <= set(named)
    figure = interactive.pareto_figure(frame.assign(task=frame.task.map({"cb": "zz", "rte": "rte"})))
    assert "sam" in [t.name for t in figure.data if t.showlegend is not False]  # now the 2nd panel


def test_one_look_per_method_in_every_figure():
    """The fixed table: every built-in has a (colour, marker, line) of its own, colours from
    Okabe & Ito's colour-blind-safe set; a plugin's look is derived from its name, stably."""
    from peftbench.contract import registry

    builtins = [n for n, info in registry.methods().items() if info.package == "peftbench"]
    looks = [styles.method_style(m) for m in builtins]
    assert set(builtins) <= set(styles.METHOD_STYLE) and len(set(looks)) == len(looks)
    assert {c for c, _, _ in looks} <= set(styles.PALETTE) | {styles.GREY}
    assert len({(c, m) for c, m, _ in looks}) == len(looks)  # colour + marker alone tell them apart
    assert styles.method_style("my-plugin") == styles.method_style("my-plugin") != styles.method_style("other")


def test_critical_difference_diagram_per_budget_from_tasks_only_with_enough_of_them(tmp_path):

    one_task = ranks.friedman_by_budget(pd.concat([_synthetic_frame(), _synthetic_frame().assign(task="rte")]))
    assert [r["descriptive"] for r in one_task] == [True, True]  # 2 tasks: no pairwise test, no diagram
    frame = pd.concat([_synthetic_frame().assign(task=f"t{i}", metric=lambda d, i=i: d.metric + 0.001 * i)
                       for i in range(6)])
    ranking = ranks.friedman_by_budget(frame)[0]
    assert ranking["n_tasks"] == 6 and list(ranking["ranks"].index) == ["fish", "sam", "magpruning", "random"]
    assert plots.cd_png(ranking, tmp_path / "cd.png").stat().st_size > 0


def test_small_n_spearman_p_is_exact():

    rho, p = ranks.spearman([1, 2, 3, 4], [4, 3, 2, 1])
    assert rho == -1 and p == pytest.approx(2 / 24)


def test_exact_spearman_p_at_eight_cells_orders_one_sample_only():
    """At n = 8 scipy's two-sample pairings enumerate (8!)^2 = 1.6e9 orderings (21 GiB, killed
    on this machine while a board's report ran); one sample's 8! give the same p. With ties
    (n = 7) the p equals a count over every ordering made here with scipy's own spearmanr."""
    import itertools
    import math

    import numpy as np
    import scipy.stats


    rho, p = ranks.spearman(list(range(8)), list(range(8))[::-1])
    assert rho == -1 and p == pytest.approx(2 / math.factorial(8))  # only the reversal reaches -1
    x, y = [1, 2, 2, 3, 5, 5, 7], [3, 1, 2, 2, 6, 4, 4]
    observed = scipy.stats.spearmanr(x, y)[0]
    null = np.array([scipy.stats.spearmanr(x, order)[0] for order in itertools.permutations(y)])
    tol = 1e-12
    expected = min(1.0, 2 * min(np.mean(null >= observed - tol), np.mean(null <= observed + tol)))
    rho, p = ranks.spearman(x, y)
    assert rho == pytest.approx(observed) and p == pytest.approx(expected)


@pytest.mark.slow
def test_leaderboard_with_a_search_commits_search_json_and_reuses_it(tmp_path, tiny_model_dir, monkeypatch):
    """`leaderboard run` searches first when the spec has `search:`, commits search.json beside
    the spec, trains the grid at the tuned values, and a second run (another machine: no sweep
    folder) reads the committed file instead of searching again."""
    from peftbench.training import experiment

    board = tmp_path / "boards" / "tuned"
    board.mkdir(parents=True)
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "tuned", "model": tiny_model_dir, "tasks": ["cb"], "methods": {"random": {}},
        "budgets": [0.01], "seeds": 1, "limit": 16, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-3, 1.0e-2]}}, "pruner": "none"}}))
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    assert main(["leaderboard", "run", "tuned"]) == 0
    tuned = json.loads((board / "search.json").read_text())
    assert tuned["cb/random"]["trials"] == 2
    result = json.loads(next((board / "runs").rglob("*result.json")).read_text())
    config = json.loads(next((board / "runs").rglob("config.json")).read_text())
    assert config["train"]["lr"] == tuned["cb/random"]["train"]["lr"] and result["steps_per_s"] > 0
    searched, original = [], experiment.run_experiment
    monkeypatch.setattr(experiment, "run_experiment", lambda config, *a, **k: (
        searched.append(1) if "search-runs" in config.output_dir else None) or original(config, *a, **k))
    assert main(["leaderboard", "run", "tuned", "--output-dir", str(tmp_path / "elsewhere")]) == 0
    assert searched == [] and json.loads((board / "search.json").read_text()) == tuned
    assert (tmp_path / "elsewhere" / "search.json").is_file()  # the grid there used the committed values
    # every setting tried is recorded with its validation score, and shown on the board
    assert sorted(t["params"]["lr"] for t in tuned["cb/random"]["tried"]) == [1.0e-3, 1.0e-2]
    assert max(t["validation"] for t in tuned["cb/random"]["tried"]) == tuned["cb/random"]["validation"]
    table = pd.read_csv(board / "search.csv")
    assert list(table.columns) == ["task", "method", "lr=0.001", "lr=0.01", "chosen", "validation"]
    assert "### Settings chosen on validation" in (board / "README.md").read_text()
    # a search.json written before "tried" was recorded gets it from the study that is still there
    del tuned["cb/random"]["tried"]
    (board / "search.json").write_text(json.dumps(tuned))
    assert main(["leaderboard", "run", "tuned"]) == 0 and searched == []
    assert len(json.loads((board / "search.json").read_text())["cb/random"]["tried"]) == 2


@pytest.mark.slow
def test_a_method_edited_since_the_study_ran_is_refused_before_the_search(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The study on this machine holds cells its method's old code made: `leaderboard run`
    refuses at once, naming them, instead of searching again for an hour and a half and then
    refusing at the grid. `--restart-changed` searches and runs them afresh."""
    from peftbench.sweep import search as sweep_search
    from peftbench.training import identity

    board = tmp_path / "boards" / "edited"
    board.mkdir(parents=True)
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "edited", "model": tiny_model_dir, "tasks": ["cb"], "methods": {"random": {}},
        "budgets": [0.01], "seeds": 1, "limit": 16, "train": {"epochs": 1, "max_steps": 2},
        "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-3, 1.0e-2]}}, "pruner": "none"}}))
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    assert main(["leaderboard", "run", "edited"]) == 0
    real = identity.code_identity
    edited = lambda method, strict=True: {**real(method, strict), "source": "edited"}  # noqa: E731
    monkeypatch.setattr(identity, "code_identity", edited)
    monkeypatch.setattr(sweep_spec, "code_identity", edited)
    searched, original = [], sweep_search.run_search
    monkeypatch.setattr(sweep_search, "run_search", lambda *a, **k: searched.append(1) or original(*a, **k))
    capsys.readouterr()
    assert main(["leaderboard", "run", "edited"]) == 2
    err = capsys.readouterr().err
    assert "1 of these cells run with other code" in err and "code.source:" in err and "-> edited" in err
    assert "cb/random/b0.01/s0" in err and "--restart-changed" in err and searched == []
    assert main(["leaderboard", "run", "edited", "--restart-changed"]) == 0 and searched == [1]


def _tuned_board(tmp_path, tiny_model_dir, monkeypatch, name: str, reported: int, **search) -> Path:
    """A one-method board with a two-rate search at 1% on seed 7 (`search` over that) and a
    carry check on seed 7."""
    board = tmp_path / "boards" / name
    board.mkdir(parents=True)
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": name, "model": tiny_model_dir, "tasks": ["cb"], "methods": {"random": {}},
        "budgets": [0.01, 0.02], "seeds": reported, "limit": 16, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-3, 1.0e-2]}}, "pruner": "none", "seeds": [7],
                   "budget": 0.01, "carry_check": [7], **search}}))
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    return board


@pytest.mark.slow
def test_a_boards_carry_check_runs_after_the_grid_is_committed_and_shown(tmp_path, tiny_model_dir, monkeypatch):
    """`search: carry_check`: after the grid, the carried rate and its neighbours at
    the other budget, on the check's own seed; carry.json is committed beside search.json, read
    back by a run elsewhere (nothing trained again), and the README and page show the table."""
    from peftbench.training import experiment

    board = _tuned_board(tmp_path, tiny_model_dir, monkeypatch, "carried", reported=2)
    assert main(["leaderboard", "run", "carried"]) == 0
    carry = json.loads((board / "carry.json").read_text())
    lr = json.loads((board / "search.json").read_text())["cb/random"]["train"]["lr"]
    assert list(carry) == ["cb/random/0.02"] and carry["cb/random/0.02"]["carried"] == {"lr": lr}
    assert sorted(t["params"]["lr"] for t in carry["cb/random/0.02"]["tried"]) == pytest.approx(
        sorted([lr / 10, lr, lr * 10]))
    table = pd.read_csv(board / "carry.csv")
    assert table["seed spread"].notna().all() and "Carrying the tuned rate" in (board / "README.md").read_text()
    assert "Carrying the tuned rate" in (board / "index.html").read_text()
    trained, original = [], experiment.run_experiment
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: trained.append(1) or original(*a, **k))
    assert main(["leaderboard", "run", "carried", "--output-dir", str(tmp_path / "elsewhere")]) == 0
    assert trained == [] and json.loads((board / "carry.json").read_text()) == carry


@pytest.mark.slow
def test_a_board_tuned_per_budget_runs_its_grid_at_each_budgets_own_rate(tmp_path, tiny_model_dir, monkeypatch):
    """`search: per_budget`: search, carry check, per-budget search, then the grid;
    per-budget.json is committed, each budget's cells run at its own rate, the README shows the
    per-budget table and says how long it took; a run elsewhere trains nothing again."""
    from peftbench.training import experiment

    board = _tuned_board(tmp_path, tiny_model_dir, monkeypatch, "perbudget", reported=1, seeds=[7, 8],
                         per_budget=True)
    assert main(["leaderboard", "run", "perbudget"]) == 0
    tuned = json.loads((board / "per-budget.json").read_text())
    assert list(tuned) == ["cb/random/0.02"] and tuned["cb/random/0.02"]["seeds"] == [7, 8]
    settings = pd.read_csv(board / "settings.csv", dtype={"budget": str}).set_index("budget")
    assert settings.loc["0.02", "lr"] == pytest.approx(tuned["cb/random/0.02"]["train"]["lr"])
    assert settings.loc["0.02", "from"].startswith("per-budget search")
    cells = [json.loads(p.read_text()) for p in (board / "runs").rglob("cell.json")]
    lrs = {c["budget"]: c["config"]["train"]["lr"] for c in cells}
    assert lrs == pytest.approx({"0.01": json.loads((board / "search.json").read_text())["cb/random"]["train"]["lr"],
                                 "0.02": tuned["cb/random/0.02"]["train"]["lr"]})
    readme = (board / "README.md").read_text()
    assert "Settings tuned at each budget" in readme and "per-budget search" in readme
    assert (board / "per-budget.csv").is_file() and "Settings tuned at each budget" in (board / "index.html").read_text()
    assert pd.read_csv(board / "per-budget.csv")["carried"].tolist() == [
        f"lr={json.loads((board / 'search.json').read_text())['cb/random']['train']['lr']:g}"]
    trained, original = [], experiment.run_experiment
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: trained.append(1) or original(*a, **k))
    assert main(["leaderboard", "run", "perbudget", "--output-dir", str(tmp_path / "elsewhere")]) == 0
    assert trained == [] and json.loads((board / "per-budget.json").read_text()) == tuned


def test_a_board_whose_per_budget_search_is_unfinished_says_it_is_not_final():
    """A complete grid at the carried rate is not the board a per-budget spec promises: the
    README opens by naming the keys still waiting for their own rate, complete grid or not."""

    done = {"done": 6, "expected": 6, "missing": {}, "complete": set(), "groups": 2}
    assert tables.partial_lines(done) == []
    lines = tables.partial_lines(done, ["cb/random/0.02"])
    assert lines[0].startswith("**Not final: 1 (task, method, budget) key(s)") and "cb/random/0.02." in lines[0]
    partial = {**done, "done": 5, "missing": {("cb", "random", "0.02"): [1]}}
    text = "\n".join(tables.partial_lines(partial, ["cb/random/0.02"]))
    assert text.startswith("**Partial board: 5 of 6 cells.**") and "**Not final: 1" in text


def test_report_on_a_published_only_board_keeps_its_published_page(tmp_path):
    """`leaderboard report` on a board with the paper's numbers and none of ours rewrites its
    published-numbers page; it wrote a "0 of 630 cells" partial board over it."""
    import shutil


    board = tmp_path / "fu2023-table1"
    shutil.copytree(board_paths.find("fu2023-table1"), board)
    text = phases.refresh(str(board), output_dir=str(tmp_path / "sweep"))
    assert "published numbers only" in text
    assert "published numbers only" in (board / "index.html").read_text()
    assert not (board / "progress.csv").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_the_board_says_its_search_grid_and_carry_check_time(tmp_path):
    """The README gives the total sweep time and the search time: every trial's
    wall time, summed per phase, from the committed records and cells."""
    from types import SimpleNamespace


    (tmp_path / "search.json").write_text(json.dumps(
        {"cb/random": {"tried": [{"duration_s": 1800.0}, {"duration_s": 1800.0}]}}))
    (tmp_path / "carry.json").write_text(json.dumps({"cb/random/0.01": {"tried": [{"duration_s": 900.0}]}}))
    spec = SimpleNamespace(out=tmp_path, search=object())
    frame = pd.DataFrame({"duration_s": [3600.0, 3600.0]})
    line = tables.time_line(spec, frame)
    assert "search 1.00 h + grid 2.00 h + carry check 0.25 h = 3.25 h" in line
    (tmp_path / "carry.json").unlink()
    assert "search 1.00 h + grid 0.00 h = 1.00 h (no complete group" in \
        tables.time_line(spec, pd.DataFrame())
    assert tables.time_line(SimpleNamespace(out=tmp_path, search=None), frame).endswith("grid 2.00 h")


def test_a_board_grown_on_two_machines_says_so_and_splits_its_cost_by_device():
    """Cells of one board come from several machines (the committed cells are the store); a
    mean of seconds over two CPUs measures the mix, so the cost table splits by device then,
    and the header counts the cells each device ran. One device: the table is per method."""

    frame = pd.DataFrame({
        "method": ["random"] * 3 + ["bitfit"] * 2, "device": ["cpu: A", "cpu: A", "cpu: B", "cpu: A", "cpu: A"],
        "scoring_time_s": [1.0, 3.0, 10.0, 0.0, 0.0], "train_time_s": [10.0, 20.0, 60.0, 5.0, 7.0],
        "steps_per_s": [3.0, 3.0, 1.0, 4.0, 4.0], "peak_memory_mb": [100.0, 120.0, 90.0, 50.0, 60.0],
        "load_1min": [2.0] * 5})
    cost = checks.cost_table(frame)
    random = cost.loc["random"].set_index("device")
    assert random.loc["cpu: A", "training_s"] == 15.0 and random.loc["cpu: B", "training_s"] == 60.0
    assert random.loc["cpu: A", "runs"] == 2 and random.loc["cpu: B", "runs"] == 1
    assert cost.loc["bitfit", "device"] == "cpu: A" and cost.loc["bitfit", "peak_memory_mb"] == 60.0
    assert tables.devices_line(frame) == (
        "- cells ran on: cpu: A (4 cells), cpu: B (1 cell); timings compare only within one "
        "device: the cost table has a row per method, task and device")
    one = frame[frame.device == "cpu: A"]
    assert list(checks.cost_table(one).columns) == [
        "scoring_s", "training_s", "steps_per_s", "peak_memory_mb", "load_1min"]
    assert checks.cost_table(one).loc["random", "training_s"] == 15.0
    assert tables.devices_line(frame.assign(device="")) == "- cells ran on: not recorded (5 cells)"
    # two tasks (STS-B's pairs cost more per step than SST-2's sentences): a row per task too
    tasks = one.assign(task=["sst2", "stsb", "sst2", "sst2"])
    split = checks.cost_table(tasks)
    assert list(split.columns) == ["task", "scoring_s", "training_s", "steps_per_s", "peak_memory_mb",
                                   "load_1min", "runs"]
    random = split.loc["random"].set_index("task")
    assert random.loc["sst2", "training_s"] == 10.0 and random.loc["stsb", "training_s"] == 20.0
    assert split.loc["bitfit", "runs"] == 2 and split.loc["bitfit", "task"] == "sst2"
    assert list(checks.cost_table(frame.assign(task=["sst2", "stsb"] * 2 + ["sst2"])).columns[:2]) == [
        "task", "device"]
    assert tables.devices_line(frame.drop(columns="device")) is None


@pytest.mark.slow
def test_the_per_budget_table_lists_keys_in_the_specs_order_with_the_carried_setting(tmp_path):
    """Workers finish keys in any order; the table reads task by task, method by method, budget
    by budget, and shows the carried rate beside the chosen one."""
    from types import SimpleNamespace


    spec = SimpleNamespace(out=tmp_path, tasks=["sst2", "stsb"], methods={"random": {}, "sam": {}},
                           budgets=["0.005", "0.001", "0.02"],
                           search=SimpleNamespace(per_budget=True, budget="0.005", params={"lr": None},
                                                  seeds=[100, 101]))

    def entry(carried, chosen):
        return {"train": {"lr": chosen}, "method": {}, "validation": 0.8, "carried": {"lr": carried},
                "tried": [{"params": {"lr": v}, "validation": 0.8, "state": "complete"} for v in (carried, chosen)]}

    finished = ["stsb/sam/0.02", "sst2/random/0.02", "stsb/random/0.001", "sst2/sam/0.001", "sst2/random/0.001"]
    (tmp_path / "per-budget.json").write_text(json.dumps({k: entry(0.01, 0.03 if "0.001" in k else 0.01)
                                                          for k in finished}))
    (section,) = tables.per_budget_sections(spec)
    section.write(tmp_path)
    table = pd.read_csv(tmp_path / "per-budget.csv", dtype={"budget": str})
    assert ["/".join(r) for r in table[["task", "method", "budget"]].itertuples(index=False)] == [
        "sst2/random/0.001", "sst2/random/0.02", "sst2/sam/0.001", "stsb/random/0.001", "stsb/sam/0.02"]
    assert table.carried.tolist() == ["lr=0.01"] * 5
    assert table.chosen.tolist() == ["lr=0.03", "lr=0.01", "lr=0.03", "lr=0.03", "lr=0.01"]
    assert "5 of 8 keys tuned; the chosen lr differs from the carried one in 3 of them (blank" in section.note
    # a rate not tried for a row is blank in the Markdown, not "nan" (the CSV keeps it empty)
    shown = section.markdown().split("\n\n")[2]
    markdown = shown.splitlines()
    assert "nan" not in shown and markdown[3].startswith("| sst2   | random   |   0.0200 |")
    assert [c.strip() for c in markdown[3].split("|")][4:6] == ["0.8000", ""]


def test_preparing_a_sweep_folder_replaces_its_records_whole(tmp_path, tiny_model_dir):
    """`run --workers N` starts N workers that each copy the board's records into the sweep
    folder while the others read them: a record rewritten in place was read empty by a worker
    ("search.json is not valid JSON ... char 0") and the search phase failed. A record is now
    replaced whole (a new file renamed into place), and one already equal is left alone."""
    board = tmp_path / "board"
    board.mkdir()
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "board", "model": tiny_model_dir, "tasks": ["cb"], "methods": {"random": {}},
        "budgets": [0.01], "seeds": 1, "output_dir": str(tmp_path / "sweep"),
        "search": {"params": {"lr": {"choices": [1.0e-3, 1.0e-2]}}}}))
    committed = {"cb/random": {"train": {"lr": 1.0e-3}, "method": {}, "validation": 0.5, "trials": 2}}
    (board / "search.json").write_text(json.dumps(committed))
    spec = sweep_spec.load_spec(board / "spec.yaml")
    phases._prepare(board, spec)
    working = spec.out / "search.json"
    assert json.loads(working.read_text()) == committed
    before = working.stat()
    phases._prepare(board, spec)  # the same bytes: untouched
    assert working.stat().st_ino == before.st_ino and working.stat().st_mtime_ns == before.st_mtime_ns
    working.write_text("{}")
    inode = working.stat().st_ino
    with open(working) as reader:  # a worker that opened the old record keeps reading it whole
        phases._prepare(board, spec)
        assert reader.read() == "{}"
    assert working.stat().st_ino != inode and json.loads(working.read_text()) == committed

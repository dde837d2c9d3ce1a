"""Committed cells are a board's store: a board interrupted after some cells resumes on a fresh
clone (no sweep folder) from the committed ones; a partial board says k of n; `verify` re-runs
committed cells and compares."""
from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import yaml

from peftbench.cli.main import main
from peftbench.training import experiment


def _board(tmp_path, tiny_model_dir, seeds=2):
    board = tmp_path / "boards" / "store"
    board.mkdir(parents=True)
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "store", "description": "store test", "model": tiny_model_dir, "tasks": ["cb"],
        "methods": {"magpruning": {}, "bitfit": {}}, "budgets": [0.01], "seeds": seeds,
        "limit": 16, "train": {"epochs": 1, "max_steps": 2}, "output_dir": str(tmp_path / "sweep")}))
    return board


@pytest.mark.slow
def test_interrupted_board_resumes_on_a_fresh_clone_from_the_committed_cells(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    board = _board(tmp_path, tiny_model_dir)
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    calls, original = [], experiment.run_experiment

    def stop_after_two(config, *args, **kwargs):
        calls.append(config.method)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(config, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_experiment", stop_after_two)
    assert main(["leaderboard", "run", "store"]) == 130
    committed = sorted(p.parent.name for p in (board / "runs").glob("*/cell.json"))
    assert len(committed) == 2  # each cell committed as it finished, not at the end
    # the partial board, written without training: k of n, the missing cells, stats on complete groups
    assert main(["leaderboard", "report", "store"]) == 0 and len(calls) == 3
    readme = (board / "README.md").read_text()
    assert readme.splitlines()[2].startswith("**Partial board: 2 of 4 cells.**")
    progress = pd.read_csv(board / "progress.csv")
    assert sorted(progress.state) == ["done", "done", "missing", "missing"]
    assert "Partial board: 2 of 4 cells" in (board / "index.html").read_text()
    capsys.readouterr()
    assert main(["leaderboard", "show", "store"]) == 0 and "2 of 4 cells" in capsys.readouterr().out

    # a fresh clone: the board folder alone, no sweep folder
    shutil.rmtree(tmp_path / "sweep")
    calls.clear()
    monkeypatch.setattr(experiment, "run_experiment", lambda c, *a, **k: calls.append(c.method) or original(c, *a, **k))
    assert main(["leaderboard", "run", "store"]) == 0
    assert len(calls) == 2  # only the missing cells trained
    results = pd.read_csv(board / "results.csv")
    assert len(results) == 4 and "Partial board" not in (board / "README.md").read_text()
    assert len(list((board / "runs").glob("*/cell.json"))) == 4
    assert pd.read_csv(board / "progress.csv").state.eq("done").all()

    # a third sitting trains nothing; a changed setting re-runs every cell it changes
    shutil.rmtree(tmp_path / "sweep")
    calls.clear()
    assert main(["leaderboard", "run", "store"]) == 0 and calls == []
    spec = yaml.safe_load((board / "spec.yaml").read_text())
    spec["methods"]["bitfit"] = {}
    spec["method_train"] = {"bitfit": {"lr": 1.0e-3}}
    (board / "spec.yaml").write_text(yaml.safe_dump(spec))
    shutil.rmtree(tmp_path / "sweep")
    assert main(["leaderboard", "run", "store"]) == 0 and calls == ["bitfit", "bitfit"]
    configs = [json.loads(p.read_text()) for p in (board / "runs").glob("*/config.json")]
    assert len(configs) == 4 and sorted(c["train"]["lr"] for c in configs if c["method"] == "bitfit") == [1e-3, 1e-3]


@pytest.mark.slow
def test_verify_reruns_committed_cells_and_reports_exact_reproduction(tmp_path, tiny_model_dir,
                                                                      monkeypatch, capsys):
    board = _board(tmp_path, tiny_model_dir, seeds=1)
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    assert main(["leaderboard", "run", "store"]) == 0
    # masks stay in the sweep folder: a fresh clone keeps the overlap measured where they were
    overlap = pd.read_csv(board / "overlap.csv")
    assert len(overlap) == 1 and (board / "overlap-seeds.csv").is_file()
    shutil.rmtree(tmp_path / "sweep")
    assert main(["leaderboard", "report", "store"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(board / "overlap.csv"), overlap)
    before = {p: p.read_bytes() for p in (board / "runs").rglob("*.json")}
    capsys.readouterr()
    assert main(["leaderboard", "verify", "store", "--cells", "2"]) == 0
    out = capsys.readouterr().out
    assert "reproduced 2 of 2 committed cells exactly" in out and "| same" in out
    assert {p: p.read_bytes() for p in (board / "runs").rglob("*.json")} == before  # read only
    # a committed number that the re-run does not give, on a matching machine: exit 1, shown
    result = next((board / "runs").rglob("*result.json"))
    data = json.loads(result.read_text())
    data["test"]["main"] += 0.125
    result.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["leaderboard", "verify", "store", "--cells", "all"]) == 1
    out = capsys.readouterr().out
    assert "reproduced 1 of 2 committed cells exactly; 1 differ" in out and "-0.125" in out
    assert main(["leaderboard", "verify", "store", "--cell", "cb/nope/b0.01/s0"]) == 2
    assert main(["leaderboard", "verify", "store", "--cells", "zero"]) == 2


@pytest.mark.slow
def test_two_local_workers_build_a_board_and_commit_every_cell(tmp_path, tiny_model_dir, monkeypatch):
    """`leaderboard run NAME --workers 2`: two `leaderboard work` processes (one core each)
    share the study; every cell is committed once, the report reads them all."""
    board = _board(tmp_path, tiny_model_dir)
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["leaderboard", "run", "store", "--workers", "2"]) == 0
    cells = [json.loads(p.read_text()) for p in (board / "runs").glob("*/cell.json")]
    assert sorted(c["cell"] for c in cells) == sorted(
        f"cb/{m}/b{b}/s{s}" for m, b in (("magpruning", "0.01"), ("bitfit", "natural")) for s in (0, 1))
    cores = len(os.sched_getaffinity(0))
    assert {c["machine"]["threads"] for c in cells} == {max(1, cores // 2)}  # a core share each
    assert len(pd.read_csv(board / "results.csv")) == 4


@pytest.mark.slow
def test_a_frozen_tuned_board_reads_back_its_cells_on_a_fresh_clone(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A frozen board whose cells ran at searched settings: on a fresh clone (no sweep folder)
    the committed search.json is what makes a cell's configuration the spec's, so it is read
    before the cells are proven, and every cell reads back on the first report."""
    import peftbench

    board = _board(tmp_path, tiny_model_dir, seeds=1)
    spec = yaml.safe_load((board / "spec.yaml").read_text())
    spec.update(methods={"magpruning": {}}, search={"params": {"lr": {"choices": [1.0e-3, 3.0e-2]}}, "trials": 2,
                                                    "pruner": "none", "seeds": [100]})
    (board / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    assert main(["leaderboard", "run", "store"]) == 0
    tuned = json.loads((board / "search.json").read_text())["cb/magpruning"]["train"]["lr"]
    assert json.loads(next((board / "runs").glob("*/config.json")).read_text())["train"]["lr"] == tuned
    before = pd.read_csv(board / "results.csv")
    spec["frozen"] = {"version": peftbench.__version__, "reason": "before a change of the methods"}
    (board / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(peftbench, "__version__", peftbench.__version__ + ".post-change")
    shutil.rmtree(tmp_path / "sweep")
    capsys.readouterr()
    assert main(["leaderboard", "report", "store"]) == 0
    assert "not read back" not in capsys.readouterr().err
    pd.testing.assert_series_equal(pd.read_csv(board / "results.csv").metric, before.metric)


@pytest.mark.slow
def test_a_frozen_board_reads_back_its_own_cells_after_the_code_changed_and_runs_nothing(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A version bump stales every committed cell; `frozen:` keeps a board made before it
    readable: cells proven to be its spec's (settings equal but for the code, the code the
    version named, the fingerprint its config's digest) read back; run and verify refuse; a cell
    whose configuration was edited is left out, by name."""
    import peftbench

    board = _board(tmp_path, tiny_model_dir, seeds=1)
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    assert main(["leaderboard", "run", "store"]) == 0
    before = pd.read_csv(board / "results.csv")
    made_with = peftbench.__version__
    monkeypatch.setattr(peftbench, "__version__", made_with + ".post-change")
    shutil.rmtree(tmp_path / "sweep")
    assert main(["leaderboard", "report", "store"]) == 0  # not frozen: its cells are stale now
    assert "No (task, method, budget) group is complete yet" in (board / "README.md").read_text()

    spec = yaml.safe_load((board / "spec.yaml").read_text())
    spec["frozen"] = {"version": made_with, "reason": "before a change of the methods", "see": "next"}
    (board / "spec.yaml").write_text(yaml.safe_dump(spec))
    shutil.rmtree(tmp_path / "sweep")
    assert main(["leaderboard", "report", "store"]) == 0
    after = pd.read_csv(board / "results.csv")
    pd.testing.assert_series_equal(after.metric, before.metric)
    readme = (board / "README.md").read_text()
    assert f"made with peftbench {made_with}; before a change of the methods" in readme
    assert "[next](../next/)" in readme and "leaderboard report store" in readme
    capsys.readouterr()
    assert main(["leaderboard", "run", "store"]) == 2
    assert "is frozen" in capsys.readouterr().err
    assert main(["leaderboard", "verify", "store"]) == 2

    from peftbench.core.files import digest

    config = next((board / "runs").glob("*magpruning*/config.json"))
    edited = json.loads(config.read_text())
    edited["train"]["lr"] = 0.5  # another setting, consistent in every file of the cell
    config.write_text(json.dumps(edited))
    cell = json.loads((config.parent / "cell.json").read_text())
    cell["config"]["train"]["lr"] = 0.5
    cell["fingerprint"] = digest(cell["config"])
    (config.parent / "cell.json").write_text(json.dumps(cell))
    capsys.readouterr()
    assert main(["leaderboard", "report", "store"]) == 0
    assert "made with other settings than the spec's" in capsys.readouterr().err
    assert len(pd.read_csv(board / "results.csv")) == 1


@pytest.mark.slow
def test_join_adds_a_method_to_a_built_board_and_runs_only_its_cells(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`leaderboard join NAME METHOD --param k=v`: the spec gains a `joined:` entry (its text and
    comments kept), only the method's cells train, the board's statistics are re-rendered with
    it, the projected cost is printed before and the measured time after; a second join of the
    same method, an unknown method and a bad parameter are refused, the spec unchanged."""
    board = _board(tmp_path, tiny_model_dir)
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    spec_path = board / "spec.yaml"
    spec_path.write_text("# the board's own comment\n" + spec_path.read_text())
    assert main(["leaderboard", "run", "store"]) == 0
    calls, original = [], experiment.run_experiment
    monkeypatch.setattr(experiment, "run_experiment", lambda c, *a, **k: calls.append(c.method) or original(c, *a, **k))
    capsys.readouterr()
    assert main(["leaderboard", "join", "store", "random", "--param", "scope=global"]) == 0
    out = capsys.readouterr().out
    assert calls == ["random", "random"]
    assert "joining random to store: 0 search run(s) and 2 cell(s); projected about" in out
    assert "joined random to store in" in out
    text = spec_path.read_text()
    assert text.startswith("# the board's own comment\n")
    spec = yaml.safe_load(text)
    assert spec["joined"][0]["method"] == "random" and spec["joined"][0]["params"] == {"scope": "global"}
    results = pd.read_csv(board / "results.csv")
    assert sorted(results.method.unique()) == ["bitfit", "magpruning", "random"]
    assert "### Joined after the board was built" in (board / "README.md").read_text()
    before = spec_path.read_text()
    for argv in (["random"], ["nonsense"], ["sam", "--param", "burnin=abc"]):
        assert main(["leaderboard", "join", "store", *argv]) == 2
    assert spec_path.read_text() == before


def test_before_after_sets_each_cell_beside_the_earlier_boards(tmp_path):
    from types import SimpleNamespace

    from peftbench.board.results import before_after_sections

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    row = {"task": "stsb", "method": "fish", "budget": "0.001", "seeds": 5}
    pd.DataFrame([{**row, "mean": 0.50, "std": 0.10, "trainable": 22713},
                  {**row, "method": "sam", "mean": 0.8, "std": 0.0, "trainable": 1}]).to_csv(tmp_path / "old" / "cells.csv")
    pd.DataFrame([{**row, "mean": 0.80, "std": 0.01, "trainable": 22565}]).to_csv(tmp_path / "new" / "cells.csv")
    (section,) = before_after_sections(SimpleNamespace(before="old"), tmp_path / "new")
    side = section.table
    assert len(side) == 1 and side.difference.iloc[0] == pytest.approx(30.0)
    section.write(tmp_path / "new")
    assert (tmp_path / "new" / "before-after.csv").is_file() and "[old](../old/)" in section.note
    shown = section.markdown().splitlines()[-1]  # the budget as written (not 0.00), counts as counts
    assert " 0.001 |" in shown and " 22713 |" in shown and "22713.00" not in shown
    assert before_after_sections(SimpleNamespace(before=None), tmp_path / "new") == []
    with pytest.raises(Exception, match="has no cells.csv"):
        before_after_sections(SimpleNamespace(before="absent"), tmp_path / "new")


@pytest.mark.parametrize("link", ["runs", "README.md", "board"])
def test_a_board_with_a_symbolic_link_is_refused_before_anything_is_written(tmp_path, tiny_model_dir,
                                                                             monkeypatch, link):
    """A board's runs/ linked to another board's (report would prune the other's cells), its
    README.md linked to a file of the user's, or the board folder itself a link: refused, the
    link's target untouched."""
    board = _board(tmp_path, tiny_model_dir, seeds=1)
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    if link == "runs":
        (board / "runs").symlink_to(other, target_is_directory=True)
    elif link == "README.md":
        (board / "README.md").symlink_to(other / "keep.txt")
    else:
        shutil.move(str(board), str(tmp_path / "real-board"))
        board.symlink_to(tmp_path / "real-board", target_is_directory=True)
    for argv in (["report", "store"], ["run", "store"], ["verify", "store"]):
        assert main(["leaderboard", *argv]) == 2
    assert (other / "keep.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["keep.txt"]

"""A committed cell is a sealed unit (`sweep.cellstore.seal`): its files must agree with each other and
with its fingerprint before any command reads it. Each damage below is one a pull request or a
hand edit can carry; each is refused in one line naming the folder, before anything is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import one_line_error

from peftbench.board import verify
from peftbench.sweep import cellstore

BOARD = Path(__file__).resolve().parents[1] / "leaderboards" / "quickstart-sst2"


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first(board: Path, method: str = "random") -> Path:
    return sorted((board / "runs").glob(f"{method}-*"))[0]


def _lr(board):  # settings edited, number kept: read back as the spec's cell before
    _edit(_first(board) / "config.json", lambda c: c["train"].update(lr=0.5))


def _params(board):
    _edit(_first(board) / "config.json", lambda c: c.update(method_params={"p": 1}))


def _relabelled_copy(board):  # a copy of seed 0 relabelled seed 1: one run counted twice
    source = _first(board)
    seed = json.loads((source / "cell.json").read_text())["seed"]
    copy = board / "runs" / (source.name + "-copy")
    shutil.copytree(source, copy)

    def relabel(c):
        c["seed"] = seed + 7
        c["cell"] = c["cell"].rsplit("/s", 1)[0] + f"/s{seed + 7}"
    _edit(copy / "cell.json", relabel)
    _edit(copy / "config.json", lambda c: c.update(seeds=[seed + 7]))  # a careful forger
    (copy / f"seed-{seed}-result.json").rename(copy / f"seed-{seed + 7}-result.json")


def _duplicate(board):
    source = _first(board)
    shutil.copytree(source, board / "runs" / (source.name + "-again"))


def _nan(board):
    folder = _first(board)
    seed = json.loads((folder / "cell.json").read_text())["seed"]
    text = (folder / f"seed-{seed}-result.json").read_text()
    data = json.loads(text)
    data["test"]["main"] = float("nan")
    (folder / f"seed-{seed}-result.json").write_text(json.dumps(data))


def _count_beyond_the_model(board):
    folder = _first(board)
    path = next(folder.glob("seed-*-result.json"))
    data = json.loads(path.read_text())
    data["trainable"].update(encoder=10**15, trainable=10**15 + data["trainable"]["new"],
                             total=10**15 + data["trainable"]["new"] + data["trainable"]["head"])
    path.write_text(json.dumps(data))


def _cut(board):
    path = _first(board) / "cell.json"
    path.write_text(path.read_text()[:40])


def _a_list(board):
    (_first(board) / "cell.json").write_text("[1, 2]")


def _no_fingerprint(board):
    _edit(_first(board) / "cell.json", lambda c: c.pop("fingerprint"))


def _fingerprint_edited(board):
    _edit(_first(board) / "cell.json", lambda c: c["config"]["train"].update(lr=0.5))


def _wrong_key(board):
    _edit(_first(board) / "cell.json", lambda c: c.update(method="sam"))


def _symlinked_runs(board):
    elsewhere = board.parent / "elsewhere"
    shutil.move(str(board / "runs" / _first(board).name), elsewhere)
    (board / "runs" / "linked").symlink_to(elsewhere, target_is_directory=True)


def _runs_linked_to_another_board(board):
    other = board.parent / "other-board"
    shutil.copytree(board, other)
    shutil.rmtree(board / "runs")
    (board / "runs").symlink_to(other / "runs", target_is_directory=True)


CASES = {
    "runs/ a symbolic link to another board's": (_runs_linked_to_another_board, "symbolic link"),
    "config.json's learning rate edited": (_lr, "config.json's train"),
    "config.json's method parameters edited": (_params, "config.json's method_params"),
    "a copy relabelled as another seed": (_relabelled_copy, "holds seed"),
    "the same cell committed twice": (_duplicate, "are the same cell"),
    "a NaN test metric not recorded as failed": (_nan, "test metric is nan"),
    "a trained count beyond the model's entries": (_count_beyond_the_model, "more than the model has"),
    "cell.json cut": (_cut, "cell.json cannot be read"),
    "cell.json a list": (_a_list, "cell.json is not a JSON object"),
    "cell.json without fingerprint": (_no_fingerprint, "has no valid 'fingerprint'"),
    "the fingerprinted configuration edited": (_fingerprint_edited, "fingerprint is not the digest"),
    "cell.json's key not its own": (_wrong_key, "names cell"),
    "a cell folder that is a symbolic link": (_symlinked_runs, "symbolic link"),
}


def test_every_committed_cell_of_the_committed_boards_is_sealed():
    for board in sorted(BOARD.parent.iterdir()):
        if (board / "runs").is_dir():
            cells = cellstore.committed_cells(board)
            assert cells and all(c.fingerprint for c in cells), board.name


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_committed_cell_is_refused_by_name_before_anything_is_written(capsys, tmp_path, case):
    damage, expected = CASES[case]
    board = tmp_path / "boards" / "quickstart-sst2"
    shutil.copytree(BOARD, board)
    damage(board)
    readme = (board / "README.md").read_text()
    line = one_line_error(capsys, "leaderboard", "report", str(board), "--output-dir", str(tmp_path / "sweep"))
    assert expected in line and "committed cell" in line and ("restore" in line or "keep one" in line), line
    assert (board / "README.md").read_text() == readme  # nothing rewritten
    other = board.parent / "other-board" / "runs"
    assert not other.exists() or len(list(other.iterdir())) == len(list((BOARD / "runs").iterdir()))
    line = one_line_error(capsys, "leaderboard", "verify", str(board), "--cells", "1")
    assert expected in line  # verify never re-runs a config.json its fingerprint does not bind


@pytest.mark.parametrize("committed, rerun, exact", [(0.8, float("nan"), 0), (float("nan"), 0.8, 0),
                                                      (float("nan"), float("nan"), 1), (0.8, 0.8, 1)])
def test_verify_calls_nan_reproduced_only_when_both_runs_gave_nan(tmp_path, monkeypatch, committed, rerun, exact):
    from peftbench.training import experiment

    board = tmp_path / "quickstart-sst2"
    shutil.copytree(BOARD, board)
    folder = _first(board)
    cell = json.loads((folder / "cell.json").read_text())
    path = folder / f"seed-{cell['seed']}-result.json"
    data = json.loads(path.read_text())
    data["test"]["main"] = committed
    path.write_text(json.dumps(data))
    if committed != committed:
        _edit(folder / "cell.json", lambda c: c.update(failure="diverged at step 3"))
    monkeypatch.setattr(experiment, "run_experiment", lambda run, progress=False: ({"test_main_mean": rerun}, None))
    text, _ = verify.verify(str(board), names=[cell["cell"]], log=lambda *a: None)
    assert text.endswith(f"reproduced {exact} of 1 committed cells exactly") or \
        f"reproduced {exact} of 1 committed cells exactly;" in text


def test_a_cell_committed_twice_with_the_same_settings_keeps_one_folder(tmp_path):
    """Two `leaderboard work` processes on different output folders (two studies) both finish
    a cell: the board keeps one folder for it, not two (a second would count one run twice and
    make the board unreadable)."""
    board = tmp_path / "board"
    shutil.copytree(BOARD, board)
    folder = _first(board)
    cell = json.loads((folder / "cell.json").read_text())
    other = tmp_path / "other-study" / "runs" / "fulltuning-sst2-b1-29990101-000000-000000"
    (other / f"seed-{cell['seed']}").mkdir(parents=True)
    shutil.copy(folder / "config.json", other / "config.json")
    shutil.copy(folder / f"seed-{cell['seed']}-result.json", other / f"seed-{cell['seed']}" / "result.json")
    before = sorted(p.name for p in (board / "runs").iterdir())
    kept = cellstore.commit_cell(board, {**cell, "run_dir": str(other)}, 1.0)
    assert kept == folder and sorted(p.name for p in (board / "runs").iterdir()) == before
    assert len(cellstore.committed_cells(board)) == len(before)


@pytest.mark.slow
def test_every_committed_board_re_derives_its_tables_on_a_fresh_clone(tmp_path, monkeypatch):
    """The boards as a fresh clone has them (no sweep folder): `leaderboard report` of each,
    from its committed cells and records alone, writes every table and the verdict it
    commits, byte for byte. A number that does not re-derive, or a cell not read back, fails
    here by board and file."""
    from peftbench.cli.main import main

    boards = tmp_path / "boards"
    shutil.copytree(BOARD.parent, boards)
    monkeypatch.setenv("PEFTBENCH_LEADERBOARDS", str(boards))
    monkeypatch.chdir(tmp_path)
    for board in sorted(p for p in boards.iterdir() if (p / "spec.yaml").is_file()):
        committed = {f.name: f.read_bytes() for f in BOARD.parent.joinpath(board.name).iterdir()
                     if f.suffix in (".csv", ".md") and f.name != "README.md"}
        assert main(["leaderboard", "report", board.name, "--output-dir", str(tmp_path / "sweeps" / board.name)]) == 0
        written = {name: (board / name).read_bytes() for name in committed}
        assert written == committed, (board.name, [n for n in committed if written[n] != committed[n]])

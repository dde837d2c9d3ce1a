"""Carrying committed cells across a method-file edit that cannot move a number: proven by the
syntax tree without imports and the objects each import binds, refused for anything else."""
import hashlib
import inspect
import json
import shutil
from pathlib import Path

import pytest

from peftbench.board.rekey import prove_same_code
from peftbench.core.errors import UsageError

OLD = '''"""A method."""
from peftbench.contract.selector import Selection, top_k


def pick(scores, k, generator):
    # the largest k
    return top_k(scores, k, "global", generator)
'''


def test_imports_moved_to_the_api_are_the_same_code():
    new = OLD.replace("from peftbench.contract.selector import Selection, top_k",
                      "from peftbench.api import Selection,   top_k  # the author surface")
    assert "2 imported names bound to the same objects" in prove_same_code(OLD, new)


def test_an_import_inside_a_function_is_checked_in_its_scope():
    old = OLD.replace("    # the largest k\n", "    from peftbench.contract.selector import apportion\n")
    same = OLD.replace("    # the largest k\n", "    from peftbench.api import apportion\n")
    other = OLD.replace("    # the largest k\n", "    from peftbench.contract.selector import top_k as apportion\n")
    prove_same_code(old, same)
    with pytest.raises(UsageError, match="'apportion' in pick is bound to another object"):
        prove_same_code(old, other)


@pytest.mark.parametrize("edit, expected", [
    (("\"global\"", "\"tensor\""), "changed beyond its import statements"),
    (("A method.", "A method, documented."), "changed beyond its import statements"),
    (("Selection, top_k", "Selection, apportion as top_k"), "'top_k' is bound to another object"),
    (("Selection, top_k", "top_k"), "bind other names than before"),
    (("from peftbench.contract.selector", "from peftbench.no_such_module"), "cannot be imported here"),
])
def test_anything_else_is_refused_by_name(edit, expected):
    with pytest.raises(UsageError, match=expected):
        prove_same_code(OLD, OLD.replace(*edit))


def _board_made_by(tmp_path, old_source: str) -> tuple[Path, dict]:
    """A copy of quickstart-sst2's Random cells, made by `old_source` of Random's file;
    returns the board and each cell.json's text as committed (made by the current file)."""
    from peftbench.core.files import digest

    board = tmp_path / "board"
    shutil.copytree(Path(__file__).parents[1] / "leaderboards" / "quickstart-sst2", board)
    for other in board.glob("runs/*"):  # Random's cells alone: the other methods are not this test's
        if not other.name.startswith("random-"):
            shutil.rmtree(other)
    committed = {}
    for cell_file in sorted(board.glob("runs/random-*/cell.json")):
        committed[cell_file] = cell_file.read_text()
        record = json.loads(committed[cell_file])
        current = record["fingerprint"]
        record["config"]["code"]["source"] = hashlib.sha256(old_source.encode()).hexdigest()
        record["fingerprint"] = digest(record["config"])
        cell_file.write_text(json.dumps(record, indent=2))
        overlap = board / "overlap-seeds.csv"  # a cell's fingerprint leaves out its seed: one per setting
        assert current in overlap.read_text() or record["fingerprint"] in overlap.read_text()
        overlap.write_text(overlap.read_text().replace(current, record["fingerprint"]))
    assert committed
    return board, committed


def _random_source() -> str:
    from peftbench.contract import registry

    return Path(inspect.getfile(registry.get("random"))).read_text()


def test_a_board_made_before_an_import_edit_is_rekeyed_to_its_current_cells(tmp_path, monkeypatch):
    """The Random cells re-keyed are keyed as the current file keys them, nothing else in them
    changed; the proof is in rekeyed.json; a second rekey finds nothing to do."""
    import importlib

    from peftbench.board import rekey
    from peftbench.sweep import cellstore

    current = _random_source()
    line = next(l for l in current.splitlines() if l.startswith("from peftbench.api import"))
    names = [n.strip() for n in line.split(" import ", 1)[1].split(",")]
    homes = [importlib.import_module(f"peftbench.{m}") for m in (
        "contract.selector", "modeling.models", "contract.scoring", "core.errors")]
    # the file as it was when its names came from the modules that define them
    old = current.replace(line, "\n".join(
        f"from {next(h.__name__ for h in homes if hasattr(h, n))} import {n}" for n in names))
    assert old != current
    board, committed = _board_made_by(tmp_path, old)
    monkeypatch.setattr(rekey, "_old_source", lambda path, rev: old.encode())
    proofs = rekey.rekey(str(board), "HEAD~1", log=lambda line: None)
    assert set(proofs) == {"random"}
    from peftbench.core.files import digest
    from peftbench.training.identity import code_identity

    for cell_file, text in committed.items():  # the cell as the current file would have keyed it
        expected = json.loads(text)
        expected["config"]["code"]["source"] = code_identity("random", strict=False)["source"]
        expected["fingerprint"] = digest(expected["config"])
        assert json.loads(cell_file.read_text()) == expected
    cellstore.committed_cells(board)  # every cell still seals
    overlap = (board / "overlap-seeds.csv").read_text()  # values kept by fingerprint follow the cells
    assert all(json.loads(f.read_text())["fingerprint"] in overlap for f in committed)
    kept = json.loads((board / "rekeyed.json").read_text())
    assert kept[-1]["methods"]["random"]["proof"].startswith("syntax tree without imports unchanged")
    assert kept[-1]["rewritten"]["cells"] == len(committed)
    assert rekey.rekey(str(board), "HEAD~1", log=lambda line: None) == {}


def test_a_board_made_by_other_code_is_refused_and_left_untouched(tmp_path, monkeypatch, capsys):
    from conftest import one_line_error

    from peftbench.board import rekey

    old = _random_source().replace("description = \"", "description = \"(old) ", 1)
    board, committed = _board_made_by(tmp_path, old)
    before = {f: f.read_text() for f in [*committed, *board.glob("*.json"), *board.glob("*.csv")]}
    monkeypatch.setattr(rekey, "_old_source", lambda path, rev: old.encode())
    line = one_line_error(capsys, "leaderboard", "rekey", str(board), "--since", "HEAD~1")
    assert "changed beyond its import statements" in line
    assert {f: f.read_text() for f in before} == before  # cells, records, tables, proofs untouched
    assert "needs --since REV" in one_line_error(capsys, "leaderboard", "rekey", str(board))

"""Every committed board is a self-contained record: each link in its README and page resolves
to a committed file, and no committed file names a folder of the machine that wrote it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOARDS = ROOT / "leaderboards"
LINK = re.compile(r"\]\(([^)\s]+)\)|(?:href|src)=\"([^\"]+)\"")
ABSOLUTE = re.compile(r"(?<![\w.])(/(?:work|tmp|home|root|check|Users|private|var/folders)/[\w.-]+)")


def committed() -> set[str]:
    """Files git tracks under leaderboards/ (or every file there, outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "leaderboards"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return set(out.split())
    except (OSError, subprocess.CalledProcessError):
        return {p.relative_to(ROOT).as_posix() for p in BOARDS.rglob("*") if p.is_file()}


def pages() -> list[Path]:
    return sorted(p for p in BOARDS.glob("*/*") if p.name in ("README.md", "index.html")) + \
        [p for p in [BOARDS / "index.html"] if p.is_file()]


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(BOARDS).as_posix())
def test_every_link_of_a_committed_board_resolves_to_a_committed_file(page):
    files = committed()
    if page.relative_to(ROOT).as_posix() not in files:
        pytest.skip("not committed")
    missing = []
    for match in LINK.finditer(page.read_text()):
        target = (match.group(1) or match.group(2)).split("#")[0]
        if not target or re.match(r"^[a-z]+:", target):  # an anchor, https:, mailto:, data:
            continue
        resolved = (page.parent / target).resolve()
        try:
            name = resolved.relative_to(ROOT).as_posix()
        except ValueError:
            missing.append(target)
            continue
        if name not in files and not any(f.startswith(name + "/") for f in files):
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links files that are not committed: {sorted(set(missing))[:10]}"


def test_no_committed_board_file_holds_a_path_of_the_machine_that_wrote_it():
    found = {}
    for name in sorted(committed()):
        path = ROOT / name
        if path.suffix not in (".md", ".html", ".csv", ".json", ".yaml", ".svg", ".txt") or not path.is_file():
            continue
        if path.name == "plotly.min.js":
            continue
        hits = ABSOLUTE.findall(path.read_text(errors="replace"))
        if hits:
            found[name] = hits[0]
    assert not found, f"absolute paths in committed files: {dict(list(found.items())[:5])}"


def test_a_page_renders_its_intro_as_markdown_not_as_raw_asterisks(tmp_path):
    """A partial board's intro opens with "**Partial board: k of n cells.**": the page shows it
    in bold, not with its asterisks, and escapes any HTML in a spec's description."""
    from peftbench.rendering import pages

    pages.write_page(tmp_path, "board", "**Partial board: 0 of 3 cells.** Five <b>methods</b>.",
                     {"command": "none"}, [])
    page = (tmp_path / "index.html").read_text()
    assert "<strong>Partial board: 0 of 3 cells.</strong>" in page and "**Partial" not in page
    assert "&lt;b&gt;methods&lt;/b&gt;" in page


def test_a_page_keeps_its_title_when_the_board_has_carry_and_per_budget_tables(tmp_path):
    """The browser tab and the bookmarks name the board, not the last section drawn; the
    README and the page show the same sections, each note written once."""
    import pandas as pd

    from peftbench.rendering import report
    from peftbench.rendering.sections import Section

    table = pd.DataFrame([{"task": "sst2", "method": "random", "budget": "0.001", "lr": 0.01}])
    sections = [Section("Carrying the tuned rate to other budgets", note="The carry *check*.", table=table,
                        csv="carry.csv"),
                Section("Settings tuned at each budget", level=3, note="Each budget's own rate.",
                        table=table.set_index("task"), index=True, csv="per-budget.csv")]
    readme = report.publish(tmp_path, "Leaderboard demo", "intro", sections, "README.md",
                            page={"intro": "intro", "meta": {"command": "none"}})
    page = (tmp_path / "index.html").read_text()
    assert "<title>Leaderboard demo</title>" in page and "<h1>Leaderboard demo</h1>" in page
    assert "<h3>Settings tuned at each budget</h3>" in page and "### Settings tuned at each budget" in readme
    assert "The carry <em>check</em>." in page and "The carry *check*." in readme
    assert page.count("Each budget's own rate.") == readme.count("Each budget's own rate.") == 1
    assert (tmp_path / "carry.csv").read_text() == "task,method,budget,lr\nsst2,random,0.001,0.01\n"
    assert (tmp_path / "per-budget.csv").read_text().startswith("task,method,budget,lr")


def test_the_index_lists_every_board_even_one_whose_spec_this_code_cannot_run(tmp_path):
    """A board spec with an unknown method or a key newer than the running code must not stop
    another board's report at its last step (the index)."""
    from peftbench.rendering.pages import write_index

    for name, text in (("good", "name: good\ndescription: A good board\n"),
                       ("newer", "name: newer\ndescription: From newer code\nmethods: {nonesuch: {}}\nfuture_key: 1\n"),
                       ("broken", "name: [unclosed\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.yaml").write_text(text)
    page = write_index(tmp_path).read_text()
    assert "A good board" in page and "From newer code" in page and "cannot be read" in page

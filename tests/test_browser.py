"""Leaderboard pages open offline in a real browser (headless Chromium): the Pareto figure is
drawn (one marker per method and budget) and each table has the rows of its CSV. Skipped, with
the reason, where no Chromium can be found (.ci/run installs Debian's `chromium`)."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from peftbench.rendering import interactive, report
from peftbench.rendering.figures import figure_sections
from peftbench.rendering.sections import Section

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium)")
BOARDS = Path(__file__).resolve().parents[1] / "leaderboards"


def rendered_dom(page: Path) -> str:
    """The DOM after the page's scripts ran, from headless Chromium, with no network."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=15000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def check_page(folder: Path) -> None:
    dom = rendered_dom(folder / "index.html")
    assert not re.search(r'<script[^>]+src="https?://', (folder / "index.html").read_text()), "remote script"
    for csv_path in [*sorted(folder.glob("table1-b*.csv")), *sorted(folder.glob("cost.csv")),
                     *sorted(folder.glob("findings-*.csv"))]:
        table = re.search(rf'<table class="sortable" data-csv="{re.escape(csv_path.name)}">(.*?)</table>', dom, re.S)
        assert table, f"no table for {csv_path.name}"
        rows = re.findall(r"<tr[ >].*?</tr>", table.group(1), re.S)[1:]  # minus the header
        expected = pd.read_csv(csv_path, index_col=0, dtype=str, keep_default_na=False)
        names = [re.sub(r"<.*?>", "", re.search(r"<td>(.*?)</td>", r).group(1)) for r in rows]
        assert names == [html.escape(str(n), quote=False) for n in expected.index], csv_path.name
    if (folder / "cells.csv").is_file():
        cells = pd.read_csv(folder / "cells.csv")
        drawn = len(re.findall(r'<path class="point[ "]', dom))
        assert drawn == len(cells), f"{drawn} markers drawn, {len(cells)} (method, budget) cells"
        assert_titles_fit(dom)


def assert_titles_fit(dom: str) -> None:
    """Plotly's rotated y titles are not clipped: each line fits the figure's height (about
    0.6 em a character) and the first line's glyphs start inside the left edge."""
    height = float(re.search(r'<svg class="main-svg"[^>]*height="([\d.]+)"', dom).group(1))
    titles = re.findall(r'<text class="ytitle"[^>]*x="([\d.]+)"[^>]*data-unformatted="([^"]*)"[^>]*'
                        r'font-size: ([\d.]+)px', dom)
    assert titles, "no y-axis title drawn"
    for x, text, size in titles:
        longest = max(len(html.unescape(line)) for line in html.unescape(text).split("<br>"))
        assert 0.6 * float(size) * longest <= height, f"y title {html.unescape(text)!r} is longer than the figure"
        assert float(x) >= float(size), f"y title {html.unescape(text)!r} starts outside the figure (x={x})"


@pytest.mark.slow
@needs_chromium
def test_a_generated_page_draws_every_cell_and_every_row(tmp_path):
    rows = []
    for budget in ("0.001", "0.005"):
        for i, method in enumerate(["random", "magpruning", "sam"]):
            for seed in range(2):
                rows.append({"task": "cb", "method": method, "budget": budget, "seed": seed,
                             "metric": 0.5 + 0.05 * i + 0.01 * seed, "validation": 0.5,
                             "trainable": int(float(budget) * 1000), "pretrained_entries": 1000,
                             "constant_metric": 0.4, "test_rows": 55, "metric_name": "accuracy",
                             "model": "default", "scoring_time_s": 1.0, "train_time_s": 2.0,
                             "run_dir": str(tmp_path / "none"), "spend": {}})
    frame = pd.DataFrame(rows)
    sections = report.report_sections(frame, tmp_path)
    figures, js = figure_sections(frame, tmp_path)
    protocol = Section("Protocol, and what was cut", note="Cut: 1 task of 7 & 3 methods, for time.")
    report.publish(tmp_path, "test board", "intro", [protocol, *sections, *figures], "report.md",
                   page={"intro": "intro", "meta": {"command": "none"}, "plotly_js": js})
    assert (tmp_path / interactive.PLOTLY_JS).is_file()
    assert {p.name for p in tmp_path.glob("findings-*.csv")} == {"findings-sam-random.csv", "findings-ranks.csv"}
    check_page(tmp_path)
    assert "Cut: 1 task of 7 &amp; 3 methods, for time." in (tmp_path / "index.html").read_text()


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize("board", sorted(p.name for p in BOARDS.iterdir() if (p / "index.html").is_file()))
def test_committed_leaderboard_pages_render_offline(board):
    check_page(BOARDS / board)
    index = rendered_dom(BOARDS / "index.html")
    assert f'href="{board}/index.html"' in index

"""Leaderboards people browse: one self-contained HTML page per leaderboard (or report).

Offline-first: the page loads plotly.js from a file written once beside the pages
(`interactive.write_plotly_js`), no remote script, font or stylesheet. A page shows the report's
sections (`rendering.sections`) in the README's order, each table sortable by column with the
constant-predictor row last, then every committed cell with links to its config.json,
result.json and cell.json (`runs_html`), then the spec. `leaderboards/index.html` lists every
board.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td:first-child, th:first-child { text-align: left; }
tr.constant td { font-style: italic; color: #555; background: #fafafa; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
.note table, .prose table { font-size: 1em; }
"""

# Sort a table by a column's leading number (or its text) on a click on its header.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows).filter(r => !r.classList.contains("constant"));
      var fixed = Array.from(body.rows).filter(r => r.classList.contains("constant"));
      var up = th.dataset.order !== "asc"; th.dataset.order = up ? "asc" : "desc";
      var key = function (r) { var t = r.cells[col].textContent.replace(/,/g, ""); var n = parseFloat(t); return isNaN(n) ? t : n; };
      rows.sort(function (a, b) { var x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (up ? 1 : -1); });
      rows.concat(fixed).forEach(r => body.appendChild(r));
    });
  });
});
"""


def table_html(table: pd.DataFrame, csv: str = "", index: bool = False, floatfmt=".3g") -> str:
    """A table as a sortable HTML table (a click on a header sorts by that column); the
    constant-predictor row stays last. `floatfmt`: one format, or one per column."""
    table = table.reset_index() if index else table
    table = table.set_index(table.columns[0])
    formats = floatfmt if isinstance(floatfmt, tuple) else (floatfmt,) * (len(table.columns) + 1)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [table.index.name or "", *table.columns])
    rows = []
    for key, row in table.iterrows():
        cls = ' class="constant"' if key == "constant predictor" else ""
        cells = "".join(f"<td>{html.escape(_number(v, f))}</td>" for v, f in zip(row, formats[1:]))
        rows.append(f"<tr{cls}><td>{html.escape(_number(key, formats[0]))}</td>{cells}</tr>")
    name = f' data-csv="{html.escape(csv)}"' if csv else ""
    return (f'<table class="sortable"{name}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _number(value, floatfmt: str) -> str:
    """A value as the page shows it: a float in the section's format, blank where missing."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and floatfmt:
        return format(value, floatfmt)
    return str(value)


def prose(text: str, css: str = "prose") -> str:
    """Markdown (a note, a spec's protocol, a verdict) as HTML paragraphs and lists; raw HTML in
    the text is escaped, never passed through."""
    from markdown_it import MarkdownIt

    return f'<div class="{css}">' + MarkdownIt("commonmark", {"html": False}).enable("table").render(text) + "</div>"


def write_page(folder: Path, title: str, intro: str, meta: dict[str, str], sections: list,
               spec_text: str | None = None, extra_html: str = "", plotly_js: str | None = None) -> Path:
    """`folder/index.html`: the title, the intro and `meta` (command, machine, ...), then every
    section of the report in its order (`sections.Section.page`: the same titles, notes and
    tables as the README), the runs (`extra_html`) and the spec. `plotly_js`: the path of
    plotly.min.js relative to the page, when a section draws the interactive figure."""
    folder = Path(folder)
    parts = [f"<h1>{html.escape(title)}</h1>", prose(intro), "<ul>"]  # "**Partial board: ...**" is Markdown
    parts += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in meta.items()]
    parts += ["</ul>", *(section.page() for section in sections), extra_html]
    if spec_text:
        parts += ["<h2>Spec</h2>", f"<pre>{html.escape(spec_text)}</pre>"]
    scripts = f'<script src="{html.escape(plotly_js)}"></script>' if plotly_js else ""
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>{scripts}</head><body>"
            + "\n".join(parts) + f"<script>{SORT_JS}</script></body></html>")
    path = folder / "index.html"
    path.write_text(page)
    return path


def runs_html(frame: pd.DataFrame, links: dict) -> str:
    """A table of every finished cell (task, method, budget, seed, test metric, trainable, steps/s,
    peak memory) linking its committed config.json, result.json and cell.json."""
    if frame is None or frame.empty or not links:
        return ""
    rows = []
    for row in frame.sort_values(["task", "method", "budget", "seed"]).itertuples():
        found = links.get((row.task, row.method, row.budget, row.seed), {})
        link = " ".join(f'<a href="{html.escape(path)}">{html.escape(name)}</a>'
                        for name, path in found.items())
        memory = getattr(row, "peak_memory_mb", float("nan"))
        speed = getattr(row, "steps_per_s", float("nan"))
        rows.append(f"<tr><td>{html.escape(row.task)}</td><td>{html.escape(row.method)}</td>"
                    f"<td>{html.escape(str(row.budget))}</td><td>{row.seed}</td>"
                    f"<td>{100 * row.metric:.2f}</td><td>{row.trainable:,}</td><td>{speed:.2f}</td>"
                    f"<td>{memory:,.0f}</td><td>{link}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("task", "method", "budget", "seed", "test x100",
                                             "trainable", "steps/s", "peak MiB", "files"))
    return ("<h2>Runs</h2><p class=\"note\">Every cell behind the tables, with the files that "
            "produced it (committed beside this page).</p>"
            f'<table class="sortable runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
            "</tbody></table>")


def write_index(root: Path) -> Path:
    """`root/index.html`: every leaderboard folder (one with a spec.yaml), linked, with its
    description. Only the description is read from each spec, never validated: one board's
    spec (an unknown method, a key newer than this code) must not stop another board's report."""
    from peftbench.core import yamlio

    items = []
    for folder in sorted(p for p in Path(root).iterdir() if (p / "spec.yaml").is_file()):
        try:
            raw = yamlio.load((folder / "spec.yaml").read_text())
            description = str(raw.get("description", "")) if isinstance(raw, dict) else ""
        except Exception as err:  # noqa: BLE001  listed with why, never raised
            description = f"(its spec.yaml cannot be read: {type(err).__name__})"
        link = f'<a href="{folder.name}/index.html">{html.escape(folder.name)}</a>' \
            if (folder / "index.html").is_file() else html.escape(folder.name) + " (no page yet)"
        items.append(f"<li>{link}: {html.escape(description.strip())}</li>")
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>peftbench leaderboards</title>"
            f"<style>{STYLE}</style></head><body><h1>peftbench leaderboards</h1><ul>"
            + "\n".join(items) + "</ul></body></html>")
    path = Path(root) / "index.html"
    path.write_text(page)
    return path


def relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()

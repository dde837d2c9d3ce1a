"""Leaderboards people browse: one self-contained HTML page per leaderboard (or report).

Offline-first: the page loads plotly.js from a file written once beside the pages
(`interactive.write_plotly_js`), no remote script, font or stylesheet. Each page holds: the Table-1
tables per budget, read from the same `table1-b<budget>.csv` files the report wrote (so page and
CSV cannot disagree), sortable by column, with the constant-predictor row and the report's marks
(† worse than the best by a paired test, ≈ within noise of the constant predictor); the
interactive Pareto plot; the critical-difference diagram and the spend plot when present; the
spec, the command and the machine; failed (diverged) cells listed; the cost per method (times,
steps/s, peak memory, from cost.csv), also in the Pareto hover. A leaderboard commits each cell's
config.json, result.json and cell.json under `runs/` (`board.results.commit_cells`) and its page lists
every cell with links to them. `leaderboards/index.html` lists every board.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from peftbench.rendering import interactive

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


def table_html(csv_path: Path, kind: str = "table1", floatfmt: str | None = None) -> str:
    """A Table-1 (or cost) CSV as a sortable HTML table; the constant-predictor row stays last."""
    table = pd.read_csv(csv_path, index_col=0, dtype=str, keep_default_na=False)
    if floatfmt:
        table = table.apply(lambda col: [_number(v, floatfmt) for v in col])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [table.index.name or "method", *table.columns])
    rows = []
    for method, row in table.iterrows():
        cls = ' class="constant"' if method == "constant predictor" else ""
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in row)
        rows.append(f"<tr{cls}><td>{html.escape(str(method))}</td>{cells}</tr>")
    return (f'<table class="sortable {kind}" data-csv="{html.escape(csv_path.name)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _number(text: str, floatfmt: str) -> str:
    """A CSV cell formatted as a number where it is one ('True', 'holds' stay as they are)."""
    if text in ("", "True", "False"):
        return text
    try:
        return format(float(text), floatfmt)
    except ValueError:
        return text


FINDINGS = (("findings-sam-random.csv", "1. Does SAM beat Random at 0.5%? (SAM - Random, x100, paired by seed)"),
            ("findings-stability.csv", "2. Are sparse methods more stable than full fine-tuning? (std x100)"),
            ("findings-ranks.csv", "3. Does the stability rank correlate with the performance rank? "
                                   "(Fu et al.: Spearman rho = 0.4356)"))


def prose(text: str) -> str:
    """Markdown (a spec's protocol, a verdict) as HTML paragraphs and lists; raw HTML in the
    text is escaped, never passed through."""
    from markdown_it import MarkdownIt

    return '<div class="prose">' + MarkdownIt("commonmark", {"html": False}).render(text) + "</div>"


ANALYSES = (
    ("friedman.csv", "Ranking per budget (Friedman over tasks; Iman-Davenport)",
     "Blocks = tasks (the independent units), each method's value = its mean over seeds; only the "
     "methods that keep to the budget. 'descriptive': fewer than 5 tasks, no pairwise verdict and no "
     "critical-difference diagram."),
    ("ranks.csv", "Mean rank over the tasks at each budget", "1 = best; equal values are ties."),
    ("comparisons.csv", "Against Random and full fine-tuning (pre-declared families)",
     "Per task: difference x100 paired by seed with a 95% interval carrying seed and test-set error "
     "(test-set part analytic, the two methods' errors taken as independent: conservative), p and p "
     "Holm-adjusted within (budget, reference). Rows 'across N task(s)': the hierarchical model "
     "(tasks as units, differences in test-set SE units, ROPE one SE; mu = mean effect), "
     "Monte-Carlo draws and seed in their columns."),
    ("best-per-budget.csv", "Which selection method is best at which budget",
     "Among the methods that keep to the budget: best and runner-up by mean, their difference x100 "
     "paired by seed with a 95% interval (seeds + test set); both picked after seeing the data, so "
     "p_uncorrected is optimistic. An interval that includes 0: no single best method there."),
    ("forgetting.csv", "What each run forgets (representation retention on SICK-R TRIAL, x100)",
     "After training and its change from the pre-trained model's, mean and std over seeds."),
    ("selection-checks.csv", "Cells that do not measure the method as budgeted (selection checks)",
     "concentrated: one tensor outside the repeated blocks holds more than half of the selection and more "
     "than twice its share of the model; underspent: the method trained less than half its budget; "
     "protocol-limited: seeds whose run says it did not work as designed (health flags)."),
    ("before-after.csv", "Before and after: the same cells on the board this one follows (x100)",
     "Mean and std over seeds of each (task, method, budget) here and on the earlier board (its spec's "
     "`before:`), their difference, and the trainable count each trained."),
    ("published.csv", "Against the published numbers",
     "Each of our budgets against the published column separately (never pooled), x100."),
    ("overlap.csv", "Do methods pick the same entries? (Jaccard of the masks, mean over seeds)",
     "Per task, budget and pair of methods; natural-count methods at their own count."),
    ("score-correlation.csv", "Rank correlation of importance scores (same sampled entries)",
     "Spearman and Kendall between two methods' scores, mean over seeds."),
)


def write_page(folder: Path, title: str, intro: str, frame: pd.DataFrame | None, meta: dict[str, str],
               spec_text: str | None = None, extra_html: str = "", plotly_js: str | None = None,
               protocol: str = "") -> Path:
    """`folder/index.html` from the files the report wrote into `folder` (table1-b*.csv,
    findings-*.csv, cd.png, spend.png) and the Pareto figure of `frame`; `plotly_js` is the path
    of plotly.min.js relative to the page (written beside it when None); `protocol`, the spec's
    text on how the protocol was chosen and what was cut."""

    folder = Path(folder)
    parts = [f"<h1>{html.escape(title)}</h1>", prose(intro), "<ul>"]  # "**Partial board: ...**" is Markdown
    parts += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in meta.items()]
    parts += ["</ul>"]
    if (folder / "verdict.md").is_file():
        parts += ["<h2>Verdict</h2>", prose((folder / "verdict.md").read_text())]
    if protocol:
        parts += ["<h2>Protocol, and what was cut</h2>", prose(protocol)]
    if (folder / "settings.csv").is_file():
        parts += ["<h2>Settings each method ran at</h2>",
                  '<p class="note">The learning rate and method settings of every (task, method) of '
                  "the grid, and where they come from (chosen on validation by the search, or the "
                  "spec).</p>", table_html(folder / "settings.csv", "settings", ".4g")]
    if (folder / "search.csv").is_file():
        parts += ["<h3>Every setting the search tried (validation main metric)</h3>",
                  table_html(folder / "search.csv", "search", ".4f")]
    notes = {"carry.csv": ("Carrying the tuned rate to other budgets",
                           "At each budget other than the search's, on the check's seed(s): the carried "
                           "rate and its two grid neighbours on validation; cost = the best of the three "
                           "minus the carried rate's; seed spread = the std of the test metric over the "
                           "reported seeds in that cell.", ".4g"),
             "per-budget.csv": ("Settings tuned at each budget",
                                "Each budget other than the search's: the carry check's values around the "
                                "carried rate, widened at the edge, chosen by the mean validation over the "
                                "search's seeds (validation main metric).", ".4f")}
    for name, (heading, note, fmt) in notes.items():
        if (folder / name).is_file():
            parts += [f"<h3>{heading}</h3>", f'<p class="note">{html.escape(note)}</p>',
                      table_html(folder / name, name.removesuffix(".csv"), fmt)]
    tables = sorted(folder.glob("table1-b*.csv"))
    if tables:
        parts.append("<h2>Tables (test metric x100, mean ± std over seeds)</h2>")
        parts.append('<p class="note">[r] = rank in the column among the methods that keep to the '
                     "budget; reference rows (natural count, over budget) carry no rank; † = worse "
                     "than the column\'s best by a paired t-test over seeds, Holm-adjusted over the "
                     "column (the best is picked after seeing the data: a mark, not a verdict); ≈ = "
                     "within noise of the constant predictor (did not measurably learn). Every score "
                     "and difference on this page is x100. Click a header to sort.</p>")
        for csv_path in tables:
            budget = csv_path.stem[len("table1-b"):]
            parts += [f"<h3>Budget {html.escape(budget)} (ranked methods; reference rows unranked)</h3>",
                      table_html(csv_path)]
    if (folder / "intervals.csv").is_file():
        parts += ["<h3>Per-task 95% intervals of each mean (seeds + test set, x100)</h3>",
                  '<p class="note">Seed error and test-set error together: `interval` says how the '
                  "test-set part was found (a bootstrap over the test examples where every seed "
                  "stored its predictions, else analytic: binomial for accuracy, Fisher's z for "
                  "correlations).</p>",
                  table_html(folder / "intervals.csv", "intervals", ".4g")]
    for name, heading, note in ANALYSES:
        if (folder / name).is_file() and (folder / name).read_text().strip():  # an empty analysis: no section
            parts += [f"<h2>{heading}</h2>", f'<p class="note">{html.escape(note)}</p>',
                      table_html(folder / name, name.removesuffix(".csv"), ".3g")]
    if (folder / "curves.csv").is_file():
        parts += ["<h2>Budget curves: the budget that reaches 95% of full fine-tuning</h2>",
                  '<p class="note">On the chance-normalised scale (constant predictor 0, full FT 1): '
                  "reaches = the smallest budget whose mean gets there; earliest / surely = the "
                  "smallest whose 95% interval (seeds + test set) reaches it / lies wholly above it; "
                  "'&lt;= 0.1%' is censored at the smallest budget tried, '&gt; 2%' not reached within "
                  "the budgets tried. The figure is below.</p>",
                  table_html(folder / "curves.csv", "curves", ".4g")]
    found = [(name, caption) for name, caption in FINDINGS if (folder / name).is_file()]
    if found:
        parts += ["<h2>Fu et al.'s findings at this scale</h2>",
                  '<p class="note">verdict: holds / opposite = significant at 0.05 in / against Fu '
                  "et al.'s direction, per task (the tasks are the independent units); not resolved = "
                  "no significant difference at this many seeds and tasks. The README says how each "
                  "is tested.</p>"]
        if (folder / "findings.md").is_file():
            parts.append(prose((folder / "findings.md").read_text()))
        for name, caption in found:
            parts += [f"<h3>{html.escape(caption)}</h3>", table_html(folder / name, "findings", ".4g")]
    if (folder / "cost.csv").is_file():
        parts += ["<h2>Cost per method</h2>",
                  '<p class="note">Mean seconds of scoring and of training (evaluation included) per '
                  "run, training steps per second, the largest peak memory of a run in MiB (peak "
                  "RSS on CPU, max allocated on CUDA), and the machine's mean 1-minute load average "
                  "around the runs (empty: not recorded): timings taken at a load above the "
                  "machine's cores are slower than a quiet machine's; a row per method, task and "
                  "device where the runs came from several tasks or devices.</p>",
                  table_html(folder / "cost.csv", "cost", ",.1f")]
    scripts = ""
    if frame is not None and not frame.empty:
        if plotly_js is None:
            interactive.write_plotly_js(folder)
            plotly_js = interactive.PLOTLY_JS
        figure = interactive.pareto_figure(frame).to_html(full_html=False, include_plotlyjs=False,
                                                    div_id="pareto")
        parts += ["<h2>Accuracy vs trainable parameters</h2>", figure]
        scripts = f'<script src="{html.escape(plotly_js)}"></script>'
    diagrams = [(p.name, f"Critical-difference diagram, budget {p.stem[len('cd-b'):]} (mean ranks over "
                         "tasks; a bar joins the methods dotted on it, which no Holm-adjusted Wilcoxon "
                         "test over the tasks separates: not separated, not equal)")
                for p in sorted(folder.glob("cd-b*.png"))]
    for image, caption in (*diagrams,
                           ("curves.png", "Budget curves (mean and 95% interval: seeds and test set)"),
                           ("spend.png", "Where each method spends its budget"),
                           ("retention.png", "Accuracy against retention (the forgetting probe)")):
        if (folder / image).is_file():
            parts += [f"<h2>{caption}</h2>", f'<img src="{image}" alt="{caption}">']
    failed = frame.attrs.get("failed", {}) if frame is not None else {}
    if failed:
        parts += [f"<h2>Failed cells ({len(failed)}), left out of every mean and rank</h2><ul>"]
        parts += [f"<li>{html.escape(c)}: {html.escape(r)}</li>" for c, r in sorted(failed.items())]
        parts += ["</ul>"]
    parts.append(extra_html)
    if spec_text:
        parts += ["<h2>Spec</h2>", f"<pre>{html.escape(spec_text)}</pre>"]
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

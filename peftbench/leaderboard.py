"""Leaderboards: a folder in `leaderboards/` holding a study spec (+ published numbers) and the
results generated from it, committed beside it.

    leaderboards/<name>/spec.yaml       the study spec (`peftbench.sweep`), `published:` optional
    leaderboards/<name>/README.md       generated: command, machine, tables (the report)
    leaderboards/<name>/*.csv           generated: results, cells, table1-b*, tests, overlap, ...
    leaderboards/<name>/pareto.png/html generated: accuracy vs trainable parameters
    leaderboards/<name>/spend.png       generated: where each method spends its budget

`peftbench leaderboard run NAME` runs (or resumes) the sweep, then writes the report and plots;
`peftbench leaderboard show NAME` prints the committed README.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import pandas
import torch

from peftbench import pages, plots, report, sweep
from peftbench.errors import UsageError


def leaderboards_root() -> Path:
    """$PEFTBENCH_LEADERBOARDS, else ./leaderboards, else the repository's leaderboards/."""
    if os.environ.get("PEFTBENCH_LEADERBOARDS"):
        return Path(os.environ["PEFTBENCH_LEADERBOARDS"])
    here = Path("leaderboards")
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "leaderboards"


def find(name: str) -> Path:
    folder = Path(name) if Path(name).is_dir() else leaderboards_root() / name
    if not (folder / "spec.yaml").is_file():
        root = leaderboards_root()
        known = sorted(p.name for p in root.iterdir() if (p / "spec.yaml").is_file()) if root.is_dir() else []
        raise UsageError(f"leaderboard {name!r} not found (no {folder / 'spec.yaml'}); known: {known}")
    return folder


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{device}; Python {platform.python_version()}, torch {torch.__version__}")


def commit_run_files(frame, folder: Path) -> dict[tuple, dict[str, str]]:
    """Copy each finished cell's `config.json` and `seed-<s>/result.json` (a few kB; masks and
    metrics logs stay in the sweep folder) into `folder/runs/<run>/`, so the committed board
    carries what produced every number; returns {(task, method, budget, seed): {name: path
    relative to folder}} for the page's links. Files of cells no longer in the frame are removed."""
    import shutil

    target_root = folder / "runs"
    links, keep = {}, set()
    for row in frame.itertuples():
        source = Path(row.run_dir)
        target = target_root / source.name
        files = {"config.json": source / "config.json",
                 "result.json": source / f"seed-{row.seed}" / "result.json"}
        if not all(f.is_file() for f in files.values()):
            continue
        found = {}
        for name, path in files.items():
            destination = target / (name if name == "config.json" else f"seed-{row.seed}-{name}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
            found[name] = destination.relative_to(folder).as_posix()
            keep.add(destination)
        links[(row.task, row.method, row.budget, row.seed)] = found
    if target_root.is_dir():
        for stale in target_root.rglob("*.json"):
            if stale not in keep:
                stale.unlink()
        for empty in sorted((d for d in target_root.iterdir() if d.is_dir() and not any(d.iterdir()))):
            empty.rmdir()
    return links


def _setting(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def search_table(best: dict) -> pandas.DataFrame:
    """search.json as a table: a row per (task, method), a column per setting tried (its
    validation score; pruned trials their last report), the chosen setting and its score."""
    rows, settings = [], {}
    for key, entry in best.items():
        task, method = key.split("/", 1)
        row = {"task": task, "method": method}
        for t in entry.get("tried", []):
            settings[_setting(t["params"])] = [v for _, v in sorted(t["params"].items())]
            row[_setting(t["params"])] = t["validation"]
        row["chosen"] = _setting({**entry.get("train", {}),
                                  **{f"method.{k}": v for k, v in entry.get("method", {}).items()}})
        row["validation"] = entry.get("validation")
        rows.append(row)
    if not rows:
        return pandas.DataFrame()
    # columns in the order of the settings' values (numbers before words)
    columns = sorted(settings, key=lambda c: [(1, str(v)) if isinstance(v, str) else (0, v) for v in settings[c]])
    return pandas.DataFrame(rows).set_index(["task", "method"])[[*columns, "chosen", "validation"]]


def search_lines(spec: sweep.StudySpec, folder: Path) -> list[str]:
    """The search's table (search.csv and Markdown lines), when the spec searched."""
    table = search_table(sweep.best_search_params(spec)) if spec.search else pandas.DataFrame()
    if table.empty:
        return []
    table.to_csv(folder / "search.csv")
    search = spec.search
    budget = search.get("budget") or spec.budgets[0]
    return ["", "### Settings chosen on validation (search.json, search.csv)", "",
            f"Validation main metric of each setting tried (seed {search.get('seed', 0)} of the "
            f"search, budget {budget}, the grid's schedule); each (task, method) of the grid uses "
            "its chosen setting.", "", table.reset_index().to_markdown(index=False, floatfmt=".4f")]


def write_results(spec: sweep.StudySpec, folder: Path, command: str) -> str:
    """Report + plots for the study's finished trials into `folder`; returns the Markdown."""
    frame = sweep.finished_frame(spec)
    links = commit_run_files(frame, folder)
    expected = len(sweep.cells(spec))
    done = len(frame)
    train = ", ".join(f"{k}={v}" for k, v in vars(spec.train).items())
    header = "\n".join([
        spec.description, "",
        f"- command: `{command}`",
        f"- machine: {machine()}" + (f" (spec says: {spec.machine})" if spec.machine else ""),
        f"- model: `{spec.model}`; tasks: {', '.join(spec.tasks)}; seeds: {spec.seeds}; "
        f"budgets: {', '.join(spec.budgets)}",
        f"- training: {train}",
        *[f"- training for {m}: " + ", ".join(f"{k}={v}" for k, v in values.items())
          for m, values in spec.method_train.items()],
        "- method settings: " + "; ".join(f"{m} {p}" if p else m for m, p in spec.methods.items()),
        *[f"- not the paper's variant: {m}: {note}" for m, note in spec.method_notes.items()],
        f"- cells finished: {done} of {expected}"
        + ("" if done == expected else " (partial: run the command again to finish)"),
        f"- wall time of the trials: {frame.duration_s.sum() / 3600:.2f} h "
        f"(scoring cached across budgets)",
        *(["", "### Protocol, and what was cut", "", spec.protocol.strip()] if spec.protocol else []),
        *search_lines(spec, folder),
        "", f"Plots: [pareto.png](pareto.png) ([PDF](pareto.pdf), [SVG](pareto.svg), "
        f"[interactive](pareto.html)), [cd.png](cd.png) (critical-difference diagram), "
        f"[spend.png](spend.png) (budget {spec.budgets[len(spec.budgets) // 2]}).",
    ])
    text = report.build_report(frame, folder, title=f"Leaderboard {spec.name}", header=header,
                               published=spec.published, cache_dir=spec.out / "scores",
                               markdown="README.md")
    plots.pareto_png(frame, folder / "pareto.png")
    root = folder.parent
    js = pages.relative(plots.write_plotly_js(root), folder)
    plots.pareto_html(frame, folder / "pareto.html", plotly_js=js)
    ranking = report.friedman_ranking(frame)
    if ranking is not None:
        plots.cd_png(ranking, folder / "cd.png")
    middle = spec.budgets[len(spec.budgets) // 2]
    plots.spend_png(frame, folder / "spend.png", budget=middle)
    pages.write_page(folder, f"Leaderboard {spec.name}", spec.description, frame,
                     page_meta(spec, command, done, expected),
                     spec_text=(folder / "spec.yaml").read_text(), plotly_js=js,
                     extra_html=pages.runs_html(frame, links), protocol=spec.protocol)
    pages.write_index(root)
    return text


def page_meta(spec: sweep.StudySpec, command: str, done: int, expected: int) -> dict[str, str]:
    return {"command": command, "machine": machine() + (f" (spec says: {spec.machine})" if spec.machine else ""),
            "model": spec.model, "tasks": ", ".join(spec.tasks), "seeds": str(spec.seeds),
            "budgets": ", ".join(spec.budgets),
            "training": ", ".join(f"{k}={v}" for k, v in vars(spec.train).items()),
            **{f"training for {m}": ", ".join(f"{k}={v}" for k, v in values.items())
               for m, values in spec.method_train.items()},
            "cells finished": f"{done} of {expected}",
            **{f"not the paper's variant: {m}": note for m, note in spec.method_notes.items()}}


def run(name: str, storage: str | None = None, output_dir: str | None = None) -> str:
    """Search (if the spec has `search:`), sweep, report. The search's results are committed
    beside the spec (`search.json`) and read back from there, so the tuned settings are part of
    the board and a search interrupted in one sitting goes on in the next from what it found."""
    import shutil

    folder = find(name)
    spec = sweep.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    committed, working = folder / "search.json", spec.out / "search.json"
    if committed.is_file():
        working.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(committed, working)
    if spec.search:
        sweep.run_search(spec)
        shutil.copyfile(working, committed)
    sweep.run_grid(spec)
    command = f"peftbench leaderboard run {folder.name}"
    return write_results(spec, folder, command)


def show(name: str) -> str:
    """The committed results; without any, the published numbers rendered by our report code."""
    folder = find(name)
    readme = folder / "README.md"
    if readme.is_file():
        return readme.read_text()
    spec = sweep.load_spec(folder / "spec.yaml")
    if not spec.published:
        raise UsageError(f"leaderboard {name!r} has no results yet: run `peftbench leaderboard run {name}`")
    text = published_only(spec, folder)
    return text


def published_only(spec: sweep.StudySpec, folder: Path | None = None) -> str:
    """Their table re-ranked by `report.table1` (ties=min, as they print), their stability
    correlation recomputed from it, and a pointer to the command that produces ours. With a
    `folder`, the table is also written there as table1-bpublished.csv and the board's page."""
    cells = report.parse_published(spec.published)
    cells = cells[cells.task != "AVG"].assign(budget="published")
    table = report.table1(cells, ties="min", tasks=[t for t in spec.tasks if t in set(cells.task)])
    corr = report.stability_correlation(table)
    if folder is not None:
        table.render(top=3).to_csv(folder / "table1-bpublished.csv")
        pages.write_page(folder, f"Leaderboard {spec.name}: published numbers only", spec.description,
                         None, {"status": f"no results of ours yet: peftbench leaderboard run {spec.name}",
                                "machine needed": spec.machine,
                                **{f"not the paper's variant: {m}": n for m, n in spec.method_notes.items()}},
                         spec_text=(folder / "spec.yaml").read_text())
        pages.write_index(folder.parent)
    return "\n".join([
        f"# Leaderboard {spec.name}: published numbers only", "", spec.description, "",
        f"No results of ours yet: `peftbench leaderboard run {spec.name}` (machine: {spec.machine}).", "",
        "Their numbers, ranked by peftbench's report code (ties = min, ranks 1-3 shown, as printed):", "",
        table.render(top=3).to_markdown(), "",
        *([f"Rows that peftbench does not run as their variant (`{spec.name}` spec):", ""]
          + [f"- {m}: {note}" for m, note in spec.method_notes.items()] + [""] if spec.method_notes else []),
        f"Stability vs performance from this table: Spearman rho = {corr['spearman']:.4f} "
        f"(p = {corr['spearman_p']:.2g}, n = {corr['n']}); they report rho = 0.4356 (p = 0.000014), "
        "computed on data not published (see methods-research.md 2.1.4)."])

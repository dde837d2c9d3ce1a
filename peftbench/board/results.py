"""A board's results: its finished cells committed, then its README and page, written from one
list of sections (`rendering.report.publish`). A board is a folder in `leaderboards/` holding a
study spec (+ published numbers) and the results generated from it, committed beside it.

    leaderboards/<name>/spec.yaml       the study spec (`peftbench.sweep`), `published:` optional
    leaderboards/<name>/README.md       generated: command, machine, tables (the report)
    leaderboards/<name>/*.csv           generated: results, cells, table1-b*, tests, overlap, ...
    leaderboards/<name>/pareto.png/html generated: accuracy vs trainable parameters
    leaderboards/<name>/spend.png       generated: where each method spends its budget

`peftbench leaderboard run NAME` runs (or resumes) the sweep, then writes the report and plots;
`peftbench leaderboard show NAME` prints the committed README.
"""

from __future__ import annotations

from pathlib import Path

import pandas

from peftbench.board.paths import machine, shared_root
from peftbench.board.tables import (
    board_progress,
    carry_sections,
    devices_line,
    frozen_lines,
    joined_sections,
    page_meta,
    partial_lines,
    per_budget_sections,
    search_sections,
    settings_section,
    time_line,
    trial_duration,
)
from peftbench.core.errors import UsageError
from peftbench.rendering import interactive, pages, report
from peftbench.rendering.figures import figure_sections
from peftbench.rendering.sections import Section
from peftbench.sweep import cellstore, state, storage
from peftbench.sweep import records as sweep_records
from peftbench.sweep import spec as sweep_spec


def commit_cells(spec: sweep_spec.StudySpec, folder: Path, study) -> dict[tuple, dict[str, str]]:
    """Commit every finished cell of the spec (its config, result and `cell.json`, a few kB;
    masks and metrics logs stay in the sweep folder) into `folder/runs/`, remove committed
    cells of other settings, and return {(task, method, budget, seed): {name: path relative to
    folder}} for the page's links."""
    from optuna.trial import TrialState

    prints = state.Fingerprints(spec)
    links, keep = {}, set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        a = t.user_attrs
        if "run_dir" not in a or not prints.current(t) or (
                t.state == TrialState.FAIL and not a.get("final_failure")):
            continue
        target = cellstore.commit_cell(folder, a, trial_duration(t))
        keep.add(target.resolve())
        links[(a["task"], a["method"], a["budget"], a["seed"])] = {
            "config.json": (target / "config.json").relative_to(folder).as_posix(),
            "result.json": (target / f"seed-{a['seed']}-result.json").relative_to(folder).as_posix(),
            "cell.json": (target / cellstore.CELL_FILE).relative_to(folder).as_posix()}
    cellstore.prune_stale(folder, keep, set(prints.cells))
    return links


def _read_rows(path: Path) -> pandas.DataFrame | None:
    """A committed per-seed CSV (overlap, score correlation) or None (absent or empty)."""
    try:
        return pandas.read_csv(path, dtype={"budget": str, "fingerprint_a": str, "fingerprint_b": str})
    except (FileNotFoundError, pandas.errors.EmptyDataError):
        return None


def write_results(spec: sweep_spec.StudySpec, folder: Path, command: str) -> str:
    """Commit the finished cells, then report + plots for the complete groups into `folder`;
    returns the Markdown."""
    study = storage.open_study(spec)
    links = commit_cells(spec, folder, study)
    progress = board_progress(spec, study)
    pandas.DataFrame(progress["rows"]).to_csv(folder / "progress.csv", index=False)
    frame = state.trials_frame(study, state.Fingerprints(spec))  # empty before the first cell
    ran_on = devices_line(frame)  # every finished cell, complete group or not
    if not frame.empty:
        keys = list(zip(frame.task, frame.method, frame.budget))
        frame = frame[[k in progress["complete"] for k in keys]]
    frame.attrs["failed"] = state.failed_cells(study, spec)
    expected, done = progress["expected"], progress["done"]
    waiting = [k for k in sweep_records.untuned(spec, sweep_records.tuned_settings(spec)) if k.count("/") == 2]
    opening = frozen_lines(spec) + partial_lines(progress, waiting)
    train = ", ".join(f"{k}={v}" for k, v in vars(spec.train).items())
    header = "\n".join([
        *opening, spec.description, "",
        f"- command: `{command}`",
        f"- machine: {machine()}" + (f" (spec says: {spec.machine})" if spec.machine else ""),
        *([ran_on] if ran_on else []),
        f"- model: `{spec.model}`; tasks: {', '.join(spec.tasks)}; seeds: {spec.seeds}; "
        f"budgets: {', '.join(spec.budgets)}",
        f"- training: {train}",
        *[f"- training for {m}: " + ", ".join(f"{k}={v}" for k, v in values.items())
          for m, values in spec.method_train.items()],
        "- method settings: " + "; ".join(f"{m} {p}" if p else m for m, p in spec.methods.items()),
        *[f"- not the paper's variant: {m}: {note}" for m, note in spec.method_notes.items()],
        f"- cells finished: {done} of {expected}"
        + ("" if done == expected else " (partial: run the command again to finish)"),
        time_line(spec, frame)])
    sections = [*([Section("Protocol, and what was cut", level=3, note=spec.protocol.strip())] if spec.protocol else []),
                *joined_sections(spec), settings_section(spec), *search_sections(spec),
                *carry_sections(spec, frame), *per_budget_sections(spec)]
    root = shared_root(folder)  # None: a board elsewhere writes inside its own folder only
    page = {"intro": (opening[0] + "\n\n" if opening else "") + spec.description,
            "meta": page_meta(spec, command, done, expected), "spec_text": (folder / "spec.yaml").read_text()}
    if frame.empty:
        sections.append(Section("Statistics", note="No (task, method, budget) group is complete yet: no statistics."))
    else:
        known = {"overlap": _read_rows(folder / "overlap-seeds.csv"),
                 "scores": _read_rows(folder / "score-correlation-seeds.csv")}
        sections += report.report_sections(frame, folder, published=spec.published, cache_dir=spec.out / "scores",
                                           known=known, against=spec.compare_against)
        sections += before_after_sections(spec, folder)
        js = pages.relative(interactive.write_plotly_js(root or folder), folder)
        figures, js = figure_sections(frame, folder, plotly_js=js,
                                      spend_budget=spec.budgets[len(spec.budgets) // 2])
        sections += figures
        page.update(plotly_js=js, extra_html=pages.runs_html(frame, links))
    text = report.publish(folder, f"Leaderboard {spec.name}", header, sections, "README.md", page=page)
    if root is not None:
        pages.write_index(root)
    return text


def before_after_sections(spec: sweep_spec.StudySpec, folder: Path) -> list[Section]:
    """This board's cells beside the same cells of the board its spec names `before:` (read
    from that board's committed cells.csv; before-after.csv); none without one."""
    if not spec.before:
        return []
    earlier = folder.parent / spec.before / "cells.csv"
    if not earlier.is_file():
        raise UsageError(f"before: board {spec.before!r} has no cells.csv beside its spec ({earlier}): "
                         "name a board that has been reported")
    keys = ["task", "method", "budget"]
    cols = keys + ["mean", "std", "seeds", "trainable"]
    old = pandas.read_csv(earlier, dtype={"budget": str})[cols]
    new = pandas.read_csv(folder / "cells.csv", dtype={"budget": str})[cols]
    side = old.merge(new, on=keys, suffixes=("_before", "_after"))
    for c in ("mean", "std"):
        side[f"{c}_before"], side[f"{c}_after"] = 100 * side[f"{c}_before"], 100 * side[f"{c}_after"]
    side["difference"] = side.mean_after - side.mean_before
    side = side[keys + ["mean_before", "std_before", "mean_after", "std_after", "difference",
                        "seeds_before", "seeds_after", "trainable_before", "trainable_after"]]
    shown = ("", "", "g", ".2f", ".2f", ".2f", ".2f", ".2f", ".0f", ".0f", ".0f", ".0f")  # budgets as written
    return [Section(f"Before and after ({spec.before})", table=side, csv="before-after.csv", floatfmt=shown,
                    note=f"The same (task, method, budget) cells on [{spec.before}](../{spec.before}/) "
                         "(mean and std over seeds x100, and the trainable count) and here "
                         "(before-after.csv).")]

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

import math
import os
import platform
import sys
from pathlib import Path

import pandas
import torch

from peftbench import cellstore, ownership, pages, plots, registry, report, statistics, sweep
from peftbench.errors import UsageError
from peftbench.record import NATURAL


def leaderboards_root() -> Path:
    """$PEFTBENCH_LEADERBOARDS, else ./leaderboards, else the repository's leaderboards/."""
    if os.environ.get("PEFTBENCH_LEADERBOARDS"):
        return Path(os.environ["PEFTBENCH_LEADERBOARDS"])
    here = Path("leaderboards")
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "leaderboards"


def shared_root(folder: Path) -> Path | None:
    """The folder above a board when it is a leaderboards root (marked `leaderboards`, as the
    repository's is, or named by $PEFTBENCH_LEADERBOARDS): its index.html and plotly.min.js are
    peftbench's to rewrite. None for a board anywhere else, whose parent folder is the user's
    and is never written."""
    parent = Path(folder).resolve().parent
    ours = ownership.kind_of(parent) == "leaderboards" or parent == leaderboards_root().resolve()
    return parent if ours else None


def find(name: str) -> Path:
    folder = Path(name) if Path(name).is_dir() else leaderboards_root() / name
    if not (folder / "spec.yaml").is_file():
        root = leaderboards_root()
        known = sorted(p.name for p in root.iterdir() if (p / "spec.yaml").is_file()) if root.is_dir() else []
        raise UsageError(f"leaderboard {name!r} not found (no {folder / 'spec.yaml'}); known: {known}")
    linked = [p for p in [folder, *folder.iterdir(), *((folder / "runs").iterdir() if (folder / "runs").is_dir()
                                                       and not (folder / "runs").is_symlink() else [])]
              if p.is_symlink()]
    if linked:  # git carries symlinks: a board's files must be its own, or a rewrite writes (and
        # deletes) through them into another board or any file the link names
        raise UsageError(f"board {name!r}: {linked[0]} is a symbolic link (to {os.readlink(linked[0])}); "
                         "peftbench writes and deletes inside a board folder, so every file and folder "
                         "there (committed cells included) must be a real one: restore a copy in place "
                         "of the link")
    foreign = [f for f, head in (("README.md", "# Leaderboard "), ("index.html", "<!DOCTYPE html><html><head>"))
               if (folder / f).is_file() and not (folder / f).read_text(errors="replace").startswith(head)]
    if foreign:  # peftbench rewrites both: a user's files of those names in a folder holding a spec stay theirs
        raise UsageError(f"board {name!r}: {folder / foreign[0]} was not written by peftbench (a board's "
                         f"{foreign[0]} is, and every board command rewrites it): move your file, or give "
                         "the spec its own folder")
    return folder


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{device}; Python {platform.python_version()}, torch {torch.__version__}")


def commit_cells(spec: sweep.StudySpec, folder: Path, study) -> dict[tuple, dict[str, str]]:
    """Commit every finished cell of the spec (its config, result and `cell.json`, a few kB;
    masks and metrics logs stay in the sweep folder) into `folder/runs/`, remove committed
    cells of other settings, and return {(task, method, budget, seed): {name: path relative to
    folder}} for the page's links."""
    from optuna.trial import TrialState

    prints = sweep.Fingerprints(spec)
    links, keep = {}, set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        a = t.user_attrs
        if "run_dir" not in a or not prints.current(t) or (
                t.state == TrialState.FAIL and not a.get("final_failure")):
            continue
        target = cellstore.commit_cell(folder, a, _duration(t))
        keep.add(target.resolve())
        links[(a["task"], a["method"], a["budget"], a["seed"])] = {
            "config.json": (target / "config.json").relative_to(folder).as_posix(),
            "result.json": (target / f"seed-{a['seed']}-result.json").relative_to(folder).as_posix(),
            "cell.json": (target / cellstore.CELL_FILE).relative_to(folder).as_posix()}
    cellstore.prune_stale(folder, keep, set(prints.cells))
    return links


def _duration(trial) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _setting(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def search_table(best: dict) -> pandas.DataFrame:
    """search.json as a table: a row per (task, method) (per-budget.json: per (task, method,
    budget)), a column per setting tried (its validation score; pruned trials their last
    report), the chosen setting and its score."""
    rows, settings = [], {}
    index = ["task", "method"]
    for key, entry in best.items():
        parts = key.split("/")
        row = dict(zip(["task", "method", "budget"], parts))
        if len(parts) == 3:
            index = ["task", "method", "budget"]
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
    return pandas.DataFrame(rows).set_index(index)[[*columns, "chosen", "validation"]]


def settings_table(spec: sweep.StudySpec) -> pandas.DataFrame:
    """What each (task, method) of the grid runs at: its learning rate, the method settings and
    the source of each (the search's choice, or the spec), from the cells' own run configs."""
    best = sweep.tuned_settings(spec)
    per_budget = bool(spec.search and spec.search.per_budget)
    rows = []
    for task in spec.tasks:
        for method in spec.methods:
            uses = registry.get(method).uses_budget
            for budget in (spec.budgets if uses and per_budget else [spec.budgets[0] if uses else NATURAL]):
                config = sweep.cell_run_config(spec, sweep.Cell(task, method, budget, spec.seeds[0]), best)
                own = best.get(f"{task}/{method}/{budget}")
                tuned = own or best.get(f"{task}/{method}")
                rows.append({"task": task, "method": method, **({"budget": budget} if per_budget else {}),
                             "lr": config.train.lr, "method settings": _setting(config.method_params) or "defaults",
                             "from": (f"{'per-budget search' if own else 'search'} (validation "
                                      f"{tuned['validation']:.4f})" if tuned else "spec")})
    return pandas.DataFrame(rows).set_index("task")


def settings_lines(spec: sweep.StudySpec, folder: Path) -> list[str]:
    """settings.csv and its Markdown section: the settings every method of the board ran at."""
    table = settings_table(spec)
    table.to_csv(folder / "settings.csv")
    return ["", "### Settings each method ran at (settings.csv)", "",
            table.reset_index().to_markdown(index=False, floatfmt=".4g")]


def search_lines(spec: sweep.StudySpec, folder: Path) -> list[str]:
    """The search's table (search.csv and Markdown lines), when the spec searched."""
    table = search_table(sweep.best_search_params(spec)) if spec.search else pandas.DataFrame()
    if table.empty:
        return []
    table.to_csv(folder / "search.csv")
    search = spec.search
    budget = search.budget or spec.budgets[0]
    seeds = search.seeds or [spec.seeds[0]]
    best = sweep.best_search_params(spec)
    seconds = [t.get("duration_s") for entry in best.values() for t in entry.get("tried", [])]
    timed = [x for x in seconds if x is not None]
    spent = (f" Search time: {sum(timed) / 3600:.2f} h over {len(timed)} settings tried"
             + (f" ({len(seconds) - len(timed)} tried before durations were recorded)." if len(timed) < len(seconds) else ".")
             if timed else "")
    return ["", "### Settings chosen on validation (search.json, search.csv)", "",
            f"Validation main metric of each setting tried (mean over seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))} of the search, budget {budget}, the grid's schedule); "
            f"each (task, method) of the grid uses its chosen setting (blank: not tried for "
            f"that row).{spent}", "", _tried_markdown(table)]


def devices_line(frame: pandas.DataFrame) -> str | None:
    """Which devices the finished cells ran on, with how many each: a board grows across
    sittings and machines, the machine line above is only the one that wrote the report, and
    seconds and steps/s compare only within one device (the cost table splits by it then)."""
    if frame.empty or "device" not in frame:
        return None
    counts = frame.device.replace("", "not recorded").value_counts().sort_index()
    counts = counts.sort_values(ascending=False, kind="stable")  # most cells first, ties by name
    cells = ", ".join(f"{device} ({n} cell{'s' if n > 1 else ''})" for device, n in counts.items())
    return (f"- cells ran on: {cells}" + ("; timings compare only within one device: the cost "
                                          "table has a row per method, task and device" if len(counts) > 1 else ""))


def time_line(spec: sweep.StudySpec, frame: pandas.DataFrame) -> str:
    """The board's cost in one line: the wall time of every trial, summed, for the search
    (search.json), the grid's cells, the carry check (carry.json) and the per-budget search
    (per-budget.json; its trials' time is that of the seeds it trained). Workers run trials side
    by side, so the elapsed time is this sum over the number of workers, roughly."""
    def hours(record: str) -> float:
        entries = sweep.read_record(spec.out / record).values() if spec.search else []
        return sum(t.get("duration_s") or 0.0 for e in entries for t in e.get("tried", [])) / 3600

    parts = {"search": hours("search.json"),
             "grid": frame.duration_s.sum() / 3600 if not frame.empty else 0.0,
             "carry check": hours("carry.json"), "per-budget search": hours(sweep.PER_BUDGET)}
    shown = {k: v for k, v in parts.items() if v or k == "grid"}
    return ("- wall time of the trials, summed (trials of parallel workers overlap; scoring cached "
            "across budgets): " + " + ".join(f"{k} {v:.2f} h" for k, v in shown.items())
            + (f" = {sum(shown.values()):.2f} h" if len(shown) > 1 else "")
            + ("" if not frame.empty else " (no complete group of the grid yet)"))


def carry_table(spec: sweep.StudySpec, frame: pandas.DataFrame) -> pandas.DataFrame:
    """carry.json against the grid: per (task, method, budget), the carried setting's validation
    on the check's seeds, the best of it and its two neighbours, `cost` = how much validation
    the carried value gives up against that best (0 when it is the best), and the cell's seed
    spread (std of the test metric over the reported seeds, NaN before its cells are in);
    `within spread` says whether the cost is at most the spread."""
    entries = sweep.read_record(spec.out / "carry.json")
    stats = statistics.cell_stats(frame).set_index(["task", "method", "budget"]) if not frame.empty else None
    rows = []
    for key, entry in entries.items():
        task, method, budget = key.split("/")
        (name, carried), = entry["carried"].items()
        cost = entry["validation"] - entry["carried_validation"] if entry.get("carried_validation") is not None \
            else float("nan")
        spread = stats["std"].get((task, method, budget), float("nan")) if stats is not None else float("nan")
        rows.append({"task": task, "method": method, "budget": budget, f"carried {name}": carried,
                     "carried validation": entry.get("carried_validation"),
                     f"best {name}": entry["train"][name], "best validation": entry["validation"],
                     "cost": cost, "seed spread": spread,
                     "within spread": bool(cost <= spread) if spread == spread and cost == cost else None})
    return pandas.DataFrame(rows)


def carry_lines(spec: sweep.StudySpec, folder: Path, frame: pandas.DataFrame) -> list[str]:
    """carry.csv and its Markdown section, when the spec has a carry check with results."""
    if not (spec.search and spec.search.carry_check):
        return []
    table = carry_table(spec, frame)
    if table.empty:
        return []
    table.to_csv(folder / "carry.csv", index=False)
    judged = table["within spread"].dropna()
    records = table.to_dict("records")
    over = [(r["task"], r["method"], r["budget"]) for r in records if r["within spread"] is False]
    # a key re-running at its own rate (per_budget) has no complete cell: named, never silently
    # dropped from the count, since those are the keys where carrying cost most
    unjudged = ["/".join((r["task"], r["method"], r["budget"])) for r in records if r["within spread"] is None]
    seeds = ", ".join(map(str, spec.search.carry_check))
    keys = sweep.carry_keys(spec)
    return ["", "## Carrying the tuned rate to other budgets (carry.json, carry.csv)", "",
            (f"What carrying the setting tuned at budget {sweep.search_budget(spec)} to the other budgets "
             "would cost (the per-budget search below tunes each budget instead, from these runs). "
             if spec.search.per_budget else
             f"The setting tuned at budget {sweep.search_budget(spec)} is carried to the other budgets. ")
            + f"The check: at each other budget, on seed{'s' if len(spec.search.carry_check) > 1 else ''} "
            f"{seeds} (not reported), the carried value and its two grid neighbours; cost = the best "
            "validation of the three minus the carried value's; seed spread = the std of the test "
            "metric over the reported seeds in that cell, as the board runs it. "
            + (f"Cost within the seed spread in {int(judged.sum())} of {len(judged)} cells"
               + (f"; the other {len(over)} exceed it: " + ", ".join("/".join(k) for k in over) + "."
                  if over else ".")
               if len(judged) else "No cell of the grid to compare with yet.")
            + (" Not judged yet (no complete cell): " + ", ".join(unjudged) + "."
               if len(judged) and unjudged else "")
            + (f" {len(table)} of {len(keys)} keys checked so far." if len(table) < len(keys) else ""), "",
            table.to_markdown(index=False, floatfmt=".4g")]


def per_budget_lines(spec: sweep.StudySpec, folder: Path) -> list[str]:
    """per-budget.csv and its Markdown section, when the spec tunes each budget on its own."""
    if not (spec.search and spec.search.per_budget):
        return []
    record = sweep.read_record(spec.out / sweep.PER_BUDGET)
    keys = sweep.carry_keys(spec)
    # rows in the spec's order (task, method, budget), not the order the workers finished them
    ordered = {**{k: record[k] for k in keys if k in record}, **record}
    table = search_table(ordered)
    if table.empty:
        return []
    (name, _), = spec.search.params.items()
    table.insert(table.columns.get_loc("chosen"), "carried",
                 [_setting(entry["carried"]) for entry in ordered.values()])
    table.to_csv(folder / "per-budget.csv")
    moved = [k for k, e in record.items() if not math.isclose(e["train"][name], e["carried"][name], rel_tol=1e-9)]
    seeds = ", ".join(map(str, spec.search.seeds))
    return ["", "### Settings tuned at each budget (per-budget.json, per-budget.csv)", "",
            f"Each budget other than {sweep.search_budget(spec)}, for every budget-parameterised "
            f"method: the carry check's three values around the carried one, widened by the edge "
            f"rule, chosen by the mean validation over seeds {seeds} (the carry check's seeds read "
            f"back from carry.json, not trained again). {len(record)} of {len(keys)} keys tuned; "
            f"the chosen {name} differs from the carried one in {len(moved)} of them (blank: not "
            f"tried at that budget).", "", _tried_markdown(table)]


def _tried_markdown(table: pandas.DataFrame) -> str:
    """A `search_table` in Markdown, a setting not tried for a row left blank (not "nan": the
    edge rule adds values for some rows only, so most of a wide table is untried)."""
    table = table.reset_index()
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="")


def board_progress(spec: sweep.StudySpec, study) -> dict:
    """Which cells are in: every cell's state, the settled ones (done, or failed for good), the
    complete (task, method, budget) groups (every seed settled) and the missing cells by group."""
    states = sweep.cell_states(study, sweep.Fingerprints(spec))
    settled = {k for k, v in states.items()
               if v["state"] == "done" or (v["state"] == "failed" and v.get("final"))}
    groups: dict[tuple, list] = {}
    for cell in sweep.cells(spec):
        groups.setdefault((cell.task, cell.method, cell.budget), []).append(cell)
    complete = {g for g, members in groups.items() if all(c.key in settled for c in members)}
    missing = {g: [c.seed for c in members if c.key not in settled]
               for g, members in groups.items() if g not in complete}
    rows = [{"task": c.task, "method": c.method, "budget": c.budget, "seed": c.seed,
             "state": "done" if c.key in settled and states[c.key]["state"] == "done"
             else "failed" if c.key in settled else "missing"}
            for members in groups.values() for c in members]
    return {"expected": len(states), "done": len(settled), "complete": complete,
            "groups": len(groups), "missing": missing, "rows": rows}


def partial_lines(progress: dict, waiting: list[str] = ()) -> list[str]:
    """The lines that open a board that is not finished: k of n cells, what is missing, and
    what the statistics use; and the search keys the grid still waits for (`waiting`: a
    per-budget search not finished, whose cells so far ran at the carried setting). Empty for
    a finished board."""
    tuning = [f"**Not final: {len(waiting)} (task, method, budget) key(s) wait for their own "
              "setting (search: per_budget; per-budget.json).** Their cells below ran at the "
              "setting carried from the search's budget; the cells of each key whose own setting "
              "differs will run again: " + ", ".join(waiting[:6])
              + (f" and {len(waiting) - 6} more." if len(waiting) > 6 else "."), ""] if waiting else []
    if progress["done"] == progress["expected"]:
        return tuning
    missing = [f"{t}/{m}/b{b}: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
               for (t, m, b), seeds in sorted(progress["missing"].items())]
    return [f"**Partial board: {progress['done']} of {progress['expected']} cells.** Every table, "
            f"figure and statistic below uses only the {len(progress['complete'])} of "
            f"{progress['groups']} (task, method, budget) groups whose seeds are all in; the same "
            "command resumes from the committed cells. Missing (progress.csv lists every cell):",
            "", *[f"- {line}" for line in missing], "", *tuning]


def _read_rows(path: Path) -> pandas.DataFrame | None:
    """A committed per-seed CSV (overlap, score correlation) or None (absent or empty)."""
    try:
        return pandas.read_csv(path, dtype={"budget": str, "fingerprint_a": str, "fingerprint_b": str})
    except (FileNotFoundError, pandas.errors.EmptyDataError):
        return None


def write_results(spec: sweep.StudySpec, folder: Path, command: str) -> str:
    """Commit the finished cells, then report + plots for the complete groups into `folder`;
    returns the Markdown."""
    study = sweep.open_study(spec)
    links = commit_cells(spec, folder, study)
    progress = board_progress(spec, study)
    pandas.DataFrame(progress["rows"]).to_csv(folder / "progress.csv", index=False)
    frame = sweep.trials_frame(study, sweep.Fingerprints(spec))  # empty before the first cell
    ran_on = devices_line(frame)  # every finished cell, complete group or not
    if not frame.empty:
        keys = list(zip(frame.task, frame.method, frame.budget))
        frame = frame[[k in progress["complete"] for k in keys]]
    frame.attrs["failed"] = sweep.failed_cells(study, spec)
    expected, done = progress["expected"], progress["done"]
    waiting = [k for k in sweep.untuned(spec, sweep.tuned_settings(spec)) if k.count("/") == 2]
    opening = frozen_lines(spec) + partial_lines(progress, waiting)
    drawn = [r for r in (report.friedman_by_budget(frame) if not frame.empty else [])
             if r["pairwise"] is not None]  # links only to plots made
    several_budgets = not frame.empty and not report.budget_curves(frame).empty
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
        time_line(spec, frame),
        *(["", "### Protocol, and what was cut", "", spec.protocol.strip()] if spec.protocol else []),
        *joined_lines(spec),
        *settings_lines(spec, folder),
        *search_lines(spec, folder),
        *carry_lines(spec, folder, frame),
        *per_budget_lines(spec, folder),
        *(["", "Plots: [pareto.png](pareto.png) ([PDF](pareto.pdf), [SVG](pareto.svg), "
            "[interactive](pareto.html)), "
            + "".join(f"[cd-b{r['budget']}.png](cd-b{r['budget']}.png) (critical-difference diagram, "
                      f"budget {r['budget']}), " for r in drawn)
            + ("[curves.png](curves.png) (budget curves), " if several_budgets else "")
            + f"[spend.png](spend.png) (budget {spec.budgets[len(spec.budgets) // 2]})."]
          if not frame.empty else []),
    ])
    root = shared_root(folder)  # None: a board elsewhere writes inside its own folder only
    description = (opening[0] + "\n\n" if opening else "") + spec.description
    if frame.empty:
        text = "\n".join([f"# Leaderboard {spec.name}", "", header, "",
                          "No (task, method, budget) group is complete yet: no statistics."])
        (folder / "README.md").write_text(text + "\n")
        pages.write_page(folder, f"Leaderboard {spec.name}", description, None,
                         page_meta(spec, command, done, expected),
                         spec_text=(folder / "spec.yaml").read_text(), protocol=spec.protocol)
        if root is not None:
            pages.write_index(root)
        return text
    known = {"overlap": _read_rows(folder / "overlap-seeds.csv"),
             "scores": _read_rows(folder / "score-correlation-seeds.csv")}
    text = report.build_report(frame, folder, title=f"Leaderboard {spec.name}", header=header,
                               published=spec.published, cache_dir=spec.out / "scores",
                               markdown="README.md", known=known, against=spec.compare_against)
    side = before_after(spec, folder)
    if side is not None:
        text += "\n".join(["", f"## Before and after ({spec.before})", "",
                           f"The same (task, method, budget) cells on [{spec.before}](../{spec.before}/) "
                           "(mean and std over seeds x100, and the trainable count) and here "
                           "(before-after.csv):", "", side.to_markdown(index=False, floatfmt=".2f"), ""])
        (folder / "README.md").write_text(text)
    plots.pareto_png(frame, folder / "pareto.png")
    js = pages.relative(plots.write_plotly_js(root or folder), folder)
    plots.pareto_html(frame, folder / "pareto.html", plotly_js=js)
    for stale in folder.glob("cd*.png"):  # a diagram the current evidence no longer supports goes
        stale.unlink()
    for r in drawn:
        plots.cd_png(r, folder / f"cd-b{r['budget']}.png")
    middle = spec.budgets[len(spec.budgets) // 2]
    plots.spend_png(frame, folder / "spend.png", budget=middle)
    if plots.retention_png(frame, folder / "retention.png") is not None:
        text += "\n".join(["", "## Accuracy against retention", "",
                           "[retention.png](retention.png): each cell's mean test metric against its "
                           "mean retention change on the forgetting probe (forgetting.csv).", ""])
        (folder / "README.md").write_text(text)
    curves = report.budget_curves(frame)
    if not curves.empty:  # several budgets: the accuracy-vs-budget question, as curves
        plots.curves_png(frame, folder / "curves.png")
        curves.to_csv(folder / "curves.csv", index=False)
        text += "\n".join(["", "## Budget curves", "", "[curves.png](curves.png): test metric "
                           "against trainable entries (log), mean and 95% interval per method. "
                           "Reaches = the smallest budget whose mean reaches 95% of full fine-tuning "
                           "on the chance-normalised scale (constant predictor 0, full FT 1; "
                           "target_x100 is that score); earliest / surely = the smallest budget whose "
                           "95% interval (seeds + test set) reaches it / lies wholly above it. '<= "
                           "0.1%': already at the smallest budget tried (censored); '> 2%': not within "
                           "the budgets tried. Only cells that keep to their budget count "
                           "(curves.csv).", "",
                           curves.to_markdown(index=False, floatfmt=".2f"), ""])
        (folder / "README.md").write_text(text)
    pages.write_page(folder, f"Leaderboard {spec.name}", description, frame,
                     page_meta(spec, command, done, expected),
                     spec_text=(folder / "spec.yaml").read_text(), plotly_js=js,
                     extra_html=pages.runs_html(frame, links), protocol=spec.protocol)
    if root is not None:
        pages.write_index(root)
    return text


def before_after(spec: sweep.StudySpec, folder: Path) -> pandas.DataFrame | None:
    """This board's cells beside the same cells of the board its spec names `before:` (read
    from that board's committed cells.csv), written to before-after.csv; None without one."""
    if not spec.before:
        return None
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
    side.to_csv(folder / "before-after.csv", index=False)
    return side


def joined_lines(spec: sweep.StudySpec) -> list[str]:
    """The protocol's amendment for each method joined after the board was built."""
    if not spec.joined:
        return []
    return ["", "### Joined after the board was built", "",
            *[f"- {j.method}" + (f" ({', '.join(f'{k}={v}' for k, v in j.params.items())})" if j.params else "")
              + f": joined on {j.date} with peftbench {j.peftbench} (`peftbench leaderboard join`), under "
              "the protocol above: its own search, carry check and per-budget search where the board has "
              "them, the board's seeds, budgets and training." for j in spec.joined]]


def join_cost(spec: sweep.StudySpec, folder: Path, method: str) -> tuple[int, int, float | None]:
    """(search runs, grid cells, median seconds of the board's committed cells) that joining
    `method` adds: what `join` projects its cost from."""
    import statistics as stats

    budgeted = registry.get(method).uses_budget
    search = spec.search
    runs = 0
    if search:
        runs = search.trials * len(search.seeds or [spec.seeds[0]])
        if search.per_budget and budgeted:
            others = len(spec.budgets) - 1
            runs += 3 * others * (len(search.carry_check or []) + 1)
    runs *= len(spec.tasks)
    cells = len(spec.tasks) * (len(spec.budgets) if budgeted else 1) * len(spec.seeds)
    durations = [float(c.record.get("duration_s") or 0) for c in cellstore.committed_cells(folder)]
    durations = [d for d in durations if d > 0]
    return runs, cells, (stats.median(durations) if durations else None)


def join(name: str, method: str, params: dict, workers: int | None = None, storage: str | None = None,
         output_dir: str | None = None, log=print) -> str:
    """Add `method` to a built board and run only what it needs under the board's rules: the
    spec gains a `joined:` entry (appended, the file's text and comments kept), then `run`
    searches its keys, runs its cells (each committed as it finishes) and re-renders every
    statistic. Prints the projected cost before and the measured wall time after."""
    import time
    from datetime import date

    import peftbench
    from peftbench import yamlio

    folder = find(name)
    path = folder / "spec.yaml"
    spec = sweep.load_spec(path, storage=storage, output_dir=output_dir)
    if spec.frozen is not None:
        _prepare(folder, spec)  # refuses, saying why
    key = method.lower()
    if key in spec.methods:
        raise UsageError(f"method {key!r} is already on board {name!r}: `peftbench leaderboard run {name}` "
                         "finishes its cells")
    registry.create(key, **params)  # unknown method or bad parameter: one line now
    text = path.read_text()
    entry = yamlio.dump_flow({"method": key, "params": params, "date": date.today().isoformat(),
                              "peftbench": peftbench.__version__})
    joined = text.rstrip("\n") + ("\n" if "\njoined:" in text else "\njoined:\n") + f"- {entry}\n"
    path.write_text(joined)
    try:
        sweep.load_spec(path, storage=storage, output_dir=output_dir)
    except UsageError:
        path.write_text(text)
        raise
    runs, cells, median = join_cost(spec, folder, key)
    share = max(1, workers or 1)
    projected = (f"about {(runs + cells) * median / share / 3600:.1f} h on {share} worker(s) "
                 f"(median committed cell {median:.0f} s)" if median else "no committed cell to project from")
    log(f"joining {key} to {name}: {runs} search run(s) and {cells} cell(s); projected {projected}")
    start = time.perf_counter()
    out = run(name, storage=storage, output_dir=output_dir, workers=workers)
    log(f"joined {key} to {name} in {(time.perf_counter() - start) / 3600:.2f} h wall "
        f"({runs} search run(s), {cells} cell(s) projected)")
    return out


def frozen_lines(spec: sweep.StudySpec) -> list[str]:
    """The first lines of a frozen board: which code made it, what changed, where to look now."""
    if spec.frozen is None:
        return []
    see = f" Superseded by [{spec.frozen.see}](../{spec.frozen.see}/)." if spec.frozen.see else ""
    return [f"**Made before a change of the methods**: its cells were made with peftbench "
            f"{spec.frozen.version}; {spec.frozen.reason}. It is kept as it was, read back from its "
            f"committed cells, and not run again.{see}", ""]


def page_meta(spec: sweep.StudySpec, command: str, done: int, expected: int) -> dict[str, str]:
    return {"command": command, "machine": machine() + (f" (spec says: {spec.machine})" if spec.machine else ""),
            "model": spec.model, "tasks": ", ".join(spec.tasks), "seeds": str(spec.seeds),
            "budgets": ", ".join(spec.budgets),
            "training": ", ".join(f"{k}={v}" for k, v in vars(spec.train).items()),
            **{f"training for {m}": ", ".join(f"{k}={v}" for k, v in values.items())
               for m, values in spec.method_train.items()},
            "cells finished": f"{done} of {expected}",
            **{f"not the paper's variant: {m}": note for m, note in spec.method_notes.items()}}


def _prepare(folder: Path, spec: sweep.StudySpec, trains: bool = True) -> None:
    """The committed search.json into the sweep folder: the tuned settings are part of the
    board, and the cells' fingerprints are computed from them. A frozen board trains nothing
    (`trains`: refused) and reads back the committed cells proven to be its own."""
    import shutil

    if spec.frozen is not None:
        if trains:
            raise UsageError(f"board {spec.name!r} is frozen: made with peftbench {spec.frozen.version}; "
                             f"{spec.frozen.reason}. Its cells cannot be run again with this code"
                             + (f"; see board {spec.frozen.see!r}" if spec.frozen.see else "")
                             + f" (rewrite its page with `peftbench leaderboard report {spec.name}`)")
        _, refused = cellstore.accept_frozen(spec, folder)
        if refused:
            print(f"board {spec.name}: {len(refused)} committed cell(s) not read back: "
                  + "; ".join(refused[:5]) + (" ..." if len(refused) > 5 else ""), file=sys.stderr)

    for record in ("search.json", "carry.json", sweep.PER_BUDGET):
        committed, working = folder / record, spec.out / record
        if committed.is_file():
            sweep.claim_out(spec)  # the sweep folder is peftbench's before anything is copied there
            shutil.copyfile(committed, working)


def search(name: str, storage: str | None = None, output_dir: str | None = None) -> dict:
    """The search alone (each of `run --workers N`'s search workers): takes untuned (task,
    method) pairs until none is left, recording each into the board's search.json."""
    folder = find(name)
    spec = sweep.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    if not spec.search:
        raise UsageError(f"leaderboard {name!r} has no 'search:' section")
    _prepare(folder, spec)
    return sweep.run_search(spec, mirror=folder / "search.json")


def carry(name: str, storage: str | None = None, output_dir: str | None = None) -> dict:
    """The carry check alone (each of `run --workers N`'s carry workers), into carry.json."""
    folder = find(name)
    spec = sweep.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    return sweep.run_carry_check(spec, mirror=folder / "carry.json", search_mirror=folder / "search.json")


def per_budget(name: str, storage: str | None = None, output_dir: str | None = None) -> dict:
    """The per-budget search alone (each of `run --workers N`'s workers), into per-budget.json."""
    folder = find(name)
    spec = sweep.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    return sweep.run_per_budget_search(spec, mirror=folder / sweep.PER_BUDGET, carry_mirror=folder / "carry.json",
                                       search_mirror=folder / "search.json")


def work(name: str, storage: str | None = None, output_dir: str | None = None) -> int:
    """The grid alone, committing each cell into the board as it finishes: what each of
    `run`'s workers does, and what a second machine on a shared study runs. Returns the
    number of cells that failed."""
    folder = find(name)
    spec = sweep.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    cellstore.import_committed(sweep.open_study(spec), spec, folder)
    study = sweep.run_grid(spec, on_complete=lambda t: cellstore.commit_cell(folder, t.user_attrs, _duration(t)))
    return len(sweep.failed_cells(study, spec))


def refresh(name: str, storage: str | None = None, output_dir: str | None = None) -> str:
    """Rewrite the board from its committed cells (and the local study) without training: a
    partial board's README, page and CSVs, with "k of n cells" and what is missing."""
    folder = find(name)
    spec = sweep.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    if spec.published and not cellstore.committed_cells(folder):  # nothing of ours yet
        return published_only(spec, folder)
    _prepare(folder, spec, trains=False)
    cellstore.import_committed(sweep.open_study(spec), spec, folder)
    verb = "report" if spec.frozen is not None else "run"
    return write_results(spec, folder, f"peftbench leaderboard {verb} {folder.name}")


def run(name: str, storage: str | None = None, output_dir: str | None = None,
        workers: int | None = None, restart_changed: bool = False) -> str:
    """Search (if the spec has `search:`), sweep, report. The search's results are committed
    beside the spec (`search.json`) and read back from there, so the tuned settings are part of
    the board and a search interrupted in one sitting goes on in the next from what it found.
    Committed cells of the current settings are read back, not re-run (`peftbench.cellstore`);
    each new cell is committed into the board as it finishes. `workers` > 1: that many local
    `leaderboard work` processes, each with its share of the cores."""
    folder = find(name)
    spec = sweep.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    argv = [name, *(["--storage", storage] if storage else []), *(["--output-dir", output_dir] if output_dir else [])]

    def phase(action: str, what: str, record: str, alone) -> None:
        """A search phase, its keys split between `workers` processes (sweep.SearchClaims)."""
        if workers and workers > 1:
            if sweep.spawn_workers(argv, workers, command=("leaderboard", action)):
                raise UsageError(f"the {what} of {name!r} did not finish (see the workers' errors above); "
                                 f"what it measured is in its {record}")
        else:
            alone()

    search = spec.search
    if search:  # search.json into the board after every (task, method): commit as it grows
        phase("search", "search", "search.json", lambda: sweep.run_search(spec, mirror=folder / "search.json"))

    def carry_check() -> None:
        phase("carry", "carry check", "carry.json", lambda: sweep.run_carry_check(
            spec, mirror=folder / "carry.json", search_mirror=folder / "search.json"))

    if search and search.per_budget:  # each budget tuned from the carry check, before the grid
        carry_check()
        phase("per-budget", "per-budget search", sweep.PER_BUDGET, lambda: sweep.run_per_budget_search(
            spec, mirror=folder / sweep.PER_BUDGET, carry_mirror=folder / "carry.json",
            search_mirror=folder / "search.json"))
    study = sweep.open_study(spec)
    cellstore.import_committed(study, spec, folder)
    if workers and workers > 1:
        sweep.run_workers(spec, argv, workers, restart_changed=restart_changed, command=("leaderboard", "work"))
    else:
        sweep.run_grid(spec, restart_changed=restart_changed,
                       on_complete=lambda t: cellstore.commit_cell(folder, t.user_attrs, _duration(t)))
    if search and search.carry_check and not search.per_budget:  # after the grid: a check, not the product
        carry_check()
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
        if shared_root(folder) is not None:
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


def verify(name: str, cells: str = "2", seed: int = 0, names: list[str] | None = None,
           log=print) -> tuple[str, int]:
    """Re-run committed cells on this machine, in a scratch folder (the committed files are
    only read), and compare: returns (the table and a closing line, exit code). The code is 1
    when a cell whose machine fingerprint (torch, transformers, device, threads) matches the
    committed one gives another test metric: on the same software and CPU a cell is expected to
    reproduce to the last digit. Elsewhere the difference is reported, never hidden."""
    import random
    import tempfile

    from peftbench.experiment import run_experiment
    from peftbench.fingerprint import machine_fingerprint
    from peftbench.trainer import pick_device

    folder = find(name)
    frozen = sweep.load_spec(folder / "spec.yaml").frozen
    if frozen is not None:
        raise UsageError(f"board {name!r} is frozen: made with peftbench {frozen.version} ({frozen.reason}); "
                         "this code would not reproduce its cells: verify them from a checkout of "
                         f"peftbench {frozen.version}")
    committed = cellstore.committed_cells(folder)
    if not committed:
        raise UsageError(f"leaderboard {name!r} has no committed cells with a cell.json under "
                         f"{folder / 'runs'}: run `peftbench leaderboard run {name}` first")
    by_key = {c.cell: c for c in committed}
    if names:
        unknown = [n for n in names if n not in by_key]
        if unknown:
            raise UsageError(f"--cell {unknown[0]!r} is not a committed cell of {name!r}; e.g. "
                             f"{', '.join(sorted(by_key)[:3])} (task/method/b<budget>/s<seed>)")
        chosen = [by_key[n] for n in names]
    elif cells == "all":
        chosen = committed
    else:
        try:
            k = int(cells)
        except ValueError:
            k = 0
        if k < 1:
            raise UsageError(f"--cells {cells!r}: give a positive number of cells or 'all'")
        chosen = sorted(random.Random(seed).sample(committed, min(k, len(committed))),
                        key=lambda c: c.cell)
    rows, mismatched = [], 0
    with tempfile.TemporaryDirectory(prefix=f"verify-{folder.name}-") as scratch:
        for i, cell in enumerate(chosen, 1):
            run = cell.run_config(output_dir=scratch)
            log(f"[{i}/{len(chosen)}] re-running {cell.cell}")
            summary, _ = run_experiment(run, progress=False)
            here = machine_fingerprint(str(pick_device(run.device)))
            there = cell.record.get("machine", {})
            differs = sorted(k for k in here if there.get(k) != here[k])
            before, after = cell.result["test"]["main"], summary["test_main_mean"]
            same = before == after or (before != before and after != after)  # NaN: diverged both times
            if not same and not differs:
                mismatched += 1
            rows.append({"cell": cell.cell, "task": cell.task, "method": cell.method,
                         "budget": cell.budget, "committed": before, "re-run": after,
                         "difference": after - before,
                         "machine": "same" if not differs else "differs: " + ", ".join(
                             f"{k} {there.get(k)} -> {here[k]}" for k in differs)})
    # NaN reproduces only NaN (a cell that diverged both times); a committed NaN is never "exact"
    exact = sum(r["difference"] == 0 or (r["committed"] != r["committed"] and r["re-run"] != r["re-run"])
                for r in rows)
    frame = pandas.DataFrame(rows)
    table = frame.drop(columns=["task", "method", "budget"]).to_markdown(index=False, floatfmt=".10g")
    # the comparison itself, from the numbers just trained: test main metric x100 per method
    summary = frame.groupby(["task", "budget", "method"]).agg(
        seeds=("re-run", "size"), re_run_mean=("re-run", "mean"), re_run_std=("re-run", lambda v: v.std(ddof=0)),
        committed_mean=("committed", "mean"))
    comparison = (100 * summary[["re_run_mean", "re_run_std", "committed_mean"]]).join(summary.seeds) \
        .sort_values("re_run_mean", ascending=False).rename(columns={
            "re_run_mean": "re-run mean x100", "re_run_std": "re-run std x100",
            "committed_mean": "committed mean x100"})
    table = ("Re-run on this machine, test main metric (mean and population std over the seeds "
             "re-run):\n\n" + comparison.reset_index().to_markdown(index=False, floatfmt=".2f")
             + "\n\nEvery cell re-run against its committed number:\n\n" + table)
    closing = (f"reproduced {exact} of {len(rows)} committed cells exactly"
               + (f"; {mismatched} differ on a machine that matches the committed fingerprint"
                  if mismatched else ""))
    return table + "\n\n" + closing, 1 if mismatched else 0

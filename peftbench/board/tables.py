"""A board's own sections and lines: settings, search, carry check, per-budget search, progress, timing."""

from __future__ import annotations

import math

import pandas

from peftbench.analysis import statistics
from peftbench.board.paths import machine
from peftbench.contract import registry
from peftbench.rendering.sections import Section
from peftbench.sweep import records as sweep_records
from peftbench.sweep import spec as sweep_spec
from peftbench.sweep import state
from peftbench.training.record import NATURAL


def trial_duration(trial) -> float:
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


def settings_table(spec: sweep_spec.StudySpec) -> pandas.DataFrame:
    """What each (task, method) of the grid runs at: its learning rate, the method settings and
    the source of each (the search's choice, or the spec), from the cells' own run configs."""
    best = sweep_records.tuned_settings(spec)
    per_budget = bool(spec.search and spec.search.per_budget)
    rows = []
    for task in spec.tasks:
        for method in spec.methods:
            uses = registry.get(method).uses_budget
            for budget in (spec.budgets if uses and per_budget else [spec.budgets[0] if uses else NATURAL]):
                config = sweep_spec.cell_run_config(spec, sweep_spec.Cell(task, method, budget, spec.seeds[0]), best)
                own = best.get(f"{task}/{method}/{budget}")
                tuned = own or best.get(f"{task}/{method}")
                rows.append({"task": task, "method": method, **({"budget": budget} if per_budget else {}),
                             "lr": config.train.lr, "method settings": _setting(config.method_params) or "defaults",
                             "from": (f"{'per-budget search' if own else 'search'} (validation "
                                      f"{tuned['validation']:.4f})" if tuned else "spec")})
    return pandas.DataFrame(rows).set_index("task")


def settings_section(spec: sweep_spec.StudySpec) -> Section:
    """The settings every method of the board ran at (settings.csv)."""
    return Section("Settings each method ran at", level=3, table=settings_table(spec), index=True,
                   csv="settings.csv", floatfmt=".4g",
                   note="The learning rate and method settings of every (task, method) of the grid, and "
                        "where they come from (chosen on validation by the search, or the spec; settings.csv).")


def search_sections(spec: sweep_spec.StudySpec) -> list[Section]:
    """The search's table (search.csv), when the spec searched."""
    table = search_table(sweep_records.best_search_params(spec)) if spec.search else pandas.DataFrame()
    if table.empty:
        return []
    search = spec.search
    budget = search.budget or spec.budgets[0]
    seeds = search.seeds or [spec.seeds[0]]
    best = sweep_records.best_search_params(spec)
    seconds = [t.get("duration_s") for entry in best.values() for t in entry.get("tried", [])]
    timed = [x for x in seconds if x is not None]
    spent = (f" Search time: {sum(timed) / 3600:.2f} h over {len(timed)} settings tried"
             + (f" ({len(seconds) - len(timed)} tried before durations were recorded)." if len(timed) < len(seconds) else ".")
             if timed else "")
    return [Section("Settings chosen on validation", level=3, table=table,
                    index=True, csv="search.csv", floatfmt=".4f",
                    note=f"Validation main metric of each setting tried (mean over seed{'s' if len(seeds) > 1 else ''} "
                         f"{', '.join(map(str, seeds))} of the search, budget {budget}, the grid's schedule); "
                         f"each (task, method) of the grid uses its chosen setting (blank: not tried for "
                         f"that row; search.json, search.csv).{spent}")]


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


def time_line(spec: sweep_spec.StudySpec, frame: pandas.DataFrame) -> str:
    """The board's cost in one line: the wall time of every trial, summed, for the search
    (search.json), the grid's cells, the carry check (carry.json) and the per-budget search
    (per-budget.json; its trials' time is that of the seeds it trained). Workers run trials side
    by side, so the elapsed time is this sum over the number of workers, roughly."""
    def hours(record: str) -> float:
        entries = sweep_records.read_record(spec.out / record).values() if spec.search else []
        return sum(t.get("duration_s") or 0.0 for e in entries for t in e.get("tried", [])) / 3600

    parts = {"search": hours("search.json"),
             "grid": frame.duration_s.sum() / 3600 if not frame.empty else 0.0,
             "carry check": hours("carry.json"), "per-budget search": hours(sweep_records.PER_BUDGET)}
    shown = {k: v for k, v in parts.items() if v or k == "grid"}
    return ("- wall time of the trials, summed (trials of parallel workers overlap; scoring cached "
            "across budgets): " + " + ".join(f"{k} {v:.2f} h" for k, v in shown.items())
            + (f" = {sum(shown.values()):.2f} h" if len(shown) > 1 else "")
            + ("" if not frame.empty else " (no complete group of the grid yet)"))


def carry_table(spec: sweep_spec.StudySpec, frame: pandas.DataFrame) -> pandas.DataFrame:
    """carry.json against the grid: per (task, method, budget), the carried setting's validation
    on the check's seeds, the best of it and its two neighbours, `cost` = how much validation
    the carried value gives up against that best (0 when it is the best), and the cell's seed
    spread (std of the test metric over the reported seeds, NaN before its cells are in);
    `within spread` says whether the cost is at most the spread."""
    entries = sweep_records.read_record(spec.out / "carry.json")
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


def carry_sections(spec: sweep_spec.StudySpec, frame: pandas.DataFrame) -> list[Section]:
    """The carry check's section (carry.csv), when the spec has a carry check with results."""
    if not (spec.search and spec.search.carry_check):
        return []
    table = carry_table(spec, frame)
    if table.empty:
        return []
    judged = table["within spread"].dropna()
    records = table.to_dict("records")
    over = [(r["task"], r["method"], r["budget"]) for r in records if r["within spread"] is False]
    # a key re-running at its own rate (per_budget) has no complete cell: named, never silently
    # dropped from the count, since those are the keys where carrying cost most
    unjudged = ["/".join((r["task"], r["method"], r["budget"])) for r in records if r["within spread"] is None]
    seeds = ", ".join(map(str, spec.search.carry_check))
    keys = sweep_records.carry_keys(spec)
    return [Section("Carrying the tuned rate to other budgets", table=table, csv="carry.csv", floatfmt=".4g", note=(
            "carry.json, carry.csv. "
            + (f"What carrying the setting tuned at budget {sweep_records.search_budget(spec)} to the other budgets "
             "would cost (the per-budget search below tunes each budget instead, from these runs). "
             if spec.search.per_budget else
             f"The setting tuned at budget {sweep_records.search_budget(spec)} is carried to the other budgets. ")
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
            + (f" {len(table)} of {len(keys)} keys checked so far." if len(table) < len(keys) else "")))]


def per_budget_sections(spec: sweep_spec.StudySpec) -> list[Section]:
    """The per-budget search's section (per-budget.csv), when the spec tunes each budget on its own."""
    if not (spec.search and spec.search.per_budget):
        return []
    record = sweep_records.read_record(spec.out / sweep_records.PER_BUDGET)
    keys = sweep_records.carry_keys(spec)
    # rows in the spec's order (task, method, budget), not the order the workers finished them
    ordered = {**{k: record[k] for k in keys if k in record}, **record}
    table = search_table(ordered)
    if table.empty:
        return []
    (name, _), = spec.search.params.items()
    table.insert(table.columns.get_loc("chosen"), "carried",
                 [_setting(entry["carried"]) for entry in ordered.values()])
    moved = [k for k, e in record.items() if not math.isclose(e["train"][name], e["carried"][name], rel_tol=1e-9)]
    seeds = ", ".join(map(str, spec.search.seeds))
    return [Section("Settings tuned at each budget", level=3, table=table, index=True, csv="per-budget.csv",
                    floatfmt=".4f", note=(
            f"per-budget.json, per-budget.csv. Each budget other than {sweep_records.search_budget(spec)}, for every budget-parameterised "
            f"method: the carry check's three values around the carried one, widened by the edge "
            f"rule, chosen by the mean validation over seeds {seeds} (the carry check's seeds read "
            f"back from carry.json, not trained again). {len(record)} of {len(keys)} keys tuned; "
            f"the chosen {name} differs from the carried one in {len(moved)} of them (blank: not "
            f"tried at that budget)."))]


def board_progress(spec: sweep_spec.StudySpec, study) -> dict:
    """Which cells are in: every cell's state, the settled ones (done, or failed for good), the
    complete (task, method, budget) groups (every seed settled) and the missing cells by group."""
    states = state.cell_states(study, state.Fingerprints(spec))
    settled = {k for k, v in states.items()
               if v["state"] == "done" or (v["state"] == "failed" and v.get("final"))}
    groups: dict[tuple, list] = {}
    for cell in sweep_spec.cells(spec):
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


def joined_sections(spec: sweep_spec.StudySpec) -> list[Section]:
    """The protocol's amendment for each method joined after the board was built."""
    if not spec.joined:
        return []
    return [Section("Joined after the board was built", level=3, note="\n".join(
            f"- {j.method}" + (f" ({', '.join(f'{k}={v}' for k, v in j.params.items())})" if j.params else "")
              + f": joined on {j.date} with peftbench {j.peftbench} (`peftbench leaderboard join`), under "
              "the protocol above: its own search, carry check and per-budget search where the board has "
              "them, the board's seeds, budgets and training." for j in spec.joined))]


def frozen_lines(spec: sweep_spec.StudySpec) -> list[str]:
    """The first lines of a frozen board: which code made it, what changed, where to look now."""
    if spec.frozen is None:
        return []
    see = f" Superseded by [{spec.frozen.see}](../{spec.frozen.see}/)." if spec.frozen.see else ""
    return [f"**Made before a change of the methods**: its cells were made with peftbench "
            f"{spec.frozen.version}; {spec.frozen.reason}. It is kept as it was, read back from its "
            f"committed cells, and not run again.{see}", ""]


def page_meta(spec: sweep_spec.StudySpec, command: str, done: int, expected: int) -> dict[str, str]:
    return {"command": command, "machine": machine() + (f" (spec says: {spec.machine})" if spec.machine else ""),
            "model": spec.model, "tasks": ", ".join(spec.tasks), "seeds": str(spec.seeds),
            "budgets": ", ".join(spec.budgets),
            "training": ", ".join(f"{k}={v}" for k, v in vars(spec.train).items()),
            **{f"training for {m}": ", ".join(f"{k}={v}" for k, v in values.items())
               for m, values in spec.method_train.items()},
            "cells finished": f"{done} of {expected}",
            **{f"not the paper's variant: {m}": note for m, note in spec.method_notes.items()}}

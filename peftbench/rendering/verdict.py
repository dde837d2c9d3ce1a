"""The board's verdict in words, from the pre-declared comparisons and the rankings, no stronger than its tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from peftbench.analysis.checks import constant_cells, selection_checks
from peftbench.analysis.ranks import friedman_by_budget
from peftbench.analysis.statistics import MIN_TASKS, comparisons, kept_budget

DEFAULT_AGAINST = ("random", "fulltuning")


def _pct(budget: str) -> str:
    return f"{100 * float(budget):g}%"


def verdict(frame: pd.DataFrame, rankings: list[dict] | None = None, compared: pd.DataFrame | None = None,
            alpha: float = 0.05) -> str:
    """One paragraph a reader can quote, written from the statistics at the strength they
    support: per budget, Friedman over the tasks (descriptive below MIN_TASKS tasks); the
    pre-declared comparisons against Random and full fine-tuning, per task (Holm within each
    budget's family) and across tasks (hierarchical); the reference rows that are never
    ranked; the cells at the constant predictor."""
    rankings = rankings if rankings is not None else friedman_by_budget(frame)
    compared = compared if compared is not None else comparisons(frame)
    parts = []
    natural = sorted(set(frame.loc[frame.budget == "natural", "method"]))
    kept = kept_budget(frame)
    over = sorted({f"{m} at {_pct(b)}" for (t, m, b), ok in kept.items() if not ok})
    if natural or over:
        parts.append("Reference rows, never ranked in a budget: "
                     + "; ".join(filter(None, [f"natural count: {', '.join(natural)}" if natural else "",
                                               f"over budget: {', '.join(over)}" if over else ""])) + ".")
    for r in rankings:
        head = (f"At {_pct(r['budget'])}, Friedman over {r['n_tasks']} task(s) (the independent units) and "
                f"{r['n_methods']} methods: chi2 = {r['statistic']:.2f}, p = {r['p']:.2g}; Iman-Davenport "
                f"F = {r['iman_davenport']:.2f}, p = {r['p_iman_davenport']:.2g}")
        if r["descriptive"]:
            head += (f": descriptive only (fewer than {MIN_TASKS} tasks), no ranking of pairs is "
                     f"claimed; best mean rank {_ties(r['ranks'])}.")
        else:
            head += (": the mean ranks " + ("differ" if r["p_iman_davenport"] < alpha else "do not differ")
                     + f" at {alpha}; best mean rank {_ties(r['ranks'])}.")
        parts.append(head)
    if not compared.empty:
        per_task = compared[compared.task.str.startswith("across") == False]  # noqa: E712
        across = compared[compared.task.str.startswith("across")]
        for reference in dict.fromkeys(per_task.against):
            fam = per_task[per_task.against == reference]
            above = fam[(fam.p_holm < alpha) & (fam.difference > 0)]
            below = fam[(fam.p_holm < alpha) & (fam.difference < 0)]
            text = (f"Against {reference} ({len(fam)} per-task comparisons, seed and test-set error, "
                    f"Holm within each budget): ")
            text += (f"{len(above)} above ({_list(above)}), {len(below)} below ({_list(below)}); "
                     f"the other {len(fam) - len(above) - len(below)} are not resolved.")
            h = across[across.against == reference]
            if not h.empty:
                sure_better = h[h.p_better >= 0.95]
                sure_worse = h[h.p_worse >= 0.95]
                tasks = int(h.tasks.max())
                text += (f" Across the {tasks} task(s) (hierarchical model, ROPE one test-set SE): "
                         f"P(better) >= 0.95 for {_list(sure_better, task=False)}; P(worse) >= 0.95 for "
                         f"{_list(sure_worse, task=False)}"
                         + ("; with so few tasks the mean effect across tasks is weakly identified."
                            if tasks < MIN_TASKS else "."))
            parts.append(text)
    checks = selection_checks(frame)
    for check, what in (("concentrated", "put more than half their selection in one tensor outside the repeated "
                                          "blocks (they measure that tensor)"),
                         ("underspent", "trained less than half their budget"),
                         ("underspent seeds", "keep to half their budget on average but not in every seed")):
        found = checks[checks.check == check] if not checks.empty else checks
        if not found.empty:
            parts.append(f"{len(found)} cell(s) {what}: " + ", ".join(
                f"{r.task}/{r.method}/b{r.budget}" for r in found.itertuples()) + ".")
    stuck = constant_cells(frame)
    parts.append(f"{len(stuck)} cell(s) are within noise of the constant predictor (did not measurably "
                 f"learn; their order among themselves is noise): {', '.join(stuck[:12])}"
                 f"{' ...' if len(stuck) > 12 else ''}." if stuck else
                 "No cell is within noise of the constant predictor.")
    return " ".join(parts)


def _ties(ranks: pd.Series) -> str:
    """'a (1.50)' or, when several share the best mean rank, 'a, b (tied, 1.50)'."""
    best = ranks[np.isclose(ranks, ranks.iloc[0])]
    return (f"{best.index[0]} ({best.iloc[0]:.2f})" if len(best) == 1
            else f"{', '.join(best.index)} (tied, {best.iloc[0]:.2f})")


def _list(rows: pd.DataFrame, task: bool = True, most: int = 12) -> str:
    if rows.empty:
        return "none"
    names = [f"{r.method} {_pct(r.budget)}" + (f" {r.task}" if task else "") for r in rows.itertuples()]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")

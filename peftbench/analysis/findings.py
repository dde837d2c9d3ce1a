"""Fu et al.'s three findings (AAAI 2023, "On the effectiveness of parameter-efficient
fine-tuning"), tested on a board's own runs, so a board can say which hold at its scale.

1. SAM beats Random at the same budget (their Table 1 at 0.5%).
2. Sparse (parameter-efficient) fine-tuning is more stable over seeds than full fine-tuning.
3. The stability rank correlates with the performance rank (their Spearman rho = 0.4356).

Each finding gets a statistic per task, a p-value or interval, and a verdict worded at the
strength the evidence supports (`worded`): "holds on all N tasks", "holds on stsb only (1 of 2
tasks)", "direction holds, strength uncertain", "not resolved". Tasks are the independent units;
seeds are repeated measurements inside a task and never pooled across tasks.
Why these tests:
- (1) differences SAM - Random paired by seed within each task (the same seed shares the data
  order and the head's initialisation), with seed and test-set error
  (`analysis.uncertainty.paired_difference`); across tasks, the hierarchical model of `analysis.statistics.comparisons`;
- (2) the ratio std(method) / std(full FT) per (task, budget, method), Brown-Forsythe's test
  (Levene around the median, robust to the few seeds being skewed) for each, and the median
  ratio per task with a bootstrap interval that resamples full FT's seeds (its std is shared by
  every cell of the task: one noisy number, not many independent ones); Brown-Forsythe's p
  Holm-adjusted over all cells;
- (3) Spearman over the (method, task) cells of each budget among the methods that keep to it,
  with a percentile-bootstrap interval over cells ("consistent with theirs" when 0.4356 lies
  inside it), and the same without the cells where a seed collapsed (`collapsed_cells`): a
  correlation that rests on collapsing runs is said to.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats

from peftbench.analysis import checks, statistics
from peftbench.analysis import ranks as analysis_ranks
from peftbench.training.record import budget_blocks

ALPHA = 0.05
FU_RHO = 0.4356
FU_BUDGET = "0.005"


def verdict(effect: float, p: float) -> str:
    """'holds' (significant in the claimed direction), 'opposite' (significant against it) or
    'not resolved' (p >= ALPHA, or no test)."""
    if not np.isfinite(p) or p >= ALPHA:
        return "not resolved"
    return "holds" if effect > 0 else "opposite"


def _t_interval(d: np.ndarray) -> tuple[float, float]:
    if len(d) < 2 or np.std(d) == 0:
        return np.nan, np.nan
    low, high = scipy.stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy.stats.sem(d))
    return float(low), float(high)


def worded(verdicts: dict[str, str]) -> str:
    """The verdict over tasks, at its strength: per-task verdicts ({task: 'holds' | 'opposite'
    | 'not resolved'}) -> 'holds on all 2 tasks', 'holds on stsb only (1 of 2 tasks)', 'mixed:
    holds on a, opposite on b', 'not resolved on any of 2 tasks'."""
    n = len(verdicts)
    holds = [t for t, v in verdicts.items() if v == "holds"]
    opposite = [t for t, v in verdicts.items() if v == "opposite"]
    if holds and opposite:
        return f"mixed: holds on {', '.join(holds)}, opposite on {', '.join(opposite)} (of {n} tasks)"
    for found, word in ((holds, "holds"), (opposite, "opposite")):
        if found:
            if len(found) == n:
                return f"{word} on all {n} tasks" if n > 1 else f"{word} on {found[0]} (the only task)"
            return f"{word} on {', '.join(found)} only ({len(found)} of {n} tasks)"
    return f"not resolved on any of {n} tasks" if n > 1 else "not resolved (one task)"


def sam_vs_random(frame: pd.DataFrame, budget: str = FU_BUDGET) -> pd.DataFrame:
    """Rows per task: n pairs, mean difference SAM - Random (x100), its 95% interval with seed
    and test-set error, p, verdict. Empty if either method or the budget is missing."""
    from peftbench.analysis import uncertainty

    cells = frame[frame.budget == budget]
    sam, random = cells[cells.method == "sam"], cells[cells.method == "random"]
    pairs = sam.merge(random, on=["task", "seed"], suffixes=("_sam", "_random"))
    if pairs.empty:
        return pd.DataFrame()
    constant = checks.constant_scores(frame)
    rows = []
    for task, g in pairs.groupby("task"):
        n = int(constant.loc[task, "test_rows"]) if task in constant.index else 0
        kind = uncertainty.test_se_kind(g.metric_name_sam.iloc[0]) if "metric_name_sam" in g else None
        booted = None
        if "predictions_sam" in g:
            booted = statistics.test_error(g.rename(columns={"predictions_sam": "predictions", "metric_name_sam": "metric_name"}),
                                           g.rename(columns={"predictions_random": "predictions"}))
        d = uncertainty.paired_difference(g.metric_sam, g.metric_random, n, kind, se_test=booted)
        rows.append({"task": task, "pairs": d["seeds"], "difference": 100 * d["difference"],
                     "ci_low": 100 * d["low"], "ci_high": 100 * d["high"], "p": d["p"],
                     "verdict": verdict(d["difference"], d["p"])})
    return pd.DataFrame(rows)


def stability_vs_full(frame: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Per (task, budget, method other than full FT): std over seeds of the method and of full
    FT (x100), their ratio, Brown-Forsythe p (raw and Holm-adjusted over the cells). Summary, per
    task: the median ratio with a 95% bootstrap interval and p, resampling the seeds of every
    cell *and of full FT* (the cells of a task share full FT's std, so a count of cells below it
    would treat one noisy number as many independent ones); the verdict over tasks (`worded`).
    Natural-count methods count once per task."""
    full = frame[frame.method == "fulltuning"]
    if full.empty:
        return pd.DataFrame(), {}
    rows, samples = [], []
    for (task, budget, method), g in frame[frame.method != "fulltuning"].groupby(["task", "budget", "method"]):
        ref = full[full.task == task].metric.to_numpy()
        values = g.metric.to_numpy()
        if len(ref) < 2 or len(values) < 2:
            continue
        s, s_full = np.std(values), np.std(ref)
        both_constant = np.ptp(values) == 0 and np.ptp(ref) == 0
        p = np.nan if both_constant else float(scipy.stats.levene(values, ref, center="median").pvalue)
        rows.append({"task": task, "budget": budget, "method": method, "seeds": len(values),
                     "std": 100 * s, "std_full": 100 * s_full,
                     "ratio": s / s_full if s_full > 0 else np.nan, "brown_forsythe_p": p})
        samples.append((task, values))
    table = pd.DataFrame(rows)
    if table.empty:
        return table, {}
    table["brown_forsythe_p_holm"] = statistics.holm(table.brown_forsythe_p.to_numpy())
    tasks = sorted(set(table.task))
    fulls = {t: full[full.task == t].metric.to_numpy() for t in tasks}
    per_task = {t: _median_ratio([v for task, v in samples if task == t], {t: fulls[t]}, [t] * sum(
        task == t for task, _ in samples), resamples, seed) for t in tasks}
    for t, found in per_task.items():
        found["median"] = float(table[table.task == t].ratio.median())
        found["verdict"] = verdict(1 - found["median"], found["p"])
    significant = table[table.brown_forsythe_p_holm < ALPHA]
    summary = {"cells": len(table), "tasks": len(tasks), "stabler": int((table["std"] < table["std_full"]).sum()),
               "median_ratio": float(table.ratio.median()), "per_task": per_task,
               "significant_stabler": int((significant["std"] < significant["std_full"]).sum()),
               "significant_less_stable": int((significant["std"] > significant["std_full"]).sum()),
               "verdict": worded({t: f["verdict"] for t, f in per_task.items()})}
    return table, summary


def _median_ratio(samples: list, fulls: dict, owners: list, resamples: int, seed: int) -> dict:
    """Bootstrap of the median std ratio over cells, resampling every cell's seeds and full FT's
    once per task per draw: 95% percentile interval and two-sided p against a ratio of 1."""
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in range(resamples):
            s_full = {t: np.std(rng.choice(v, len(v))) for t, v in fulls.items()}
            ratios = [np.std(rng.choice(v, len(v))) / s_full[t] for t, v in zip(owners, samples)]
            draws[b] = np.nanmedian(ratios) if not np.all(np.isnan(ratios)) else np.nan
    draws = draws[~np.isnan(draws)]
    # no interpolation: a resample where full FT's seeds all agree gives an infinite ratio
    low, high = ((float(v) for v in np.percentile(draws, [2.5, 97.5], method="inverted_cdf"))
                 if len(draws) else (np.nan, np.nan))
    p = float(min(1.0, 2 * min(np.mean(draws >= 1), np.mean(draws <= 1)))) if len(draws) else np.nan
    return {"ci_low": low, "ci_high": high, "p": p}


def collapsed_cells(frame: pd.DataFrame) -> set[tuple[str, str, str]]:
    """(task, method, budget) cells with a seed that collapsed: closer to the constant
    predictor's score than to the cell's best seed. Such a seed makes a cell's std large and its
    mean low at once, so it alone can tie stability to performance."""
    constant = checks.constant_scores(frame)
    out = set()
    for (task, method, budget), g in frame.groupby(["task", "method", "budget"]):
        if task not in constant.index:
            continue
        c, best = float(constant.loc[task, "metric"]), float(g.metric.max())
        if np.any(np.abs(g.metric - c) < np.abs(g.metric - best)):
            out.add((task, method, budget))
    return out


def _spearman_with_interval(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> dict:
    rho, p = analysis_ranks.spearman(x, y) if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0 else (np.nan, np.nan)
    low = high = np.nan
    if len(x) >= 4 and np.isfinite(rho):
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(resamples):
            i = rng.integers(0, len(x), len(x))
            if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
                draws.append(scipy.stats.spearmanr(x[i], y[i])[0])
        low, high = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
    return {"cells": len(x), "spearman": float(rho), "p": float(p), "ci_low": low, "ci_high": high}


def rank_correlation(frame: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per budget, among the methods that keep to it (natural-count rows are not ranked in a
    budget): Spearman rho between stability rank and performance rank over the (method, task)
    cells, its p, a 95% percentile bootstrap interval over cells, whether Fu et al.'s 0.4356
    lies inside it; and the same without the cells where a seed collapsed (`collapsed_cells`)."""
    stats = statistics.cell_stats(frame)
    collapsed = collapsed_cells(frame)
    rows = []
    for budget in budget_blocks(stats.budget):
        ranked = set(statistics.competing(frame, budget).method)
        cells = stats[(stats.budget == budget) & stats.method.isin(ranked)]
        if cells.empty:
            continue
        out = {"budget": budget}
        for suffix, subset in (("", cells), ("_without_collapsed", cells[[
                (t, m, b) not in collapsed for t, m, b in zip(cells.task, cells.method, cells.budget)]])):
            table = analysis_ranks.table1(subset)
            cols = [c for c in table.mean.columns if c != "AVG"]
            x, y = table.std_rank[cols].to_numpy().ravel(), table.mean_rank[cols].to_numpy().ravel()
            keep = ~(np.isnan(x) | np.isnan(y))
            found = _spearman_with_interval(x[keep], y[keep], resamples, seed)
            out.update({f"{k}{suffix}": v for k, v in found.items()})
            out[f"verdict{suffix}"] = verdict(found["spearman"], found["p"])
        out["contains_fu"] = bool(out["ci_low"] <= FU_RHO <= out["ci_high"]) if np.isfinite(out["ci_low"]) else False
        rows.append(out)
    return pd.DataFrame(rows)


def sections(frame: pd.DataFrame) -> list[dict]:
    """The section "Fu et al.'s findings at this scale" and one per finding, as the fields of
    `rendering.sections.Section` (title, level, note, table, csv, floatfmt): each finding's
    headline is its note, its table is saved as findings-sam-random.csv, findings-stability.csv,
    findings-ranks.csv. [] when the board has none of the methods the findings compare."""
    sam = sam_vs_random(frame)
    stability, summary = stability_vs_full(frame)
    ranks = rank_correlation(frame)
    if sam.empty and stability.empty and ranks.empty:
        return []
    headlines = []
    if not sam.empty:
        said = worded(dict(zip(sam.task, sam.verdict)))
        per = "; ".join(f"{r.task} {r.difference:+.2f} (95% CI {r.ci_low:+.2f} to {r.ci_high:+.2f}, p = {r.p:.2g})"
                        for r in sam.itertuples())
        across = statistics.comparisons(frame[frame.method.isin(["sam", "random"])], references=("random",))
        across = across[(across.budget == FU_BUDGET) & across.task.str.startswith("across")] if not across.empty else across
        h = (f" Across tasks (hierarchical, ROPE one test-set SE): P(SAM better) = {across.p_better.iloc[0]:.2f}, "
             f"P(equivalent) = {across.p_equivalent.iloc[0]:.2f}, P(worse) = {across.p_worse.iloc[0]:.2f}."
             if not across.empty else "")
        headlines.append(f"**1. Does SAM beat Random at 0.5%?** {said}. SAM - Random x100, seed and "
                         f"test-set error: {per}.{h} Fu et al.: SAM above Random on every task.")
    if summary:
        per = "; ".join(f"{t} median ratio {f['median']:.2f} (95% bootstrap CI {f['ci_low']:.2f} to "
                        f"{f['ci_high']:.2f}, p = {f['p']:.2g}: {f['verdict']})" for t, f in summary["per_task"].items())
        headlines.append(
            f"**2. Are sparse methods more stable than full fine-tuning?** {summary['verdict']}"
            + (f"; over {summary['tasks']} task(s) the direction, not its strength, is what this shows"
               if summary["tasks"] < statistics.MIN_TASKS and not summary["verdict"].startswith("not resolved") else "")
            + f". Per task, std / std(full FT) over its cells ({summary['cells']} cells in all; the "
            f"cells of a task share full FT's one std over {int(stability.seeds.max())} seeds): {per}. "
            f"Brown-Forsythe per cell, Holm-adjusted over {summary['cells']}: "
            f"{summary['significant_stabler']} significantly stabler, {summary['significant_less_stable']} "
            "significantly less stable. Fu et al.: sparse methods are stabler (their Table 1 std ranks).")
    if not ranks.empty:
        def one(rho, p, cells):
            return (f"rho = {rho:.2f} (p = {p:.2g}, {cells} cells)" if np.isfinite(rho)
                    else f"no correlation to test ({cells} cells: too few, or a constant rank)")

        per = "; ".join(f"{float(r.budget) * 100:g}%: {one(r.spearman, r.p, r.cells)}, without collapsed cells "
                        f"{one(r.spearman_without_collapsed, r.p_without_collapsed, r.cells_without_collapsed)}"
                        for r in ranks.itertuples())
        robust = (ranks.verdict == "holds") & (ranks.verdict_without_collapsed != "holds")
        said = worded(dict(zip(ranks.budget.map(lambda b: f"{float(b) * 100:g}%"), ranks.verdict))).replace("tasks", "budgets").replace("(one task)", "(one budget)").replace("the only task", "the only budget")
        headlines.append(
            f"**3. Does the stability rank correlate with the performance rank?** {said}"
            + (f"; it rests on collapsing runs at {int(robust.sum())} of {len(ranks)} budgets (not resolved without them)"
               if robust.any() else "")
            + f". Among the methods that keep to each budget: {per}. The cells of a task share its seeds "
            f"and test set, so the cell count overstates the evidence. Fu et al.: Spearman rho = {FU_RHO} "
            "(p = 0.000014) over their Table 1.")
    out = [dict(title="Fu et al.'s findings at this scale",
                note="Verdicts are worded from per-task tests (the tasks are the independent units): "
                     "'holds' / 'opposite' = significant at 0.05 in / against Fu et al.'s direction, on "
                     "the tasks named; 'not resolved' = no significant difference at this many seeds "
                     "and tasks (which is not evidence that there is none). Tests are described in "
                     "`peftbench/analysis/findings.py`.")]
    if not sam.empty:
        out.append(dict(title="1. Does SAM beat Random at 0.5%? (SAM - Random, x100, paired by seed)", level=3,
                        note=headlines.pop(0), table=sam, csv="findings-sam-random.csv",
                        floatfmt=("", ".0f", "+.2f", "+.2f", "+.2f", ".3g", "")))
    if summary:
        out.append(dict(title="2. Are sparse methods more stable than full fine-tuning? (std x100)", level=3,
                        note=headlines.pop(0), table=stability, csv="findings-stability.csv"))
    if not ranks.empty:
        out.append(dict(title="3. Does the stability rank correlate with the performance rank?", level=3,
                        note=headlines.pop(0), table=ranks, csv="findings-ranks.csv"))
    return out

"""Fu et al.'s three findings (AAAI 2023, "On the effectiveness of parameter-efficient
fine-tuning"), tested on a board's own runs, so a board can say which hold at its scale.

1. SAM beats Random at the same budget (their Table 1 at 0.5%).
2. Sparse (parameter-efficient) fine-tuning is more stable over seeds than full fine-tuning.
3. The stability rank correlates with the performance rank (their Spearman rho = 0.4356).

Each finding gets a statistic, a p-value or interval, and a verdict that only says what the data
say: "holds" or "opposite" where the test is significant at `ALPHA`, else "not resolved".
Why these tests:
- (1) differences SAM - Random paired by (task, seed): the same seed shares the data order and
  the classifier head's initialisation; a paired t-test per task and over all pairs (the
  pooled test mixes tasks whose metrics differ in spread: read it as a summary);
- (2) the ratio std(method) / std(full FT) per (task, budget, method), Brown-Forsythe's test
  (Levene around the median, robust to the few seeds being skewed) for each, and the median
  ratio over all cells with a bootstrap interval that resamples full FT's seeds once per task
  (its std is shared by every cell of the task: counting cells below it would take one noisy
  number for many independent ones);
- (3) Spearman over the (method, task) cells of each budget's table as `report`
  computes it, with a percentile-bootstrap interval over cells; "consistent with theirs" when
  0.4356 lies inside it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats

from peftbench import statistics
from peftbench.record import budget_blocks

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


def sam_vs_random(frame: pd.DataFrame, budget: str = FU_BUDGET) -> pd.DataFrame:
    """Rows per task and 'all': n pairs, mean difference SAM - Random (x100), its 95% t
    interval, the paired t-test p. Empty if either method or the budget is missing."""
    cells = frame[frame.budget == budget]
    sam, random = cells[cells.method == "sam"], cells[cells.method == "random"]
    pairs = sam.merge(random, on=["task", "seed"], suffixes=("_sam", "_random"))
    if pairs.empty:
        return pd.DataFrame()
    rows = []
    for task, g in [*pairs.groupby("task"), ("all", pairs)]:
        d = 100 * (g.metric_sam - g.metric_random).to_numpy()
        p = statistics.paired_test(g.metric_sam.to_numpy(), g.metric_random.to_numpy())[0]
        low, high = _t_interval(d)
        rows.append({"task": task, "pairs": len(d), "difference": d.mean(), "ci_low": low,
                     "ci_high": high, "t_p": p, "verdict": verdict(d.mean(), p)})
    return pd.DataFrame(rows)


def stability_vs_full(frame: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Per (task, budget, method other than full FT): std over seeds of the method and of full
    FT (x100), their ratio, Brown-Forsythe p. Summary: the median ratio over all cells with a
    95% bootstrap interval and p, resampling the seeds of every cell *and of full FT once per
    task* (the cells of a task share full FT's std, so a count of cells below it would treat one
    noisy number as many independent ones). Natural-count methods count once per task."""
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
    rng = np.random.default_rng(seed)
    tasks = sorted(set(table.task))
    fulls = {t: full[full.task == t].metric.to_numpy() for t in tasks}
    draws = np.empty(resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in range(resamples):
            s_full = {t: np.std(rng.choice(v, len(v))) for t, v in fulls.items()}
            ratios = [np.std(rng.choice(v, len(v))) / s_full[t] for t, v in samples]
            draws[b] = np.nanmedian(ratios) if not np.all(np.isnan(ratios)) else np.nan
    draws = draws[~np.isnan(draws)]
    median = float(table.ratio.median())
    # no interpolation: a resample where full FT's seeds all agree gives an infinite ratio
    low, high = ((float(v) for v in np.percentile(draws, [2.5, 97.5], method="inverted_cdf"))
                 if len(draws) else (np.nan, np.nan))
    p = float(min(1.0, 2 * min(np.mean(draws >= 1), np.mean(draws <= 1)))) if len(draws) else np.nan
    significant = table[table.brown_forsythe_p < ALPHA]
    summary = {"cells": len(table), "tasks": len(tasks), "stabler": int((table["std"] < table["std_full"]).sum()),
               "median_ratio": median, "ci_low": low, "ci_high": high, "p": p,
               "significant_stabler": int((significant["std"] < significant["std_full"]).sum()),
               "significant_less_stable": int((significant["std"] > significant["std_full"]).sum()),
               "verdict": verdict(1 - median, p)}
    return table, summary


def rank_correlation(frame: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per budget's table (natural-count methods included, as `report`): Spearman rho between
    stability rank and performance rank over the (method, task) cells, its p, a 95% percentile
    bootstrap interval over cells, and whether Fu et al.'s 0.4356 lies inside it."""
    stats = statistics.cell_stats(frame)
    budgets = budget_blocks(stats.budget)
    rows = []
    for budget in budgets:
        table = statistics.table1(statistics.budget_rows(stats, budget))
        corr = statistics.stability_correlation(table)
        cols = corr["columns"]
        s = table.std_rank[cols].to_numpy().ravel()
        r = table.mean_rank[cols].to_numpy().ravel()
        keep = ~(np.isnan(s) | np.isnan(r))
        low = high = np.nan
        if keep.sum() >= 4 and np.isfinite(corr["spearman"]):
            rng = np.random.default_rng(seed)
            x, y = s[keep], r[keep]
            draws = []
            for _ in range(resamples):
                i = rng.integers(0, len(x), len(x))
                if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
                    draws.append(scipy.stats.spearmanr(x[i], y[i])[0])
            low, high = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
        rows.append({"budget": budget, "cells": corr["n"], "spearman": corr["spearman"],
                     "p": corr["spearman_p"], "ci_low": low, "ci_high": high,
                     "contains_fu": bool(low <= FU_RHO <= high) if np.isfinite(low) else False,
                     "verdict": verdict(corr["spearman"], corr["spearman_p"])})
    return pd.DataFrame(rows)


def section(frame: pd.DataFrame, out_dir=None) -> list[str]:
    """Markdown lines of the section "Fu et al.'s findings at this scale" ([] when the board
    has none of the methods the findings compare); with `out_dir`, each finding's table is
    also written there (findings-sam-random.csv, findings-stability.csv, findings-ranks.csv)."""
    lines = []
    sam = sam_vs_random(frame)
    stability, summary = stability_vs_full(frame)
    ranks = rank_correlation(frame)
    if out_dir is not None:
        for name, table in (("sam-random", sam), ("stability", stability), ("ranks", ranks)):
            if not table.empty:
                table.to_csv(f"{out_dir}/findings-{name}.csv", index=False)
    if sam.empty and stability.empty and ranks.empty:
        return lines
    lines += ["## Fu et al.'s findings at this scale", "",
              "Verdicts: 'holds' = significant (p < 0.05) in Fu et al.'s direction; 'opposite' = "
              "significant against it; 'not resolved' = no significant difference at this many "
              "seeds and tasks (which is not evidence that there is none). Tests are described in "
              "`peftbench/findings.py`.", ""]
    if not sam.empty:
        pooled = sam[sam.task == "all"].iloc[0]
        lines += [f"**1. Does SAM beat Random at 0.5%?** {pooled.verdict}: SAM - Random = "
                  f"{pooled.difference:+.2f} points (95% CI {pooled.ci_low:+.2f} to {pooled.ci_high:+.2f}), "
                  f"paired t-test p = {pooled.t_p:.3g} over {pooled.pairs} (task, seed) pairs. "
                  "Fu et al.: SAM above Random on every task.", "",
                  sam.to_markdown(index=False, floatfmt=("", ".0f", "+.2f", "+.2f", "+.2f", ".3g", "")), ""]
    if summary:
        lines += [f"**2. Are sparse methods more stable than full fine-tuning?** {summary['verdict']}: "
                  f"median over the {summary['cells']} (task, budget, method) cells of std / std(full "
                  f"FT on that task) = {summary['median_ratio']:.2f} (95% bootstrap CI "
                  f"{summary['ci_low']:.2f} to {summary['ci_high']:.2f}, p = {summary['p']:.3g}; seeds "
                  f"resampled in every cell and in full FT once per task, {summary['tasks']} task(s)); "
                  f"{summary['stabler']} of {summary['cells']} cells below full FT's std; per cell, "
                  f"Brown-Forsythe finds {summary['significant_stabler']} significantly stabler and "
                  f"{summary['significant_less_stable']} significantly less stable. "
                  "Fu et al.: sparse methods are stabler (their Table 1 std ranks).", "",
                  stability.to_markdown(
                      index=False, floatfmt=("", "", "", ".0f", ".2f", ".2f", ".2f", ".3g")), ""]
    if not ranks.empty:
        lines += ["**3. Does the stability rank correlate with the performance rank?** Fu et al.: "
                  f"Spearman rho = {FU_RHO} (p = 0.000014) over their Table 1. Here, per budget "
                  "(ranks within each task column, natural-count methods in every budget):", "",
                  ranks.to_markdown(index=False, floatfmt=("", ".0f", ".4f", ".3g", ".3f", ".3f", "", "")),
                  ""]
    return lines

"""Ranks: Fu et al.'s Table 1, stability against performance, Friedman per budget over tasks with Wilcoxon-Holm pairs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from peftbench.analysis.statistics import MIN_TASKS, competing, holm
from peftbench.core.errors import check_choice
from peftbench.training.record import NATURAL, budget_blocks

TIES = ("average", "min", "max", "dense", "ordinal")


def wilcoxon_holm(matrix: pd.DataFrame) -> pd.DataFrame:
    """Pairwise two-sided Wilcoxon signed-rank p-values between the methods (columns) over the
    rows (tasks: one independent value each), Holm-adjusted over all pairs (Benavoli, Corani &
    Mangili 2016). A pair whose differences are all zero has p = 1."""
    methods = list(matrix.columns)
    pairs = list(itertools.combinations(methods, 2))
    raw = []
    for a, b in pairs:
        d = (matrix[a] - matrix[b]).to_numpy()
        raw.append(1.0 if not np.any(d != 0) else float(scipy.stats.wilcoxon(d).pvalue))
    adjusted = holm(np.array(raw)) if raw else np.array([])
    out = pd.DataFrame(np.eye(len(methods)), index=methods, columns=methods)
    for (a, b), p in zip(pairs, adjusted):
        out.loc[a, b] = out.loc[b, a] = p
    return out


def friedman_by_budget(frame: pd.DataFrame) -> list[dict]:
    """Demsar (2006), one test per budget, the tasks as blocks (each method's value in a task =
    its mean over seeds: seeds are repeated measurements, not blocks), among the methods that
    keep to the budget on every task. Friedman's chi2 and Iman-Davenport's F (less
    conservative), the mean ranks (1 = best), and with at least MIN_TASKS tasks the pairwise
    Wilcoxon-Holm p-values over tasks; below that the result is `descriptive` and no pairwise
    test or CD diagram is made. A budget with fewer than 2 tasks or 3 methods is left out."""
    out = []
    for budget in budget_blocks(frame.budget):
        if budget == NATURAL:
            continue
        rows = competing(frame, budget)
        matrix = rows.groupby(["task", "method"]).metric.mean().unstack().dropna(axis=1)
        n, k = matrix.shape
        if n < 2 or k < 3:
            continue
        ranks_by_task = matrix.rank(axis=1, ascending=False)
        if (ranks_by_task.nunique(axis=1) == 1).all():  # every method tied on every task
            chi2, p = 0.0, 1.0
        else:
            chi2, p = (float(v) for v in scipy.stats.friedmanchisquare(*matrix.T.to_numpy()))
        f = (n - 1) * chi2 / (n * (k - 1) - chi2) if n * (k - 1) > chi2 else float("inf")
        p_f = float(scipy.stats.f.sf(f, k - 1, (k - 1) * (n - 1))) if np.isfinite(f) else 0.0
        descriptive = n < MIN_TASKS
        out.append({"budget": budget, "tasks": list(matrix.index), "n_tasks": n, "n_methods": k,
                    "ranks": ranks_by_task.mean().sort_values(), "statistic": chi2, "p": p,
                    "iman_davenport": float(f), "p_iman_davenport": p_f, "descriptive": descriptive,
                    "pairwise": None if descriptive else wilcoxon_holm(matrix)})
    return out


@dataclass
class Table1:
    """Methods x columns (tasks + AVG): means, stds and their ranks per column."""

    mean: pd.DataFrame
    std: pd.DataFrame
    mean_rank: pd.DataFrame
    std_rank: pd.DataFrame
    worse: pd.DataFrame | None = None  # True where a paired test says: worse than the column's best

    def render(self, scale: float = 100.0, top: int | None = None) -> pd.DataFrame:
        """Cells 'mean[r]±std[r]' as Fu et al. print them; `top=3` shows only ranks 1-3."""
        def tag(rank):
            return "" if pd.isna(rank) or (top and rank > top) else f"[{rank:g}]"

        out = pd.DataFrame(index=self.mean.index, columns=self.mean.columns, dtype=object)
        for method in self.mean.index:
            for col in self.mean.columns:
                m, s = self.mean.loc[method, col], self.std.loc[method, col]
                if pd.isna(m):
                    out.loc[method, col] = "-"
                    continue
                mark = "†" if self.worse is not None and col in self.worse and \
                    bool(self.worse.loc[method, col]) else ""
                out.loc[method, col] = (f"{m * scale:.2f}{tag(self.mean_rank.loc[method, col])}"
                                        f"±{s * scale:.2f}{tag(self.std_rank.loc[method, col])}{mark}")
        return out


def table1(stats: pd.DataFrame, ties: str = "average", methods: list[str] | None = None,
           tasks: list[str] | None = None, ranked: set[str] | None = None) -> Table1:
    """Fu et al.'s Table 1 from `cell_stats` rows of one budget (or mean/std given directly).
    `ranked`: the methods that compete at the budget; the others (natural-count and over-budget
    reference rows) are shown without ranks and take no rank from the ranked ones."""
    check_choice("ties", ties, TIES)
    mean = stats.pivot_table(index="method", columns="task", values="mean", sort=False)
    std = stats.pivot_table(index="method", columns="task", values="std", sort=False)
    if methods:
        mean, std = mean.reindex(methods), std.reindex(methods)
    if tasks:
        mean, std = mean[tasks], std[tasks]
    complete = mean.notna().all(axis=1)
    mean["AVG"] = mean.mean(axis=1).where(complete)
    std["AVG"] = std.mean(axis=1).where(complete)
    keep = mean.index if ranked is None else [m for m in mean.index if m in ranked]
    mean_rank = mean.loc[keep].rank(ascending=False, method=ties).reindex(mean.index)
    std_rank = std.loc[keep].rank(ascending=True, method=ties).reindex(std.index)
    return Table1(mean, std, mean_rank, std_rank)


def stability_correlation(table: Table1, with_avg: bool = False) -> dict:
    """Spearman (and Kendall) between stability ranks and performance ranks over every
    (method, column) cell, as Fu et al.'s Figure 2; also returns n, the number of cells. NaN
    with fewer than `MIN_RANK_CELLS` cells or a constant rank."""
    cols = list(table.mean.columns) if with_avg else [c for c in table.mean.columns if c != "AVG"]
    s = table.std_rank[cols].to_numpy().ravel()
    p = table.mean_rank[cols].to_numpy().ravel()
    keep = ~(np.isnan(s) | np.isnan(p))
    if keep.sum() < MIN_RANK_CELLS or len(np.unique(s[keep])) < 2 or len(np.unique(p[keep])) < 2:
        return {"spearman": np.nan, "spearman_p": np.nan, "kendall": np.nan, "kendall_p": np.nan,
                "n": int(keep.sum()), "columns": cols}
    rho, p_value = spearman(s[keep], p[keep])
    tau, tau_p = scipy.stats.kendalltau(s[keep], p[keep])  # exact for small n without ties
    return {"spearman": float(rho), "spearman_p": float(p_value), "kendall": float(tau),
            "kendall_p": float(tau_p), "n": int(keep.sum()), "columns": cols}


# below this many cells a rank correlation cannot reach p < 0.05 (exact two-sided p at n = 4,
# rho = 1: 2/24 = 0.083), so none is computed: "rho = -1 (p = 1) over n = 2" says nothing
MIN_RANK_CELLS = 5


EXACT_UP_TO = 8  # n! orderings of one sample against the other: 40,320 at n = 8


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rho and its two-sided p: exact, over all n! orderings of y against x, for
    n <= 8 (scipy's t-approximation says p = 0 for rho = -1 at n = 4; the exact p is 2/24 =
    0.083), scipy's approximation above that.

    Why one sample is permuted: scipy's "pairings" test of two samples enumerates (n!)^2
    orderings (each distinct pairing n! times): at n = 8 that is 1.6e9, which took 21 GiB and
    was killed on the 2-core machine, and n = 7 ran for minutes. Permuting y's ranks alone, with
    rho as the Pearson correlation of average ranks (Spearman's definition, ties included),
    gives the same null distribution n! times smaller, vectorised."""
    rho, p_value = scipy.stats.spearmanr(x, y)
    if len(x) <= EXACT_UP_TO:
        rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
        xc = rx - rx.mean()

        def rank_correlation(b, axis=-1):
            bc = b - b.mean(axis=axis, keepdims=True)
            return (bc * xc).sum(axis=axis) / np.sqrt((xc ** 2).sum() * (bc ** 2).sum(axis=axis))

        result = scipy.stats.permutation_test((ry,), rank_correlation, permutation_type="pairings",
                                              vectorized=True, n_resamples=np.inf, alternative="two-sided")
        p_value = result.pvalue
    return float(rho), float(p_value)

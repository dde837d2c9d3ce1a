"""Published numbers (a spec's `published:`) parsed and compared with ours, budget by budget."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import scipy.stats

from peftbench.analysis.statistics import budget_rows
from peftbench.core.errors import UsageError
from peftbench.training.record import budget_blocks

PUBLISHED_CELL = re.compile(r"^\s*([\d.]+)\s*(?:\[(\d+)\])?\s*±\s*([\d.]+)\s*(?:\[(\d+)\])?\s*$")


def parse_published(published: dict) -> pd.DataFrame:
    """{task: {method: '89.55[1]±0.81'}} (as printed, brackets = published ranks) -> rows
    task, method, mean, std (both /100), mean_rank, std_rank (NaN where none was printed)."""
    rows = []
    for task, cells in published.items():
        for method, text in cells.items():
            match = PUBLISHED_CELL.match(str(text))
            if not match:
                raise UsageError(f"published cell {task}/{method} = {text!r} is not 'mean[r]±std[r]'")
            m, mr, s, sr = match.groups()
            rows.append({"task": task, "method": method, "mean": float(m) / 100, "std": float(s) / 100,
                         "mean_rank": float(mr) if mr else np.nan, "std_rank": float(sr) if sr else np.nan})
    return pd.DataFrame(rows)


def compare_published(stats: pd.DataFrame, published: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our mean beside theirs with the difference, and Kendall's tau between our method
    ranking and theirs (methods both have), per task *and budget*: the published column is one
    budget's table, so each of our budgets (with the natural-count methods) is compared on its
    own, never pooled."""
    parts, taus = [], []
    budgets = budget_blocks(stats.budget)
    for budget in budgets:
        rows = budget_rows(stats, budget)
        both = rows.merge(published[["task", "method", "mean"]], on=["task", "method"],
                          suffixes=("", "_published")).assign(compared_at=budget)
        both["difference"] = both["mean"] - both["mean_published"]
        parts.append(both)
        for task, g in both.groupby("task"):
            if len(g) >= 2:
                tau, p = scipy.stats.kendalltau(g["mean"], g["mean_published"])
                taus.append({"task": task, "budget": budget, "methods": len(g),
                             "kendall_tau": float(tau), "p": float(p)})
    return pd.concat(parts, ignore_index=True), pd.DataFrame(taus)

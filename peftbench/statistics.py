"""Statistics over a frame of finished runs (a row per task, method, budget, seed): cells,
Fu et al.'s Table 1 and its stability correlation, paired tests, the Friedman ranking with
Holm-adjusted Wilcoxon pairs (Demsar 2006; Benavoli, Corani & Mangili 2016), Bayesian signed-rank
tests, budget curves, cost. Everything here returns numbers or frames and formats no text:
`peftbench.report` renders them, `peftbench.findings` tests Fu et al.'s claims with them.
Conventions are report's (metric x100 when shown, population std, ranks by mean / by std).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from peftbench.errors import check_choice
from peftbench.metrics import near_constant
from peftbench.record import NATURAL, at_budget, budget_blocks


TIES = ("average", "min", "max", "dense", "ordinal")


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean scoring and training seconds, mean steps/s, max peak memory (MiB), and
    the mean 1-minute load average around the runs (NaN for runs that did not record it).

    A mean over runs that differ in what they cost per step measures the mix, not the method,
    so the table splits where the runs do, with the number of runs behind each row:
    - by task, where the runs come from several (STS-B's sentence pairs are longer than
      SST-2's sentences: a step costs more);
    - by device, where the runs come from several (a board grown on several machines: one CPU
      ran a cell 2.6x slower per step than another)."""
    for column in ("steps_per_s", "peak_memory_mb", "load_1min"):
        if column not in frame:
            frame = frame.assign(**{column: np.nan})
    split = [c for c in ("task", "device") if c in frame and frame[c].nunique() > 1]
    g = frame.groupby(["method", *split])
    table = pd.DataFrame({"scoring_s": g.scoring_time_s.mean(), "training_s": g.train_time_s.mean(),
                          "steps_per_s": g.steps_per_s.mean(), "peak_memory_mb": g.peak_memory_mb.max(),
                          "load_1min": g.load_1min.mean()})
    if split:
        table = table.assign(runs=g.size()).reset_index(level=split)
    return table


def cell_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, population std and count over seeds per (task, method, budget), and a 95%
    percentile-bootstrap confidence interval of the mean over seeds (NaN with one seed)."""
    g = frame.groupby(["task", "method", "budget"], sort=False)
    out = pd.DataFrame({"mean": g["metric"].mean(), "std": g["metric"].std(ddof=0),
                        "seeds": g["metric"].size(), "trainable": g["trainable"].mean()})
    ci = g["metric"].apply(bootstrap_ci)
    out["ci_low"], out["ci_high"] = [c[0] for c in ci], [c[1] for c in ci]
    return out.reset_index()


def bootstrap_ci(values, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (scipy.stats.bootstrap, seeded)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return (float(values[0]),) * 2 if len(values) >= 2 else (np.nan, np.nan)
    result = scipy.stats.bootstrap((values,), np.mean, confidence_level=confidence,
                                   method="percentile", n_resamples=2000,
                                   rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """Test metric per (task, budget, seed) row and method column (natural-count methods in
    every budget), methods missing from any row dropped: the pairs every paired test reads."""
    rows = pd.concat([at_budget(frame, b).assign(block=b) for b in budget_blocks(frame.budget)])
    return rows.pivot_table(index=["task", "block", "seed"], columns="method", values="metric").dropna(axis=1)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error), via statsmodels."""
    from statsmodels.stats.multitest import multipletests

    return multipletests(p_values, method="holm")[1]


def natural_methods(frame: pd.DataFrame) -> set[str]:
    """Methods that ran at their natural count (one cell per task and seed, in every block)."""
    return set(frame.loc[frame.budget == NATURAL, "method"])


def pair_values(matrix: pd.DataFrame, a: str, b: str, natural: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """The paired values of methods a and b. Two natural-count methods repeat the same pair in
    every budget block: only the first block's rows count, so no pair is counted twice."""
    if a in natural and b in natural:
        first = matrix.index.get_level_values("block")[0]
        matrix = matrix[matrix.index.get_level_values("block") == first]
    return matrix[a].to_numpy(), matrix[b].to_numpy()


def wilcoxon_holm(matrix: pd.DataFrame, natural: set[str] = frozenset()) -> pd.DataFrame:
    """Pairwise two-sided Wilcoxon signed-rank p-values between the methods (columns) over the
    paired rows, Holm-adjusted over all pairs (Benavoli, Corani & Mangili 2016: unlike
    Nemenyi's, the verdict on A vs B does not depend on the other methods in the pool). A pair
    whose differences are all zero has p = 1; two `natural` methods are paired once per (task,
    seed), not once per budget block (`pair_values`)."""
    methods = list(matrix.columns)
    pairs = list(itertools.combinations(methods, 2))
    raw = []
    for a, b in pairs:
        x, y = pair_values(matrix, a, b, natural)
        d = x - y
        raw.append(1.0 if not np.any(d != 0) else float(scipy.stats.wilcoxon(d).pvalue))
    adjusted = holm(np.array(raw)) if raw else np.array([])
    out = pd.DataFrame(np.eye(len(methods)), index=methods, columns=methods)
    for (a, b), p in zip(pairs, adjusted):
        out.loc[a, b] = out.loc[b, a] = p
    return out


def friedman_ranking(frame: pd.DataFrame) -> dict | None:
    """Demsar (2006): methods ranked within each block, blocks = the (task, budget) cells
    (natural-count methods take part in every budget), value = the mean over seeds; Friedman's
    test that all methods rank alike (scipy), and the mean rank per method (1 = best). The
    pairwise verdicts are Wilcoxon signed-rank tests over the (task, budget, seed) pairs with
    Holm's correction (`wilcoxon_holm`), not Nemenyi's. None with fewer than 2 blocks or 3
    methods present in every block. Blocks of one task at several budgets are not independent
    data sets: read the test as descriptive there."""
    stats = cell_stats(frame)
    budgets = budget_blocks(stats.budget)
    blocks = pd.concat([budget_rows(stats, b).assign(block=lambda d, b=b: d.task + " @ " + b)
                        for b in budgets])
    matrix = blocks.pivot_table(index="block", columns="method", values="mean").dropna(axis=1)
    if len(matrix) < 2 or matrix.shape[1] < 3:
        return None
    statistic, p_value = scipy.stats.friedmanchisquare(*matrix.T.to_numpy())
    ranks = matrix.rank(axis=1, ascending=False).mean().sort_values()
    pairs = paired_matrix(frame)[list(matrix.columns)]
    return {"blocks": list(matrix.index), "ranks": ranks, "statistic": float(statistic),
            "p": float(p_value), "pairwise": wilcoxon_holm(pairs, natural_methods(frame)),
            "n_pairs": len(pairs),
            "n_blocks": len(matrix)}


def bayesian_signed_rank(x: np.ndarray, y: np.ndarray, rope: float, samples: int = 50_000,
                         seed: int = 0) -> dict[str, float]:
    """Benavoli et al. (2017)'s Bayesian signed-rank test on paired scores x, y with a region
    of practical equivalence |x - y| <= rope: P(x better), P(equivalent), P(y better), from
    `baycomp.SignedRankTest` (a Dirichlet process over the differences with baycomp's prior
    pseudo-observation at 0 of weight 0.5; `samples` posterior draws from `seed`, so the
    probabilities are the same on every machine and sitting)."""
    from baycomp import SignedRankTest

    left, rope_p, right = SignedRankTest.probs(np.asarray(y, float), np.asarray(x, float), rope=rope,
                                              nsamples=samples, random_state=seed)
    return {"better": float(right), "equivalent": float(rope_p), "worse": float(left)}


def bayesian_against(frame: pd.DataFrame, references: tuple[str, ...] = ("random", "fulltuning"),
                     rope: float = 0.01) -> pd.DataFrame:
    """For each method against each reference present: the Bayesian signed-rank probabilities
    over the (task, budget, seed) pairs both ran (metric on the 0-1 scale; rope 0.01 = one point
    x100)."""
    matrix, natural = paired_matrix(frame), natural_methods(frame)
    rows = []
    for reference in references:
        if reference not in matrix.columns:
            continue
        for method in matrix.columns:
            if method == reference:
                continue
            x, y = pair_values(matrix, method, reference, natural)
            probs = bayesian_signed_rank(x, y, rope)
            rows.append({"method": method, "against": reference, "pairs": len(x),
                         "mean_difference": float((x - y).mean()),
                         "p_better": probs["better"], "p_equivalent": probs["equivalent"],
                         "p_worse": probs["worse"], "rope": rope})
    return pd.DataFrame(rows)


def best_per_budget(frame: pd.DataFrame, rope: float = 0.01, slack: float = 0.01) -> pd.DataFrame:
    """"Which selection method is best at which budget", with its confidence: per (task,
    budget), among the budget-parameterised methods that keep to it, the best by mean test
    metric, the runner-up, their mean paired difference over the seeds both ran, and the
    Bayesian signed-rank probabilities (ROPE `rope`) that the best is better, equivalent or
    worse. Keeping to it = mean trainable entries at most the budget's (times 1 + `slack`): a
    method whose count overshoots (ChildTuning-F redraws its mask each step, so a run moves
    every entry) did not compete at that budget; it is named in `over_budget`, not ranked."""
    from peftbench.selector import Budget

    rows = []
    for (task, budget), cells in frame[frame.budget != NATURAL].groupby(["task", "budget"]):
        allowed = Budget.parse(budget).entries(int(cells.pretrained_entries.iloc[0])) * (1 + slack)
        trainable = cells.groupby("method").trainable.mean()
        over = trainable[trainable > allowed]
        cells = cells[~cells.method.isin(over.index)]
        means = cells.groupby("method").metric.mean().sort_values(ascending=False)
        if len(means) < 2:
            continue
        best, second = means.index[:2]
        pairs = cells.pivot_table(index="seed", columns="method", values="metric")[[best, second]].dropna()
        probs = bayesian_signed_rank(pairs[best].to_numpy(), pairs[second].to_numpy(), rope)
        rows.append({"task": task, "budget": budget, "best": best, "runner_up": second,
                     "difference": float((pairs[best] - pairs[second]).mean()), "seeds": len(pairs),
                     "p_better": probs["better"], "p_equivalent": probs["equivalent"],
                     "p_worse": probs["worse"],
                     "over_budget": "; ".join(f"{m} ({t:,.0f})" for m, t in over.items())})
    return pd.DataFrame(rows)


def budget_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method) with at least two budgets: the area under its budget curve (the mean
    test metric averaged over log10(trainable entries) between its smallest and largest budget,
    trapezoids: a method flat at m scores m) and the smallest budget whose mean reaches 95% of
    full fine-tuning's mean on that task (NaN when none does, or full FT did not run)."""
    stats = cell_stats(frame)
    rows = []
    for (task, method), cells in stats[stats.budget != NATURAL].groupby(["task", "method"]):
        cells = cells.sort_values("trainable")
        if len(cells) < 2:
            continue
        x = np.log10(cells.trainable.to_numpy(float))
        y = cells["mean"].to_numpy(float)
        area = float(np.trapezoid(y, x) / (x[-1] - x[0])) if x[-1] > x[0] else float("nan")
        full = stats[(stats.task == task) & (stats.method == "fulltuning")]["mean"]
        reach = float("nan")
        if len(full):
            target = 0.95 * float(full.iloc[0])
            hit = cells[cells["mean"] >= target]
            reach = float(min(hit.budget.astype(float))) if len(hit) else float("nan")
        rows.append({"task": task, "method": method, "budgets": len(cells), "area": area,
                     "reaches_95pct_full_ft_at": reach})
    return pd.DataFrame(rows)


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
           tasks: list[str] | None = None) -> Table1:
    """Fu et al.'s Table 1 from `cell_stats` rows of one budget (or mean/std given directly)."""
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
    return Table1(mean, std, mean.rank(ascending=False, method=ties), std.rank(ascending=True, method=ties))


def stability_correlation(table: Table1, with_avg: bool = False) -> dict:
    """Spearman (and Kendall) between stability ranks and performance ranks over every
    (method, column) cell, as Fu et al.'s Figure 2; also returns n, the number of cells."""
    cols = list(table.mean.columns) if with_avg else [c for c in table.mean.columns if c != "AVG"]
    s = table.std_rank[cols].to_numpy().ravel()
    p = table.mean_rank[cols].to_numpy().ravel()
    keep = ~(np.isnan(s) | np.isnan(p))
    if len(np.unique(s[keep])) < 2 or len(np.unique(p[keep])) < 2:  # undefined: a constant rank
        return {"spearman": np.nan, "spearman_p": np.nan, "kendall": np.nan, "kendall_p": np.nan,
                "n": int(keep.sum()), "columns": cols}
    rho, p_value = spearman(s[keep], p[keep])
    tau, tau_p = scipy.stats.kendalltau(s[keep], p[keep])  # exact for small n without ties
    return {"spearman": float(rho), "spearman_p": float(p_value), "kendall": float(tau),
            "kendall_p": float(tau_p), "n": int(keep.sum()), "columns": cols}


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


def paired_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(t-test p, Wilcoxon p) of paired samples, NaN where no test applies: fewer than 2 pairs;
    differences that are all equal (identical samples, or a constant shift: the t statistic is
    0/0 or x/0, and floating-point noise would make p anything from 1e-29 to 1); Wilcoxon needs
    6 pairs or more. Differences below 1e-9 are taken as 0 (metric values are means of at most
    millions of 0/1 terms; anything finer is rounding)."""
    d = np.round(np.asarray(a, float) - np.asarray(b, float), 9)
    if len(d) < 2 or np.all(d == d[0]):
        return np.nan, np.nan
    t_p = float(scipy.stats.ttest_rel(a, b).pvalue)
    w_p = float(scipy.stats.wilcoxon(d).pvalue) if len(d) >= 6 and np.any(d != 0) else np.nan
    return t_p, w_p


def paired_tests(frame: pd.DataFrame, budget_rows: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per task: each method against the task's best (highest mean), paired by seed: a paired
    t-test and, with 6+ common seeds, Wilcoxon's signed-rank test (scipy), see `paired_test`.
    `worse` = t-test p < alpha with a lower mean. Rows: task, method, best, seeds (n, the pairs
    tested), t_p, wilcoxon_p, worse."""
    rows = []
    for task, stats in budget_rows.groupby("task"):
        best = stats.loc[stats["mean"].idxmax()]
        ref = frame[(frame.task == task) & (frame.method == best.method) & (frame.budget == best.budget)]
        for _, cell in stats.iterrows():
            other = frame[(frame.task == task) & (frame.method == cell.method) & (frame.budget == cell.budget)]
            paired = ref.merge(other, on="seed", suffixes=("_best", ""))
            a, b = paired["metric_best"].to_numpy(), paired["metric"].to_numpy()
            t_p, w_p = paired_test(a, b) if cell.method != best.method else (np.nan, np.nan)
            rows.append({"task": task, "method": cell.method, "best": best.method, "seeds": len(a),
                         "t_p": t_p, "wilcoxon_p": w_p,
                         "worse": bool(t_p < alpha and b.mean() < a.mean()) if not np.isnan(t_p) else False})
    return pd.DataFrame(rows)


def constant_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: the constant predictor's test score and the test rows (from the runs)."""
    if "constant_metric" not in frame:
        return pd.DataFrame(columns=["metric", "test_rows"])
    g = frame.dropna(subset=["constant_metric"]).groupby("task")
    return pd.DataFrame({"metric": g.constant_metric.first(), "test_rows": g.test_rows.first()})


def budget_rows(stats: pd.DataFrame, budget: str) -> pd.DataFrame:
    """Cells of one budget plus the natural-count methods, as Fu et al. mix them in Table 1."""
    return at_budget(stats, budget)


def constant_cells(frame: pd.DataFrame, stats: pd.DataFrame | None = None) -> list[str]:
    """'task/method/bBUDGET' of every cell whose mean is within noise of the constant predictor
    (`metrics.near_constant`): cells that did not measurably learn. `stats`: the frame's
    `cell_stats`, when the caller has them."""
    constant = constant_scores(frame)
    out = []
    for row in (stats if stats is not None else cell_stats(frame)).itertuples():
        if row.task in constant.index and near_constant(row.mean, row.std, constant.loc[row.task, "metric"],
                                                        int(constant.loc[row.task, "test_rows"]), row.seeds):
            out.append(f"{row.task}/{row.method}/b{row.budget}")
    return sorted(out)

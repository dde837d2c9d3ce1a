"""Statistics over a frame of finished runs (a row per task, method, budget, seed): each cell's
mean, std and interval, who keeps to a budget, paired tests, the pre-declared comparisons against
Random and full fine-tuning, the best method per budget, budget curves. Ranks and Table 1 are in
`ranks`, the checks on a cell in `checks`. Everything here returns numbers or frames and formats
no text: `peftbench.rendering.report` renders them, `peftbench.analysis.findings` tests Fu et
al.'s claims with them. Conventions: metric x100 when shown, population std over seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats

from peftbench.training.record import NATURAL, at_budget, budget_blocks


def cell_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, population std and count over seeds per (task, method, budget), and a 95% interval
    of the mean that carries the seeds' and the test set's error (`analysis.uncertainty.cell_interval`;
    `interval` says which: "seeds + test (bootstrap)" from stored predictions, else "seeds + test
    (binomial)" or "(fisher-z)", or "seeds only" with a percentile bootstrap where the metric has
    no analytic test-set SE). NaN with one seed. The seeds are taken in seed order: a sum's last
    digit depends on its order, and the order cells are read back in is the machine's."""
    from peftbench.analysis import uncertainty

    keys = ["task", "method", "budget"]
    shown = frame.groupby(keys, sort=False).size().index  # the cells in the order they came
    frame = frame.sort_values([*keys, "seed"], kind="stable") if "seed" in frame else frame
    g = frame.groupby(keys, sort=False)
    out = pd.DataFrame({"mean": g["metric"].mean(), "std": g["metric"].std(ddof=0),
                        "seeds": g["metric"].size(), "trainable": g["trainable"].mean()})
    lows, highs, se_test, kinds = [], [], [], []
    for (_, cells) in g:
        kind = uncertainty.test_se_kind(cells.metric_name.iloc[0]) if "metric_name" in cells else None
        n = int(cells.test_rows.iloc[0]) if "test_rows" in cells and pd.notna(cells.test_rows.iloc[0]) else 0
        booted = test_error(cells) if len(cells) > 1 else None
        if booted is not None:
            found = uncertainty.cell_interval(cells.metric.to_numpy(), n, kind, se_test=booted)
            lows.append(found["low"]), highs.append(found["high"]), se_test.append(found["se_test"])
            kinds.append("seeds + test (bootstrap)")
        elif kind is not None and n > 3:
            found = uncertainty.cell_interval(cells.metric.to_numpy(), n, kind)
            lows.append(found["low"]), highs.append(found["high"]), se_test.append(found["se_test"])
            kinds.append(f"seeds + test ({kind})")
        else:
            low, high = bootstrap_ci(cells.metric.to_numpy())
            lows.append(low), highs.append(high), se_test.append(np.nan), kinds.append("seeds only")
    out["ci_low"], out["ci_high"], out["se_test"], out["interval"] = lows, highs, se_test, kinds
    return out.reindex(shown).reset_index()


def bootstrap_ci(values, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (scipy.stats.bootstrap, seeded)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return (float(values[0]),) * 2 if len(values) >= 2 else (np.nan, np.nan)
    result = scipy.stats.bootstrap((values,), np.mean, confidence_level=confidence,
                                   method="percentile", n_resamples=2000,
                                   rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def stored_predictions(cells: pd.DataFrame) -> list[dict] | None:
    """Every seed's stored test predictions (in seed order), or None if any seed has none."""
    if "predictions" not in cells:
        return None
    found = list(cells.sort_values("seed").predictions)
    return found if found and all(isinstance(p, dict) for p in found) else None


def test_error(cells_a: pd.DataFrame, cells_b: pd.DataFrame | None = None) -> float | None:
    """The test set's SE of a cell's seed-mean, or of the difference of two cells' seed-means
    over the same seeds, by the paired bootstrap over test examples where every seed stored its
    predictions; None where one did not (the caller then uses the analytic SE and says so)."""
    from peftbench.analysis import uncertainty

    a = stored_predictions(cells_a)
    b = stored_predictions(cells_b) if cells_b is not None else None
    if a is None or (cells_b is not None and b is None):
        return None
    return uncertainty.bootstrap_test_se(a, b, str(cells_a.metric_name.iloc[0]).split("+"))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error), via statsmodels; NaN stays NaN."""
    from statsmodels.stats.multitest import multipletests

    p_values = np.asarray(p_values, float)
    out = np.full(len(p_values), np.nan)
    known = ~np.isnan(p_values)
    if known.any():
        out[known] = multipletests(p_values[known], method="holm")[1]
    return out


MIN_TASKS = 5  # Demsar (2006): with fewer data sets Friedman and a CD diagram only describe


def kept_budget(frame: pd.DataFrame, slack: float = 0.01) -> pd.Series:
    """Per (task, method, budget) of the budget-parameterised cells: whether the mean trainable
    count keeps to the budget (at most its entries x (1 + `slack`)) and no seed ran outside the
    method's design range (a "pool exhausted" health flag). A method that overshoots
    (ChildTuning-F redraws its mask each step: a run moves every entry) did not compete there."""
    from peftbench.contract.selector import Budget

    cells = frame[frame.budget != NATURAL].groupby(["task", "method", "budget"]).agg(
        trainable=("trainable", "mean"), total=("pretrained_entries", "first"))
    allowed = [Budget.parse(b).entries(int(t)) * (1 + slack)
               for b, t in zip(cells.index.get_level_values("budget"), cells.total)]
    kept = cells.trainable <= np.array(allowed, float)
    if "health" in frame:  # outside the method's design range (GGM's pool exhausted): not the method
        outside = frame[frame.budget != NATURAL].assign(outside=[
            any(str(f).startswith("pool exhausted") for f in (h if isinstance(h, list) else []))
            for h in frame.loc[frame.budget != NATURAL, "health"]]).groupby(["task", "method", "budget"]).outside.any()
        kept &= ~outside.reindex(kept.index, fill_value=False)
    return kept


def competing(frame: pd.DataFrame, budget: str) -> pd.DataFrame:
    """The runs that compete in a ranking at `budget`: that budget's cells that keep to it.
    Natural-count methods and over-budget cells are reference rows, never ranked."""
    kept = kept_budget(frame)
    rows = frame[frame.budget == budget]
    keys = list(zip(rows.task, rows.method, rows.budget))
    return rows[[bool(kept.get(k, False)) for k in keys]]


def comparisons(frame: pd.DataFrame, references: tuple[str, ...] = ("random", "fulltuning")) -> pd.DataFrame:
    """The pre-declared comparison families: at each budget, each method that keeps to it
    against each reference (Random at the same budget; full fine-tuning at its natural count).
    Per task, the difference paired by seed with seed and test-set error
    (`analysis.uncertainty.paired_difference`), Holm-adjusted within the family (budget, reference);
    across two or more tasks, the hierarchical model (`analysis.uncertainty.hierarchical`) on the differences
    standardised by the task's test-set SE of the reference, ROPE one such SE. Differences x100."""
    from peftbench.analysis import uncertainty

    constant = constant_scores(frame)
    rows = []
    for budget in budget_blocks(frame.budget):
        if budget == NATURAL:
            continue
        runs = competing(frame, budget)
        for reference in references:
            ref_runs = frame[(frame.method == reference)
                             & frame.budget.isin([budget] if reference in set(runs.method) else [NATURAL])]
            if ref_runs.empty:
                continue
            family = []
            for (method, task), cells in runs[runs.method != reference].groupby(["method", "task"]):
                pairs = cells.merge(ref_runs[ref_runs.task == task], on="seed", suffixes=("", "_ref"))
                if len(pairs) < 2:
                    continue
                n = int(constant.loc[task, "test_rows"]) if task in constant.index else 0
                kind = uncertainty.test_se_kind(cells.metric_name.iloc[0]) if "metric_name" in cells else None
                booted = test_error(pairs, pairs.drop(columns="predictions").rename(
                    columns={"predictions_ref": "predictions"})) if "predictions" in pairs else None
                d = uncertainty.paired_difference(pairs.metric, pairs.metric_ref, n, kind, se_test=booted)
                unit = uncertainty.test_se(pairs.metric_ref.mean(), n, kind)
                if not np.isfinite(unit) and booted is not None:  # no analytic SE: the bootstrap's own
                    unit = test_error(pairs.drop(columns="predictions").rename(columns={"predictions_ref": "predictions"}))
                mcnemar_p = np.nan
                if booted is not None and str(cells.metric_name.iloc[0]) == "accuracy":
                    mcnemar_p = uncertainty.mcnemar(stored_predictions(pairs), stored_predictions(
                        pairs.drop(columns="predictions").rename(columns={"predictions_ref": "predictions"})))["p"]
                family.append({"budget": budget, "against": reference, "method": method, "task": task,
                               "seeds": d["seeds"], "difference": 100 * d["difference"],
                               "ci_low": 100 * d["low"], "ci_high": 100 * d["high"],
                               "se_seed": 100 * d["se_seed"], "se_test": 100 * d["se_test"],
                               "test_error": "paired bootstrap" if booted is not None else "analytic, independent",
                               "p": d["p"], "mcnemar_p": mcnemar_p,
                               "y": d["difference"] / unit, "s": d["se"] / unit, "unit": 100 * unit})
            if not family:
                continue
            family = pd.DataFrame(family)
            family["p_holm"] = holm(family.p.to_numpy())
            rows.append(family)
            for method, g in family.groupby("method"):
                g = g[np.isfinite(g.y) & np.isfinite(g.s)]
                if len(g) < 2:  # one task has no "across tasks"
                    continue
                h = uncertainty.hierarchical(g.y.to_numpy(), g.s.to_numpy())
                rows.append(pd.DataFrame([{"budget": budget, "against": reference, "method": method,
                                           "task": f"across {h['tasks']} task(s)", **h}]))
    if not rows:
        return pd.DataFrame()
    return pd.concat(rows, ignore_index=True).drop(columns=["y", "s"])


def best_per_budget(frame: pd.DataFrame) -> pd.DataFrame:
    """"Which selection method is best at which budget", with its confidence: per (task,
    budget), among the methods that keep to it (`competing`), the best by mean test metric, the
    runner-up, their difference paired by seed with a 95% interval carrying seed and test-set
    error (`analysis.uncertainty.paired_difference`; x100) and its p. The two are chosen after seeing the
    data, so the p is uncorrected and optimistic: an interval that includes 0 means the data do
    not single out one method there. `over_budget` names the methods whose count overshoots."""
    from peftbench.analysis import uncertainty

    kept = kept_budget(frame)
    constant = constant_scores(frame)
    rows = []
    for (task, budget), cells in frame[frame.budget != NATURAL].groupby(["task", "budget"]):
        over = [m for m in sorted(cells.method.unique()) if not kept.get((task, m, budget), True)]
        cells = cells[~cells.method.isin(over)]
        means = cells.groupby("method").metric.mean().sort_values(ascending=False)
        if len(means) < 2:
            continue
        best, second = means.index[:2]
        pairs = cells.pivot_table(index="seed", columns="method", values="metric")[[best, second]].dropna()
        n = int(constant.loc[task, "test_rows"]) if task in constant.index else 0
        kind = uncertainty.test_se_kind(cells.metric_name.iloc[0]) if "metric_name" in cells else None
        seeds = list(pairs.index)
        chosen = [cells[(cells.method == m) & cells.seed.isin(seeds)] for m in (best, second)]
        d = uncertainty.paired_difference(pairs[best], pairs[second], n, kind, se_test=test_error(*chosen))
        trainable = cells.groupby("method").trainable.mean()
        rows.append({"task": task, "budget": budget, "best": best, "runner_up": second,
                     "difference": 100 * d["difference"], "ci_low": 100 * d["low"],
                     "ci_high": 100 * d["high"], "p_uncorrected": d["p"], "seeds": d["seeds"],
                     "over_budget": "; ".join(f"{m} ({frame[(frame.task == task) & (frame.method == m) & (frame.budget == budget)].trainable.mean():,.0f})"
                                              for m in over),
                     "competing": len(trainable)})
    return pd.DataFrame(rows)


def budget_curves(frame: pd.DataFrame, share: float = 0.95) -> pd.DataFrame:
    """Per (task, method) with at least two budgets that keep to them: the smallest budget at
    which the method reaches `share` of full fine-tuning on the chance-normalised scale
    (constant predictor = 0, full FT's mean = 1), with a bracket from the cells' 95% intervals
    (seeds + test set): `earliest` = the smallest budget whose interval reaches the target
    (it may reach there), `surely` = the smallest whose interval lies wholly above it.
    Censoring is written out: "<= 0.1%" when the smallest budget tried already reaches it,
    "> 2%" when the largest does not. No area under the curve: methods span different
    ranges of trainable entries (GGM's pool ends below 1%), so areas would not compare."""
    stats = cell_stats(frame)
    kept = kept_budget(frame)
    constant = constant_scores(frame)
    rows = []

    def label(b):
        return f"{100 * float(b):g}%"

    for (task, method), cells in stats[stats.budget != NATURAL].groupby(["task", "method"]):
        cells = cells[[bool(kept.get((task, method, b), False)) for b in cells.budget]]
        cells = cells.assign(b=cells.budget.astype(float)).sort_values("b")
        full = stats[(stats.task == task) & (stats.method == "fulltuning")]["mean"]
        if len(cells) < 2 or not len(full) or task not in constant.index:
            continue
        c, f = float(constant.loc[task, "metric"]), float(full.iloc[0])
        target = c + share * (f - c)

        def first(column):
            hit = cells[cells[column] >= target]
            if hit.empty:
                return f"> {label(cells.b.iloc[-1])}"
            b = hit.b.iloc[0]
            return f"<= {label(b)}" if b == cells.b.iloc[0] else label(b)

        rows.append({"task": task, "method": method, "budgets": len(cells),
                     "reaches": first("mean"), "earliest": first("ci_high"), "surely": first("ci_low"),
                     "target_x100": 100 * target})
    return pd.DataFrame(rows)


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
    t-test and, with 6+ common seeds, Wilcoxon's signed-rank test (scipy), see `paired_test`;
    the t-test's p Holm-adjusted over the column's methods (`t_p_holm`). `worse` = adjusted
    p < alpha with a lower mean. The best is chosen after seeing the data (a winner's-curse
    selection) and the seeds share one test set: a mark, not a verdict. Rows: task, method,
    best, seeds (n, the pairs tested), t_p, t_p_holm, wilcoxon_p, worse."""
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
                         "t_p": t_p, "wilcoxon_p": w_p, "lower": bool(b.mean() < a.mean())})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["t_p_holm"] = np.concatenate([holm(g.t_p.to_numpy()) for _, g in out.groupby("task", sort=False)])
    out["worse"] = (out.t_p_holm < alpha) & out.lower
    return out.drop(columns="lower")


def budget_rows(stats: pd.DataFrame, budget: str) -> pd.DataFrame:
    """Cells of one budget plus the natural-count methods, as Fu et al. mix them in Table 1."""
    return at_budget(stats, budget)


def constant_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: the constant predictor's test score and the test rows (from the runs)."""
    if "constant_metric" not in frame:
        return pd.DataFrame(columns=["metric", "test_rows"])
    g = frame.dropna(subset=["constant_metric"]).groupby("task")
    return pd.DataFrame({"metric": g.constant_metric.first(), "test_rows": g.test_rows.first()})

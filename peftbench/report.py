"""Reports: Fu et al.'s Table 1 form, stability and rank correlations, significance, overlap.

Input is one DataFrame with a row per finished run (task, method, budget, seed, metric,
trainable, run_dir, ...), read from a sweep's study (`sweep.trials_frame`) or from run
directories (`load_runs`). Conventions, as Fu et al. (see ../shared/design, methods-research 2.1):
- metric = the task's main metric on test at the best-validation checkpoint, shown x100;
- std = population std over seeds (ddof=0);
- performance rank = rank of the mean, descending; stability rank = rank of the std,
  ascending (stabler = better); `ties="average"` by default, `"min"` reproduces Fu's brackets;
- AVG column = mean of the task means, +- the mean of the task stds.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch

from peftbench import memory
from peftbench.errors import UsageError, check_choice
from peftbench.metrics import near_constant
from peftbench.safeload import load_pt

TIES = ("average", "min", "max", "dense", "ordinal")


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean scoring and training seconds, mean steps/s, max peak memory (MiB), and
    the mean 1-minute load average around the runs (NaN for runs that did not record it)."""
    for column in ("steps_per_s", "peak_memory_mb", "load_1min"):
        if column not in frame:
            frame = frame.assign(**{column: np.nan})
    g = frame.groupby("method")
    return pd.DataFrame({"scoring_s": g.scoring_time_s.mean(), "training_s": g.train_time_s.mean(),
                         "steps_per_s": g.steps_per_s.mean(), "peak_memory_mb": g.peak_memory_mb.max(),
                         "load_1min": g.load_1min.mean()})


def _read_json(path: Path) -> dict:
    """A run folder's JSON file, or a one-line UsageError naming it (missing, cut, not JSON)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: the run folder is not complete (remove it, or "
                         "leave it out of the folders given)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:120]}): the "
                         "run folder is damaged (remove it, or leave it out)") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a JSON object: the run folder is damaged")
    return value


def _one_setting(frame: pd.DataFrame) -> None:
    """Runs of several models, or of two datasets behind one task name, are not seeds of one
    cell: refused (naming both) instead of being dropped as re-runs or divided by one model's
    size."""
    models = frame.groupby("model").size()
    if len(models) > 1:
        raise UsageError(f"the runs are of {len(models)} models ({', '.join(f'{m!r}: {n} seeds' for m, n in models.items())}): "
                         "report one model at a time (give the folders of one)")
    for task, group in frame.groupby("task"):
        if group["data"].nunique() > 1:
            raise UsageError(f"task {task!r}: the runs read {group['data'].nunique()} different data "
                             "files or task files under one name: report one dataset at a time")


def load_runs(folders: list[str | Path]) -> pd.DataFrame:
    """One row per finished seed in the given run directories (or folders of them); run
    directories marked INCOMPLETE (interrupted, crashed) are skipped, with a note.

    A (task, method, budget, seed) found in several run directories (a re-run) counts once:
    the newest run directory's result is kept, so a re-run never adds seeds. Seeds that
    diverged are not rows; they are listed in `frame.attrs["failed"]`, and what was left out
    in `frame.attrs["notes"]`."""
    from peftbench import registry

    from peftbench.experiment import INCOMPLETE

    rows, failed, notes = [], {}, []
    incomplete = sorted(str(p.parent) for f in folders for p in Path(f).glob(f"**/{INCOMPLETE}"))
    for folder in folders:
        for result_file in sorted(Path(folder).glob("**/seed-*/result.json")):
            run_dir = result_file.parent.parent
            if str(run_dir) in incomplete:
                continue
            config, result = _read_json(run_dir / "config.json"), _read_json(result_file)
            try:
                natural = not registry.get(config["method"]).uses_budget
            except UsageError:
                natural = False
            task, budget = Path(config["task"]).stem, "natural" if natural else str(config["budget"])
            if result.get("diverged"):
                d = result["diverged"]
                failed[f"{task}/{config['method']}/b{budget}/s{result['seed']}"] = \
                    f"diverged at step {d['step']} (loss {d['loss']})"
                continue
            baseline = result.get("constant_predictor", {})
            metric_name = _metric_name(config["task"])
            rows.append({"task": task, "method": config["method"], "budget": budget,
                         "seed": result["seed"], "metric": result["test"]["main"],
                         "validation": result["validation"]["main"],
                         "trainable": result["trainable"]["trainable"],
                         "pretrained_entries": result["pretrained_entries"],
                         "constant_metric": baseline.get("test", {}).get("main", np.nan),
                         "metric_name": metric_name, "model": config.get("model", ""),
                         "test_rows": baseline.get("test_rows", 0),
                         "scoring_time_s": result["scoring_time_s"],
                         "train_time_s": result["train_time_s"], "run_dir": str(run_dir),
                         "steps_per_s": result.get("steps_per_s", np.nan),
                         "load_1min": memory.mean_load(result),
                         "peak_memory_mb": memory.peak_memory_mb(result),
                         "written": result_file.stat().st_mtime,
                         "spend": result.get("trainable_by_tensor", {}),
                         "data": json.dumps(config.get("task_files") or config.get("task_spec", config["task"]))})
    if incomplete:
        notes.append(f"skipped {len(incomplete)} run directories marked {INCOMPLETE} (interrupted "
                     f"or failed): {', '.join(incomplete)}")
    if not rows:
        raise UsageError(f"no finished runs (seed-*/result.json) under {[str(f) for f in folders]}"
                         + (f"; {notes[0]}" if notes else ""))
    frame = pd.DataFrame(rows).sort_values("written")
    _one_setting(frame)
    frame = frame.drop(columns="data")
    key = ["task", "method", "budget", "seed"]
    repeated = int(frame.duplicated(key, keep="last").sum())
    if repeated:
        notes.append(f"{repeated} re-run seed(s) found twice or more: the newest result of each "
                     "(task, method, budget, seed) is used, never counted as extra seeds")
    frame = frame.drop_duplicates(key, keep="last").drop(columns="written").reset_index(drop=True)
    frame.attrs.update(failed=failed, notes=notes)
    return frame


@functools.lru_cache(maxsize=None)
def _metric_name(task: str) -> str:
    """'accuracy+macro_f1' for a task name or spec path ('' if the spec is gone)."""
    from peftbench.data import load_task

    try:
        return "+".join(load_task(task).main_metric)
    except UsageError:
        return ""


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
    budgets = [b for b in dict.fromkeys(frame.budget) if b != "natural"] or ["natural"]
    rows = pd.concat([frame[frame.budget.isin([b, "natural"])].assign(block=b) for b in budgets])
    return rows.pivot_table(index=["task", "block", "seed"], columns="method", values="metric").dropna(axis=1)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error), via statsmodels."""
    from statsmodels.stats.multitest import multipletests

    return multipletests(p_values, method="holm")[1]


def natural_methods(frame: pd.DataFrame) -> set[str]:
    """Methods that ran at their natural count (one cell per task and seed, in every block)."""
    return set(frame.loc[frame.budget == "natural", "method"])


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
    budgets = [b for b in dict.fromkeys(stats.budget) if b != "natural"] or ["natural"]
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


def best_per_budget(frame: pd.DataFrame, rope: float = 0.01) -> pd.DataFrame:
    """"Which selection method is best at which budget", with its confidence: per (task,
    budget), among the budget-parameterised methods, the best by mean test metric, the
    runner-up, their mean paired difference over the seeds both ran, and the Bayesian
    signed-rank probabilities (ROPE `rope`) that the best is better, equivalent or worse."""
    rows = []
    for (task, budget), cells in frame[frame.budget != "natural"].groupby(["task", "budget"]):
        means = cells.groupby("method").metric.mean().sort_values(ascending=False)
        if len(means) < 2:
            continue
        best, second = means.index[:2]
        pairs = cells.pivot_table(index="seed", columns="method", values="metric")[[best, second]].dropna()
        probs = bayesian_signed_rank(pairs[best].to_numpy(), pairs[second].to_numpy(), rope)
        rows.append({"task": task, "budget": budget, "best": best, "runner_up": second,
                     "difference": float((pairs[best] - pairs[second]).mean()), "seeds": len(pairs),
                     "p_better": probs["better"], "p_equivalent": probs["equivalent"],
                     "p_worse": probs["worse"]})
    return pd.DataFrame(rows)


def budget_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method) with at least two budgets: the area under its budget curve (the mean
    test metric averaged over log10(trainable entries) between its smallest and largest budget,
    trapezoids: a method flat at m scores m) and the smallest budget whose mean reaches 95% of
    full fine-tuning's mean on that task (NaN when none does, or full FT did not run)."""
    stats = cell_stats(frame)
    rows = []
    for (task, method), cells in stats[stats.budget != "natural"].groupby(["task", "method"]):
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


EXACT_UP_TO = 8  # n! pairings: 40,320 at n = 8


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rho and its two-sided p: exact, by all n! pairings, for n <= 8 (scipy's
    t-approximation says p = 0 for rho = -1 at n = 4; the exact p is 2/24 = 0.083), scipy's
    approximation above that."""
    rho, p_value = scipy.stats.spearmanr(x, y)
    if len(x) <= EXACT_UP_TO:
        result = scipy.stats.permutation_test(
            (np.asarray(x), np.asarray(y)), lambda a, b: scipy.stats.spearmanr(a, b)[0],
            permutation_type="pairings", n_resamples=np.inf, alternative="two-sided")
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


def _mask(run_dir: str, seed: int):
    path = Path(run_dir) / f"seed-{seed}" / "mask.pt"
    return load_pt(path) if path.exists() else None


def _numels(run_dir: str, seed: int) -> dict[str, int]:
    sel = json.loads((Path(run_dir) / f"seed-{seed}" / "selection.json").read_text())
    return {n: v[1] for n, v in sel["per_tensor"].items()}


def jaccard(a: dict, b: dict, numels: dict[str, int]) -> float:
    """|A & B| / |A | B| over entries; masks as saved in mask.pt (full names, partial indices)."""
    def size(m, n):
        return numels[n] if n in m["full"] else len(m["partial"].get(n, ()))

    inter = union = 0
    for name in numels:
        sa, sb = size(a, name), size(b, name)
        if name in a["full"] or name in b["full"]:  # a full tensor contains the other's entries
            both = min(sa, sb)
        else:
            both = len(np.intersect1d(a["partial"].get(name, torch.empty(0)).numpy(),
                                      b["partial"].get(name, torch.empty(0)).numpy()))
        inter += both
        union += sa + sb - both
    return inter / union if union else float("nan")


def _fingerprint(row) -> str:
    return str(getattr(row, "fingerprint", "") or "")


def _known(known: pd.DataFrame | None, key_columns: list[str]) -> dict[tuple, pd.Series]:
    """Rows computed earlier (a board's committed per-seed CSV), by their key: a value whose
    masks or scores are not on this machine is read from there when both cells' fingerprints
    match, so a fresh clone's report keeps what the machine that ran the cells measured."""
    if known is None or known.empty:
        return {}
    return {tuple(str(v) for v in row[key_columns]): row for _, row in known.iterrows()}


OVERLAP_KEY = ["task", "budget", "seed", "method_a", "method_b", "fingerprint_a", "fingerprint_b"]


def mask_overlap_seeds(frame: pd.DataFrame, known: pd.DataFrame | None = None) -> pd.DataFrame:
    """Jaccard overlap of the trained entries (the effective masks saved after training)
    between every pair of methods, per task, budget and seed both ran, natural-count methods
    included in every budget; where a mask is not on this machine, the `known` row of the same
    two cells (fingerprints) if any. Methods that only add parameters (LoRA, adapters) train no
    pre-trained entry: their overlap is 0 (NaN with each other)."""
    rows, earlier = [], _known(known, OVERLAP_KEY)
    budgets = [b for b in dict.fromkeys(frame.budget) if b != "natural"] or ["natural"]
    groups = [((task, budget), frame[(frame.task == task) & frame.budget.isin([budget, "natural"])])
              for task in frame.task.unique() for budget in budgets]
    for (task, budget), group in groups:
        for m1, m2 in itertools.combinations(sorted(group.method.unique()), 2):
            for seed in sorted(set(group[group.method == m1].seed) & set(group[group.method == m2].seed)):
                r1 = group[(group.method == m1) & (group.seed == seed)].iloc[0]
                r2 = group[(group.method == m2) & (group.seed == seed)].iloc[0]
                key = {"task": task, "budget": budget, "seed": seed, "method_a": m1, "method_b": m2,
                       "fingerprint_a": _fingerprint(r1), "fingerprint_b": _fingerprint(r2)}
                a, b = _mask(r1.run_dir, seed), _mask(r2.run_dir, seed)
                if a is not None and b is not None:
                    rows.append({**key, "jaccard": jaccard(a, b, _numels(r1.run_dir, seed))})
                elif key["fingerprint_a"] and key["fingerprint_b"]:
                    found = earlier.get(tuple(str(key[c]) for c in OVERLAP_KEY))
                    if found is not None:
                        rows.append({**key, "jaccard": float(found["jaccard"])})
    return pd.DataFrame(rows)


def mask_overlap(seeds: pd.DataFrame) -> pd.DataFrame:
    """`mask_overlap_seeds` averaged over the seeds, per task, budget and pair of methods."""
    if seeds.empty:
        return pd.DataFrame()
    return seeds.groupby(["task", "budget", "method_a", "method_b"], as_index=False, sort=False).agg(
        jaccard=("jaccard", "mean"), seeds=("seed", "size"))


SCORES_KEY = ["task", "seed", "method_a", "method_b", "fingerprint_a", "fingerprint_b"]


def score_correlation_seeds(frame: pd.DataFrame, cache_dir: str | Path, sample: int = 200_000,
                            seed: int = 0, known: pd.DataFrame | None = None) -> pd.DataFrame:
    """Spearman and Kendall between two methods' importance scores over the same entries, per
    task and seed (methods whose scores are entry-shaped and cached); where the scores are not
    in this machine's cache, the `known` row of the same two cells (fingerprints) if any.
    Kendall on 10^7+ entries is slow, so both are computed on the same `sample` entries drawn
    with `seed`."""
    vectors: dict[tuple, dict] = {}
    cells = frame.drop_duplicates(["task", "method", "seed"])
    prints = {(r.task, r.seed, r.method): _fingerprint(r) for r in cells.itertuples()}
    for _, row in cells.iterrows():
        sel = Path(row.run_dir) / f"seed-{row.seed}" / "selection.json"
        key = json.loads(sel.read_text()).get("score_cache_key") if sel.exists() else None
        path = Path(cache_dir) / f"{key}.pt"
        if key is None or not path.exists():
            continue
        scores = load_pt(path)["scores"]
        numels = _numels(row.run_dir, row.seed)
        if isinstance(scores, dict) and all(n in scores and scores[n].numel() == numels[n] for n in numels):
            vectors[(row.task, row.seed, row.method)] = {n: scores[n] for n in numels}
    rows, earlier = [], _known(known, SCORES_KEY)
    for (task, s), keys in itertools.groupby(sorted(prints), key=lambda k: k[:2]):
        for k1, k2 in itertools.combinations(list(keys), 2):
            key = {"task": task, "seed": s, "method_a": k1[2], "method_b": k2[2],
                   "fingerprint_a": prints[k1], "fingerprint_b": prints[k2]}
            if k1 in vectors and k2 in vectors:
                x = torch.cat([vectors[k1][n].flatten().float() for n in sorted(vectors[k1])])
                y = torch.cat([vectors[k2][n].flatten().float() for n in sorted(vectors[k1])])
                idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:sample]
                xs, ys = x[idx].numpy(), y[idx].numpy()
                rows.append({**key, "spearman": float(scipy.stats.spearmanr(xs, ys)[0]),
                             "kendall": float(scipy.stats.kendalltau(xs, ys)[0]), "entries": len(xs)})
            elif key["fingerprint_a"] and key["fingerprint_b"]:
                found = earlier.get(tuple(str(key[c]) for c in SCORES_KEY))
                if found is not None:
                    rows.append({**key, "spearman": float(found["spearman"]),
                                 "kendall": float(found["kendall"]), "entries": int(found["entries"])})
    return pd.DataFrame(rows)


def score_correlation(seeds: pd.DataFrame) -> pd.DataFrame:
    """`score_correlation_seeds` averaged over seeds, per task and pair of methods."""
    if seeds.empty:
        return seeds
    return seeds.groupby(["task", "method_a", "method_b"], as_index=False).agg(
        spearman=("spearman", "mean"), kendall=("kendall", "mean"), seeds=("seed", "size"),
        entries=("entries", "first")).astype({"seeds": int, "entries": int})


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
    budgets = [b for b in dict.fromkeys(stats.budget) if b != "natural"] or ["natural"]
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


def to_markdown(frame: pd.DataFrame, floatfmt: str = ".4f") -> str:
    return frame.to_markdown(floatfmt=floatfmt) if not frame.empty else "(none)"


def constant_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: the constant predictor's test score and the test rows (from the runs)."""
    if "constant_metric" not in frame:
        return pd.DataFrame(columns=["metric", "test_rows"])
    g = frame.dropna(subset=["constant_metric"]).groupby("task")
    return pd.DataFrame({"metric": g.constant_metric.first(), "test_rows": g.test_rows.first()})


def budget_rows(stats: pd.DataFrame, budget: str) -> pd.DataFrame:
    """Cells of one budget plus the natural-count methods, as Fu et al. mix them in Table 1."""
    return stats[(stats.budget == budget) | (stats.budget == "natural")]


def constant_cells(frame: pd.DataFrame) -> list[str]:
    """'task/method/bBUDGET' of every cell whose mean is within noise of the constant predictor
    (`metrics.near_constant`): cells that did not measurably learn."""
    constant = constant_scores(frame)
    out = []
    for row in cell_stats(frame).itertuples():
        if row.task in constant.index and near_constant(row.mean, row.std, constant.loc[row.task, "metric"],
                                                        int(constant.loc[row.task, "test_rows"])):
            out.append(f"{row.task}/{row.method}/b{row.budget}")
    return sorted(out)


def verdict(frame: pd.DataFrame, ranking: dict | None = None, alpha: float = 0.05) -> str:
    """One paragraph a reader can quote, written from the statistics: Friedman over the
    (task, budget) blocks, which pairs the Holm-adjusted Wilcoxon tests separate ("no pair
    differs" when none does), and the cells at the constant predictor, which weigh on ranks."""
    ranking = ranking if ranking is not None else friedman_ranking(frame)
    stuck = constant_cells(frame)
    stuck_text = (f"{len(stuck)} cell(s) are within noise of the constant predictor (did not "
                  f"measurably learn; their ranks are ties near the bottom): {', '.join(stuck[:12])}"
                  f"{' ...' if len(stuck) > 12 else ''}." if stuck else
                  "No cell is within noise of the constant predictor.")
    if ranking is None:
        return ("Too few (task, budget) blocks or methods for a ranking test (at least 2 blocks and "
                f"3 methods). {stuck_text}")
    ranks, pairwise = ranking["ranks"], ranking["pairwise"]
    separated = []
    for a, b in itertools.combinations(list(ranks.index), 2):  # ranks are sorted: a ranks better
        if a in pairwise.index and b in pairwise.columns and pairwise.loc[a, b] < alpha:
            separated.append(f"{a} over {b} (p = {pairwise.loc[a, b]:.2g})")
    friedman = (f"Friedman's test over {ranking['n_blocks']} (task, budget) blocks gives p = "
                f"{ranking['p']:.2g}: the methods' mean ranks "
                + ("differ" if ranking["p"] < alpha else "do not differ") + f" at {alpha}.")
    pairs = (f"Pairwise (Wilcoxon signed-rank over {ranking['n_pairs']} (task, budget, seed) pairs, "
             f"Holm-adjusted): " + (f"no pair differs at {alpha}." if not separated else
                                    f"{len(separated)} pair(s) differ at {alpha}: "
                                    + "; ".join(separated[:15]) + (" ..." if len(separated) > 15 else "") + "."))
    best = f"Best mean rank: {ranks.index[0]} ({ranks.iloc[0]:.2f})."
    return " ".join([friedman, pairs, best, stuck_text])


def table_section(path: Path, table: pd.DataFrame, title: str, intro: str,
                  drop: list[str] = ()) -> list[str]:
    """Write `table` to `path` and return its Markdown section (nothing for an empty table)."""
    if table.empty:
        return []
    table.to_csv(path, index=False)
    return [title, "", intro, "", table.drop(columns=list(drop)).to_markdown(index=False, floatfmt=".3f"), ""]


def build_report(frame: pd.DataFrame, out_dir: str | Path, title: str = "peftbench report",
                 header: str = "", published: dict | None = None, cache_dir: str | Path | None = None,
                 ties: str = "average", markdown: str = "report.md",
                 known: dict[str, pd.DataFrame] | None = None) -> str:
    """Write results.csv (one row per run), cells.csv, table1-b<budget>.csv, tests.csv,
    overlap.csv, score-correlation.csv (and their per-seed rows), published.csv and `markdown`
    into `out_dir`; return the Markdown. `known`: per-seed overlap ("overlap") and score
    correlation ("scores") rows measured earlier, for cells whose masks or scores are not on
    this machine (`mask_overlap_seeds`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = frame.sort_values(["task", "method", "budget", "seed"])
    # the run folder's name, not its path on this machine (a board's runs/<name>/ holds it);
    # no trial number (a study-local id): the same cells give the same file on any machine
    frame.drop(columns=["spend", "trial"], errors="ignore").assign(
        run_dir=[Path(p).name for p in frame.run_dir]).to_csv(out / "results.csv", index=False)
    stats = cell_stats(frame)
    stats.to_csv(out / "cells.csv", index=False)
    budgets = [b for b in dict.fromkeys(stats.budget) if b != "natural"] or ["natural"]
    lines = [f"# {title}", "", header, ""] if header else [f"# {title}", ""]
    lines += ["Cells: test main metric x100 at the best-validation checkpoint, mean ± population "
              "std over seeds; [r] = rank in the column (mean: higher is better; std: lower is "
              f"better; ties: {ties}); AVG = mean of task means ± mean of task stds; † = worse "
              "than the column's best by a paired t-test over the n seeds both ran (p < 0.05; n "
              "per test in tests.csv); ≈ = within noise of the constant predictor (less than "
              "max(2 std, 1/sqrt(test rows)) above it: the cell did not measurably learn). The "
              "row 'constant predictor' is the train majority class (mean label for regression) "
              "scored on test.", ""]
    lines += [f"Note: {note}" for note in frame.attrs.get("notes", [])]
    said = verdict(frame)
    (out / "verdict.md").write_text(said + "\n")
    lines += ["", "**Verdict.** " + said, ""]
    failed = frame.attrs.get("failed", {})
    if failed:
        lines += ["", f"Failed cells ({len(failed)}), left out of every mean and rank:", ""]
        lines += [f"- {cell}: {reason}" for cell, reason in sorted(failed.items())]
    lines += [""]
    constant = constant_scores(frame)
    tests_all = []
    for budget in budgets:
        rows = budget_rows(stats, budget)
        tests = paired_tests(frame, rows)
        tests_all.append(tests.assign(budget=budget))
        table = table1(rows, ties=ties)
        if not tests.empty:
            table.worse = tests.pivot_table(index="method", columns="task", values="worse",
                                            aggfunc="any").reindex(table.mean.index).fillna(False)
        rendered = table.render()
        for method in table.mean.index:
            for task in constant.index.intersection(table.mean.columns):
                if near_constant(table.mean.loc[method, task], table.std.loc[method, task],
                                 constant.loc[task, "metric"], int(constant.loc[task, "test_rows"])):
                    rendered.loc[method, task] += " ≈"
        counts = rows.groupby("method")["trainable"].mean().reindex(rendered.index)
        share = 100 * counts / frame.pretrained_entries.iloc[0]
        rendered["trainable"] = [f"{int(c):,} ({s:.3f}%)" for c, s in zip(counts, share)]
        rendered.loc["constant predictor"] = {
            **{t: f"{100 * constant.loc[t, 'metric']:.2f}" if t in constant.index else "-"
               for t in rendered.columns}, "trainable": "0"}
        rendered.to_csv(out / f"table1-b{budget}.csv")
        corr = stability_correlation(table)
        per_cell = frame[frame.budget.isin([budget, "natural"])].groupby(["task", "method"]).seed.nunique()
        seeds = (f"{per_cell.min()} seeds" if per_cell.min() == per_cell.max()
                 else f"{per_cell.min()}-{per_cell.max()} seeds per cell")
        lines += [f"## Budget {budget} (natural-count methods included), {seeds}", "",
                  rendered.to_markdown(), "",
                  f"Stability vs performance (Fu et al. Fig. 2): Spearman rho = {corr['spearman']:.4f} "
                  f"(p = {corr['spearman_p']:.3g}), Kendall tau = {corr['kendall']:.4f} "
                  f"(p = {corr['kendall_p']:.3g}) over n = {corr['n']} (method, task) cells.", ""]
    pd.concat(tests_all).to_csv(out / "tests.csv", index=False)
    ranking = friedman_ranking(frame)
    if ranking is not None:
        ranking["pairwise"].to_csv(out / "wilcoxon-holm.csv")
        ranking["ranks"].rename("mean_rank").to_csv(out / "ranks.csv")
        lines += ["## Ranking over all (task, budget) cells (Friedman; Wilcoxon-Holm)", "",
                  f"Friedman chi2 = {ranking['statistic']:.3f}, p = {ranking['p']:.3g} over "
                  f"{ranking['n_blocks']} blocks ({', '.join(ranking['blocks'])}) and "
                  f"{len(ranking['ranks'])} methods (Demsar 2006). Mean rank (1 = best) below. "
                  "Pairwise: two-sided Wilcoxon signed-rank tests over the "
                  f"{ranking['n_pairs']} (task, budget, seed) pairs, Holm-adjusted over all pairs "
                  "(Benavoli, Corani & Mangili 2016), in wilcoxon-holm.csv, drawn as the "
                  "critical-difference diagram cd.png (methods joined by a bar are not "
                  "significantly different at 0.05).", "",
                  ranking["ranks"].rename("mean rank").to_frame().to_markdown(floatfmt=".2f"), ""]
        lines += table_section(
            out / "bayesian.csv", bayesian_against(frame),
            "### Against Random and full fine-tuning (Bayesian signed-rank, ROPE 1 point)",
            "Benavoli et al. (2017): the posterior probability that the method is better than the "
            "reference by more than 0.01 (one point x100), practically equivalent, or worse, over "
            "the (task, budget, seed) pairs both ran (bayesian.csv; `baycomp`).", drop=["rope"])
    lines += table_section(
        out / "best-per-budget.csv", best_per_budget(frame),
        "### Which selection method is best at which budget",
        "Per (task, budget), among the budget-parameterised methods: the best by mean, the "
        "runner-up, their mean paired difference over seeds, and the Bayesian signed-rank "
        "probabilities (ROPE one point) that the best is better than the runner-up, practically "
        "equivalent, or worse (best-per-budget.csv). A P(better) below 0.95 means the data do "
        "not single out one method there.")
    from peftbench import findings  # here: findings imports this module

    lines += findings.section(frame, out)
    cost = cost_table(frame)
    cost.to_csv(out / "cost.csv")
    lines += ["## Cost per run", "", "Mean seconds of scoring and of training (evaluation included) "
              "per run, training steps per second, and the largest peak memory of a run (MiB; peak "
              "RSS on CPU, max allocated on CUDA; scoring or training, whichever is larger).", "",
              cost.to_markdown(floatfmt=".1f"), ""]
    if published:
        theirs = parse_published(published)
        both, taus = compare_published(stats, theirs)
        both.to_csv(out / "published.csv", index=False)
        lines += ["## Against the published numbers", "",
                  "Each of our budgets against the published column separately (never pooled):", "",
                  to_markdown(both[["compared_at", "task", "method", "budget", "mean", "mean_published",
                                    "difference"]].set_index(["compared_at", "task", "method"])), "",
                  "Kendall's tau between our ranking and theirs, per task and budget (n = methods):", "",
                  to_markdown(taus.set_index(["task", "budget"])), ""]
    overlap_seeds = mask_overlap_seeds(frame, known=known.get("overlap") if known else None)
    overlap_seeds.to_csv(out / "overlap-seeds.csv", index=False)
    overlap = mask_overlap(overlap_seeds)
    overlap.to_csv(out / "overlap.csv", index=False)
    if not overlap.empty:
        lines += ["## Do methods pick the same entries? (Jaccard of the masks, mean over seeds)", ""]
        for (task, budget), g in overlap.groupby(["task", "budget"]):
            both = pd.concat([g, g.rename(columns={"method_a": "method_b", "method_b": "method_a"})])
            matrix = both.pivot(index="method_a", columns="method_b", values="jaccard")
            for m in matrix.index:
                matrix.loc[m, m] = 1.0
            lines += [f"{task}, budget {budget}:", "", matrix.to_markdown(floatfmt=".3f"), ""]
    if cache_dir is not None:
        seeds = score_correlation_seeds(frame, cache_dir, known=known.get("scores") if known else None)
        seeds.to_csv(out / "score-correlation-seeds.csv", index=False)
        corr_scores = score_correlation(seeds)
        corr_scores.to_csv(out / "score-correlation.csv", index=False)
        if not corr_scores.empty:
            lines += ["## Rank correlation of importance scores (same sampled entries)", "",
                      corr_scores.to_markdown(index=False, floatfmt=("", "", "", ".4f", ".4f", ".0f", ".0f")), ""]
    text = "\n".join(lines)
    (out / markdown).write_text(text)
    return text

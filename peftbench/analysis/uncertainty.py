"""How sure a number is: test-set sampling error beside seed error, and a hierarchical model
that combines tasks as the independent units (seeds are repeated measurements inside a task).

Every seed of a cell scores the same test set, so averaging seeds shrinks the seed error but
not the test set's: a cell's mean carries both (Dror et al. 2018; Bouthillier et al. 2021).
With every seed's per-example predictions stored (cells written since peftbench kept them), the
test-set part is a paired bootstrap over the test examples (`bootstrap_test_se`: the same
resampled examples for every seed of both methods, so what the two get right together cancels).
Without them it is analytic:
- proportions (accuracy, exact match): binomial, sqrt(p (1 - p) / n);
- correlations (Pearson, Spearman, their mean, MCC): Fisher's z, 1 / sqrt(n - 3) on the z
  scale, (1 - r^2) / sqrt(n - 3) on the metric's scale by the delta method;
- anything else (F1, macro-F1, a log-likelihood): no analytic SE; intervals say so.
A difference between two methods on one test set treats their test-set errors as independent,
which overstates it (the same examples make both right or wrong): conservative, and labelled.

Across tasks (`hierarchical`): each task's mean difference, standardised by the task's
test-set SE of the reference (so one unit means "what this test set can resolve" whatever the
metric), is y_t ~ N(delta_t, s_t^2), delta_t ~ N(mu, tau^2), mu flat, tau half-Cauchy(0, 1)
(Gelman 2006, for few groups; Benavoli et al. 2017 use the same structure with a Student
likelihood over seeds). The posterior of tau is computed on a grid (exact up to the grid),
mu | tau and a new task's delta are normal: draws are seeded, so every machine prints the same
probabilities.
"""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import scipy.stats

PROPORTIONS = {"accuracy", "exact_match"}
CORRELATIONS = {"pearson", "spearman", "mcc"}
Z95 = 0.95
DRAWS = 50_000
DRAW_SEED = 0
TAU_SCALE = 1.0  # half-Cauchy scale of the between-task spread, in test-set SE units
GRID = 4000


def test_se_kind(metric_name: str) -> str | None:
    """'binomial', 'fisher-z' or None for a main metric named like 'pearson+spearman'."""
    parts = set(str(metric_name).split("+")) if metric_name else set()
    if parts and parts <= PROPORTIONS:
        return "binomial"
    if parts and parts <= CORRELATIONS:
        return "fisher-z"
    return None


def test_se(value: float, n: int, kind: str | None) -> float:
    """The test set's standard error of a score `value` on `n` examples, on the metric's scale."""
    if kind == "binomial":
        p = min(max(float(value), 0.0), 1.0)
        return float(np.sqrt(p * (1 - p) / n))
    if kind == "fisher-z" and n > 3:
        return float((1 - min(float(value) ** 2, 1.0)) / np.sqrt(n - 3))
    return float("nan")


def _interval(centre: float, se_seed: float, se_test: float, seeds: int) -> tuple[float, float, float]:
    """(half-width, total SE, df): a t interval whose df are Welch-Satterthwaite's for a seed
    part with seeds - 1 df and a test-set part known analytically (infinite df)."""
    total = float(np.hypot(se_seed, se_test))
    if total == 0 or not np.isfinite(total):
        return float("nan"), total, float("nan")
    df = float("inf") if se_seed == 0 else (seeds - 1) * total ** 4 / se_seed ** 4
    return float(scipy.stats.t.ppf(0.5 + Z95 / 2, df) * total), total, df


def cell_interval(values, n: int, kind: str | None, se_test: float | None = None) -> dict[str, float]:
    """95% interval of a cell's mean over seeds that carries both the seed and the test-set
    error (analytic for `kind`, correlations on Fisher's z scale transformed back; or the given
    `se_test`, e.g. from `bootstrap_test_se`, on the metric's scale). Keys: mean, se_seed,
    se_test, low, high (NaN where there is no test-set SE, or one seed)."""
    values = np.asarray(values, float)
    k, mean = len(values), float(values.mean())
    se_seed = float(values.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
    given = se_test is not None
    se_test = float(se_test) if given else test_se(mean, n, kind)
    out = {"mean": mean, "se_seed": se_seed, "se_test": se_test, "low": float("nan"), "high": float("nan")}
    if k < 2 or not np.isfinite(se_test):
        return out
    if kind == "fisher-z" and not given:
        z = np.arctanh(np.clip(values, -0.999999, 0.999999))
        half, _, _ = _interval(float(z.mean()), float(z.std(ddof=1) / np.sqrt(k)), 1 / np.sqrt(n - 3), k)
        out["low"], out["high"] = float(np.tanh(z.mean() - half)), float(np.tanh(z.mean() + half))
    else:
        half, _, _ = _interval(mean, se_seed, se_test, k)
        out["low"], out["high"] = max(0.0, mean - half), min(1.0, mean + half)
    return out


def paired_difference(a, b, n: int, kind: str | None, se_test: float | None = None) -> dict[str, float]:
    """Method a - method b on one task, paired by seed: the mean difference, its SE from the
    seeds (the spread of the paired differences) and from the test set (`se_test` when given,
    e.g. the paired bootstrap's; else both analytic test-set SEs as if independent:
    conservative), a 95% t interval (Welch-Satterthwaite df) and its two-sided p. NaN p /
    interval where there is no test-set SE."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    k = len(d)
    se_seed = float(d.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
    if se_test is None:
        se_test = float(np.hypot(test_se(a.mean(), n, kind), test_se(b.mean(), n, kind)))
    half, total, df = _interval(float(d.mean()), se_seed, se_test, k) if k > 1 else (np.nan, np.nan, np.nan)
    p = float(2 * scipy.stats.t.sf(abs(d.mean()) / total, df)) if np.isfinite(half) else float("nan")
    return {"difference": float(d.mean()), "seeds": k, "se_seed": se_seed, "se_test": se_test,
            "se": total, "low": float(d.mean() - half), "high": float(d.mean() + half), "p": p}


BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0


def resampled_ranks(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`scipy.stats.rankdata(values[idx], axis=1)` (average ranks for ties) without sorting
    every resample: `values` is sorted once, each draw's multiplicity of every distinct value
    is counted, and a value's rank is the count below it plus half its own count (+1/2).
    Ranks are half-integers, so this equals scipy's to the last bit."""
    distinct, code = np.unique(np.asarray(values), return_inverse=True)
    draws, m = idx.shape[0], len(distinct)
    offsets = (np.arange(draws) * m)[:, None]
    counts = np.bincount((code[idx] + offsets).ravel(), minlength=draws * m).reshape(draws, m).astype(float)
    average = np.cumsum(counts, axis=1) - counts + (counts + 1) / 2
    return np.take_along_axis(average, code[idx], axis=1)


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    denominator = np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (xc * yc).sum(1) / denominator, 0.0)


CONFUSION = {"accuracy", "f1", "macro_f1", "mcc"}


def _confusion_metrics(p: np.ndarray, y: np.ndarray, idx: np.ndarray, classes: int, main: list[str]) -> np.ndarray:
    """Accuracy, F1 of class 1, macro-F1 over all `classes` (a class absent from both counts
    0) and multi-class MCC on every resample at once, from per-draw confusion counts: the same
    definitions as `metrics` (scikit-learn's), tested against it."""
    draws = idx.shape[0]
    codes = y[idx] * classes + p[idx] + (np.arange(draws) * classes * classes)[:, None]
    m = np.bincount(codes.ravel(), minlength=draws * classes * classes).reshape(draws, classes, classes)
    m = m.astype(float)
    n = m.sum((1, 2))
    tp = np.diagonal(m, axis1=1, axis2=2)
    true, pred = m.sum(2), m.sum(1)

    def f1(t, fp, fn):
        denominator = 2 * t + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * t / denominator, 0.0)

    parts = []
    for name in main:
        if name == "accuracy":
            parts.append(tp.sum(1) / n)
        elif name == "f1":
            parts.append(f1(m[:, 1, 1], m[:, 0, 1], m[:, 1, 0]))
        elif name == "macro_f1":
            parts.append(f1(tp, pred - tp, true - tp).mean(1))
        else:  # mcc
            covariance = tp.sum(1) * n - (true * pred).sum(1)
            denominator = np.sqrt((n ** 2 - (pred ** 2).sum(1)) * (n ** 2 - (true ** 2).sum(1)))
            with np.errstate(invalid="ignore", divide="ignore"):
                parts.append(np.where(denominator > 0, covariance / denominator, 0.0))
    return np.mean(parts, axis=0)


def _resampled_main(cell: dict, main: list[str], idx: np.ndarray) -> np.ndarray:
    """The main metric of one seed's stored predictions on each row of resampled indices
    (draws x n): vectorised for accuracy, F1, macro-F1, MCC, Pearson and Spearman,
    `data.metrics.compute` otherwise."""
    from peftbench.data import metrics

    p, y = cell["predictions"], cell["labels"]
    if not isinstance(p, dict) and set(main) <= CONFUSION and all(isinstance(v, int) for v in [*p[:1], *y[:1]]):
        p, y = np.asarray(p, dtype=np.int64), np.asarray(y, dtype=np.int64)
        classes = int(cell.get("num_classes") or max(p.max(), y.max()) + 1)
        return _confusion_metrics(p, y, idx, classes, main)
    if not isinstance(p, dict) and set(main) <= {"accuracy", "pearson", "spearman"}:
        p, y = np.asarray(p), np.asarray(y)
        parts = []
        for name in main:
            if name == "accuracy":
                parts.append((p == y)[idx].mean(1))
            elif name == "pearson":
                parts.append(_rowwise_pearson(p[idx].astype(float), y[idx].astype(float)))
            else:
                parts.append(_rowwise_pearson(resampled_ranks(p, idx), resampled_ranks(y, idx)))
        return np.mean(parts, axis=0)
    out = np.empty(len(idx))
    for r, rows in enumerate(idx):
        pick = ({k: [v[i] for i in rows] for k, v in p.items()} if isinstance(p, dict)
                else np.asarray(p)[rows])
        out[r] = metrics.compute(main, main, pick, np.asarray(y, dtype=object if isinstance(y[0], str) else None)[rows],
                                 cell.get("num_classes"))["main"]
    return out


# A seed's resampled scores, by its stored predictions and the draws: a report bootstraps each
# seed once, however many comparisons it enters (the draws depend only on n and the seed).
_RESAMPLED: dict[tuple, np.ndarray] = {}
RESAMPLED_KEPT = 4096


def bootstrap_test_se(cells_a: list[dict], cells_b: list[dict] | None, main: list[str],
                      draws: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> float:
    """The test set's SE of a cell's seed-mean (cells_b None) or of the difference of two
    cells' seed-means, by a paired bootstrap over the test examples: every draw resamples the
    examples once and scores every stored seed of both cells on them (`training.record.Predictions`)."""
    n = len(cells_a[0]["labels"])
    if any(len(c["labels"]) != n for c in [*cells_a, *(cells_b or [])]):
        raise ValueError("the cells' stored predictions are of different test sets")
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))

    def resampled(cell: dict) -> np.ndarray:
        key = (hashlib.sha1(pickle.dumps((cell["predictions"], cell["labels"], cell.get("num_classes")))).hexdigest(),
               tuple(main), draws, seed)
        if key not in _RESAMPLED:
            if len(_RESAMPLED) >= RESAMPLED_KEPT:
                _RESAMPLED.clear()
            _RESAMPLED[key] = _resampled_main(cell, main, idx)
        return _RESAMPLED[key]

    value = np.mean([resampled(c) for c in cells_a], axis=0)
    if cells_b is not None:
        value = value - np.mean([resampled(c) for c in cells_b], axis=0)
    return float(value.std(ddof=1))


def mcnemar(cells_a: list[dict], cells_b: list[dict]) -> dict[str, float]:
    """McNemar's test of two classifiers on the same test examples, seed by seed as strata:
    the discordant examples (a right and b wrong: `a_only`; the reverse: `b_only`) summed over
    the paired seeds, then the exact binomial test (statsmodels) on them. Test-set evidence
    only: the seeds' own spread is in `paired_difference`'s interval, not here."""
    from statsmodels.stats.contingency_tables import mcnemar as test

    a_only = b_only = 0
    for a, b in zip(cells_a, cells_b):
        y = np.asarray(a["labels"])
        right_a, right_b = np.asarray(a["predictions"]) == y, np.asarray(b["predictions"]) == y
        a_only += int((right_a & ~right_b).sum())
        b_only += int((~right_a & right_b).sum())
    p = float(test([[0, a_only], [b_only, 0]], exact=True).pvalue) if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": p}


def tau_posterior(y, s, scale: float = TAU_SCALE, grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Grid of tau and its normalised posterior weights for the normal hierarchical model with
    mu integrated out (Gelman et al., BDA3 eq. 5.21). The grid is uniform in
    u = (2 / pi) arctan(tau / scale), where the half-Cauchy prior is uniform: the weights are the
    marginal likelihood alone."""
    y, s = np.asarray(y, float), np.asarray(s, float)
    u = (np.arange(grid) + 0.5) / grid
    tau = scale * np.tan(np.pi / 2 * u)
    v = s[None, :] ** 2 + tau[:, None] ** 2
    w = 1 / v
    mu_hat = (w * y).sum(1) / w.sum(1)
    log_like = (-0.5 * np.log(w.sum(1)) - 0.5 * np.log(v).sum(1)
                - 0.5 * ((y[None, :] - mu_hat[:, None]) ** 2 * w).sum(1))
    weights = np.exp(log_like - log_like.max())
    return tau, weights / weights.sum()


def hierarchical(y, s, rope: float = 1.0, draws: int = DRAWS, seed: int = DRAW_SEED,
                 scale: float = TAU_SCALE) -> dict[str, float]:
    """Posterior probabilities that the mean effect mu across tasks, and the effect on a new
    task, is above +rope, inside [-rope, rope], or below -rope (y, s: each task's standardised
    difference and its SE). Also the posterior mean and 95% interval of mu, and the number of
    tasks, draws and the draw seed."""
    y, s = np.asarray(y, float), np.asarray(s, float)
    tau, weights = tau_posterior(y, s, scale)
    rng = np.random.default_rng(seed)
    t = tau[rng.choice(len(tau), size=draws, p=weights)]
    w = 1 / (s[None, :] ** 2 + t[:, None] ** 2)
    mu = rng.normal((w * y).sum(1) / w.sum(1), np.sqrt(1 / w.sum(1)))
    new = rng.normal(mu, t)

    def probs(x):
        return float(np.mean(x > rope)), float(np.mean(np.abs(x) <= rope)), float(np.mean(x < -rope))

    better, equivalent, worse = probs(mu)
    new_better, new_equivalent, new_worse = probs(new)
    low, high = np.percentile(mu, [2.5, 97.5])
    return {"tasks": len(y), "mu": float(mu.mean()), "mu_low": float(low), "mu_high": float(high),
            "p_better": better, "p_equivalent": equivalent, "p_worse": worse,
            "new_task_better": new_better, "new_task_equivalent": new_equivalent,
            "new_task_worse": new_worse, "rope": rope, "draws": draws, "seed": seed}

"""Task metrics, computed with scikit-learn and scipy (works offline; `evaluate`'s GLUE metric
is the same sklearn/scipy calls but its wheel ships no metric code).

Definitions follow jiant (Fu et al.'s harness): accuracy; binary F1 of class 1 (MRPC); MCC
(CoLA); Pearson and Spearman (STS-B); macro-F1 (CB) is the mean of the per-class F1 over *all*
the task's classes, a class absent from both labels and predictions counting 0, as
`f1_score(..., labels=range(num_classes), average="macro")`. scikit-learn's default
`average="macro"` averages only the classes present, which on Fu et al.'s CB validation file
(no 'contradiction' row) inflates the score and changes which checkpoint wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from peftbench.core.plugins import PluginTable


def _varies(p) -> bool:
    """Not all equal. (`np.std` of a constant float array can be 1e-16, not 0, and then
    scipy warns and returns NaN: the STS-B constant predictor scored NaN that way.)"""
    return bool(np.ptp(p) > 0)


def _pearson(p, y):
    """A constant prediction has no correlation: 0, not NaN (so baselines and means stay numbers)."""
    return float(stats.pearsonr(p, y)[0]) if _varies(p) and _varies(y) else 0.0


def _spearman(p, y):
    return float(stats.spearmanr(p, y)[0]) if _varies(p) and _varies(y) else 0.0


_LABELS = ("classification", "multiple_choice")


@dataclass(frozen=True)
class Metric:
    """One metric: how it scores predictions against labels, the task kinds it can score (a
    task file naming it for another kind is refused when it loads), and how it reads."""

    name: str
    score: Callable  # (predictions, labels) -> float, or (predictions, labels, classes)
    kinds: tuple[str, ...]
    display: str
    needs_classes: bool = False  # must know every class, present or not (macro-F1)
    binary: bool = False  # positive class 1: two classes only


BUILTIN = [
    Metric("accuracy", lambda p, y: float(skm.accuracy_score(y, p)), _LABELS, "accuracy"),
    Metric("f1", lambda p, y: float(skm.f1_score(y, p, pos_label=1, zero_division=0)), _LABELS, "F1",
           binary=True),
    Metric("macro_f1", lambda p, y, classes: float(skm.f1_score(y, p, labels=list(range(classes)),
                                                                 average="macro", zero_division=0)),
           _LABELS, "macro-F1", needs_classes=True),
    Metric("mcc", lambda p, y: float(skm.matthews_corrcoef(y, p)), _LABELS, "MCC"),
    Metric("pearson", _pearson, ("regression",), "Pearson r"),
    Metric("spearman", _spearman, ("regression",), "Spearman rho"),
    # causal_lm: predictions are the extracted generated answers, labels the extracted gold ones
    Metric("exact_match", lambda p, y: float(np.mean([str(a) == str(b) for a, b in zip(p, y)])),
           ("causal_lm",), "exact match"),
    # causal_lm: predictions are each answer's mean per-token log-likelihood (labels unused)
    Metric("answer_loglik", lambda p, y: float(np.mean(p)), ("causal_lm",), "answer log-likelihood"),
]
# Third-party metrics: `[project.entry-points."peftbench.metrics"] name = "package.module:METRIC"`.
REGISTRY: PluginTable[Metric] = PluginTable("peftbench.metrics", "metric", Metric, BUILTIN)


def compute(names: list[str], main: list[str], predictions: np.ndarray, labels: np.ndarray,
            num_classes: int | None = None) -> dict:
    """Every metric in `names`, plus `main`: the mean of the `main` metrics (jiant's major
    metric: MRPC (acc+F1)/2, STS-B (Pearson+Spearman)/2, CB (acc+macro-F1)/2)."""
    out = {}
    for name in names:
        metric = REGISTRY.get(name)
        if isinstance(predictions, dict):  # one prediction array per metric (causal_lm)
            out[name] = metric.score(predictions[name], labels)
        elif metric.needs_classes:
            if num_classes is None:
                raise ValueError(f"metric {name} needs the number of classes")
            out[name] = metric.score(predictions, labels, num_classes)
        else:
            out[name] = metric.score(predictions, labels)
    out["main"] = float(np.mean([out[m] for m in main]))
    return out


def constant_predictor(task, splits) -> dict:
    """The score of the constant predictor the training set suggests, per evaluation split:
    the majority class of `train` (the lowest class id on ties; for multiple choice the most
    frequent correct choice) or, for regression, the mean train label. A trained model must
    beat this to have learned anything; rows: {"prediction", "validation", "test", "test_rows"}."""
    if task.kind == "causal_lm":  # the most frequent train answer, generated for every prompt
        golds = [task.extract_answer(task.answer_text(r)) for r in splits["train"]]
        values, counts = np.unique(golds, return_counts=True)
        constant = str(values[np.argmax(counts)])
        out = {"prediction": constant, "test_rows": len(splits["test"])}
        for split in ("validation", "test"):
            gold = [task.extract_answer(task.answer_text(r)) for r in splits[split]]
            out[split] = compute(task.metrics, task.main_metric,
                                 {"exact_match": [constant] * len(gold), "answer_loglik": [float("nan")]}, gold)
        return out
    train = np.array([task.label_id(v) for v in splits["train"]["label"]])
    if task.kind == "regression":
        constant = float(train.mean())
    else:
        values, counts = np.unique(train, return_counts=True)
        constant = int(values[np.argmax(counts)])
    out = {"prediction": constant, "test_rows": len(splits["test"])}
    for split in ("validation", "test"):
        labels = np.array([task.label_id(v) for v in splits[split]["label"]])
        predictions = np.full(len(labels), constant, dtype=float if task.kind == "regression" else int)
        out[split] = compute(task.metrics, task.main_metric, predictions, labels, task.num_classes)
    return out


def near_constant(mean: float, std: float, baseline: float, test_rows: int, seeds: int) -> bool:
    """True when a cell's mean over `seeds` seeds is within noise of the constant predictor's
    score: less than max(2 standard errors of the mean, 1/sqrt(test rows)) above it. `std` is
    the population std over seeds, so the standard error is std / sqrt(seeds - 1). 1/sqrt(n) is
    the 95% half-width of an accuracy near 0.5 on n rows (2 sqrt(0.25/n)), the smallest gap the
    test set can resolve.

    Why the mean's noise and not the seeds' (2 std, the rule before): a cell
    whose seeds split between learning (0.80) and collapsing to the majority class (0.51) has a
    mean well above the predictor but an std near half the gap, and 2 std called it "did not
    measurably learn" (all-methods-cpu's SST-2 Adapter: mean 0.754 over 5 seeds, 95% interval
    0.63-0.83, against 0.509). Instability is the std column's to show."""
    if not np.isfinite(mean):
        return False
    noise = 2 * std / np.sqrt(seeds - 1) if seeds > 1 and np.isfinite(std) else 0.0
    return bool(mean - baseline < max(noise, 1 / np.sqrt(max(test_rows, 1))))


def metric_label(main: list[str] | str) -> str:
    """How a main metric reads: 'accuracy', '(accuracy + macro-F1)/2' (a mean, never a sum)."""
    names = main.split("+") if isinstance(main, str) else list(main)
    shown = [REGISTRY.get(n).display if n in REGISTRY else n for n in names]
    return shown[0] if len(shown) == 1 else f"({' + '.join(shown)})/{len(shown)}"

"""Task metrics, computed with scikit-learn and scipy (works offline; `evaluate`'s GLUE metric
is the same sklearn/scipy calls but its wheel ships no metric code)."""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def _pearson(p, y):
    return float(stats.pearsonr(p, y)[0]) if np.std(p) > 0 else 0.0


def _spearman(p, y):
    return float(stats.spearmanr(p, y)[0]) if np.std(p) > 0 else 0.0


METRICS = {
    "accuracy": lambda p, y: float(skm.accuracy_score(y, p)),
    "f1": lambda p, y: float(skm.f1_score(y, p, pos_label=1, zero_division=0)),
    "macro_f1": lambda p, y: float(skm.f1_score(y, p, average="macro", zero_division=0)),
    "mcc": lambda p, y: float(skm.matthews_corrcoef(y, p)),
    "pearson": _pearson,
    "spearman": _spearman,
}


def compute(names: list[str], main: list[str], predictions: np.ndarray, labels: np.ndarray) -> dict:
    """Every metric in `names`, plus `main`: the mean of the `main` metrics (jiant's major
    metric: MRPC (acc+F1)/2, STS-B (Pearson+Spearman)/2, CB (acc+macro-F1)/2)."""
    out = {name: METRICS[name](predictions, labels) for name in names}
    out["main"] = float(np.mean([out[m] for m in main]))
    return out

import numpy as np
import pytest
from scipy import stats

from peftbench.metrics import compute


def test_combined_main_metric_is_the_mean():
    p = np.array([1, 0, 1, 1, 0, 1])
    y = np.array([1, 0, 0, 1, 1, 1])
    out = compute(["accuracy", "f1"], ["accuracy", "f1"], p, y)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert out["main"] == pytest.approx((out["accuracy"] + out["f1"]) / 2)


def test_correlations_match_scipy_and_survive_constant_predictions():
    p, y = np.array([0.1, 2.0, 3.5, 1.0]), np.array([0.0, 2.5, 4.0, 2.0])
    out = compute(["pearson", "spearman"], ["pearson"], p, y)
    assert out["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(p, y)[0])
    assert compute(["pearson"], ["pearson"], np.ones(4), y)["pearson"] == 0.0


def test_stsb_constant_predictor_scores_zero_correlation_not_nan():
    """The mean train label, repeated, is a float array whose np.std is ~1e-16, not 0: scipy
    then warned and returned NaN, and the STS-B baseline row read 'nan'."""
    import warnings

    from peftbench.data import load_task
    from peftbench.metrics import constant_predictor

    task = load_task("stsb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning either
        baseline = constant_predictor(task, task.load_splits())
    assert baseline["test"]["pearson"] == baseline["test"]["spearman"] == baseline["test"]["main"] == 0.0

import numpy as np
import pytest
from scipy import stats

from peftbench.data.metrics import compute


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

    from peftbench.data.metrics import constant_predictor
    from peftbench.data.tasks import load_task

    task = load_task("stsb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning either
        baseline = constant_predictor(task, task.load_splits())
    assert baseline["test"]["pearson"] == baseline["test"]["spearman"] == baseline["test"]["main"] == 0.0


def test_a_name_claimed_twice_in_a_plugin_table_is_refused_and_the_rest_work(monkeypatch):
    from importlib.metadata import EntryPoint

    from peftbench.core import plugins
    from peftbench.core.errors import UsageError
    from peftbench.data.metrics import BUILTIN, Metric

    claims = [EntryPoint("accuracy", "peftbench.data.metrics:BUILTIN", "peftbench.metrics"),
              EntryPoint("missing", "no_such_package.metrics:M", "peftbench.metrics")]
    monkeypatch.setattr(plugins, "entry_points", lambda group: claims if group == "peftbench.metrics" else [])
    table = plugins.PluginTable("peftbench.metrics", "metric", Metric, BUILTIN)
    assert "accuracy" not in table and "f1" in table
    with pytest.raises(UsageError, match="the metric name 'accuracy' is claimed twice"):
        table.get("accuracy")
    with pytest.raises(UsageError, match="metric 'missing': no_such_package.metrics:M .* failed to import"):
        table.get("missing")
    with pytest.raises(UsageError, match=r"metric 'spearmen' is unknown \(did you mean 'spearman'\?\): allowed"):
        table.get("spearmen")

"""The board's statistics against values computed independently: pairwise Wilcoxon with Holm
(scipy + Holm by hand) and the Bayesian signed-rank test (its Dirichlet-process posterior
restated in numpy)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from peftbench import report


def _frame(rng):
    rows = []
    for task in ("sst2", "stsb"):
        for budget in ("0.001", "0.005"):
            for seed in range(5):
                for i, method in enumerate(["random", "sam", "fish", "fulltuning"]):
                    rows.append({"task": task, "method": method,
                                 "budget": "natural" if method == "fulltuning" else budget,
                                 "seed": seed, "metric": 0.7 + 0.01 * i + rng.normal(0, 0.01),
                                 "trainable": 100, "pretrained_entries": 1000})
    frame = pd.DataFrame(rows)
    return frame.drop_duplicates(["task", "method", "budget", "seed"])


def test_wilcoxon_holm_equals_scipy_with_holm_by_hand():
    frame = _frame(np.random.default_rng(0))
    matrix = report.paired_matrix(frame)
    assert len(matrix) == 2 * 2 * 5  # full FT paired with every budget's rows
    got = report.wilcoxon_holm(matrix, {"fulltuning"})
    pairs = list(itertools.combinations(matrix.columns, 2))
    raw = np.array([scipy.stats.wilcoxon(matrix[a] - matrix[b]).pvalue for a, b in pairs])
    order = np.argsort(raw)  # Holm: sorted p times (m - rank), running max, capped at 1
    m, adjusted, running = len(raw), np.empty_like(raw), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * raw[i]))
        adjusted[i] = running
    for (a, b), p in zip(pairs, adjusted):
        assert got.loc[a, b] == pytest.approx(p) and got.loc[b, a] == pytest.approx(p)
    ranking = report.friedman_ranking(frame)
    assert ranking["n_pairs"] == 20 and ranking["pairwise"].equals(got)


def test_two_natural_count_methods_are_paired_once_per_task_and_seed():
    """BitFit vs full FT: the same (task, seed) pair stands in every budget block; counted once."""
    rng = np.random.default_rng(1)
    frame = _frame(rng)
    bitfit = frame[frame.method == "fulltuning"].assign(method="bitfit", metric=lambda d: d.metric - 0.02 + rng.normal(0, 0.005, len(d)))
    frame = pd.concat([frame, bitfit])
    matrix = report.paired_matrix(frame)
    x, y = report.pair_values(matrix, "bitfit", "fulltuning", report.natural_methods(frame))
    assert len(x) == 2 * 5  # tasks x seeds, not x budgets
    got = report.wilcoxon_holm(matrix, report.natural_methods(frame))
    raw = scipy.stats.wilcoxon(x - y).pvalue
    assert got.loc["bitfit", "fulltuning"] >= raw  # Holm never lowers a p-value
    table = report.bayesian_against(frame).set_index(["method", "against"])
    assert table.loc[("bitfit", "fulltuning"), "pairs"] == 10 and table.loc[("sam", "random"), "pairs"] == 20


def _posterior_by_hand(x, y, rope, samples=20_000, seed=1):
    """Benavoli et al. 2017, eq. for the Bayesian signed-rank test: z = differences plus one
    prior pseudo-observation at 0 (weight 0.5); Dirichlet weights w; per sample the mass of
    pairs (i, j) with (z_i + z_j)/2 above rope, inside, below; the winner of each sample."""
    z = np.concatenate([[0.0], np.asarray(x) - np.asarray(y)])
    sums = (z[:, None] + z[None, :]) / 2
    rng = np.random.default_rng(seed)
    wins = np.zeros(3)
    alpha = np.ones(len(z))
    alpha[0] = 0.5
    for _ in range(samples // 10):
        w = rng.dirichlet(alpha)
        pair = np.outer(w, w)
        masses = [pair[sums < -rope].sum(), pair[np.abs(sums) <= rope].sum(), pair[sums > rope].sum()]
        wins[int(np.argmax(masses))] += 1
    return wins / wins.sum()


@pytest.mark.parametrize("shift", [0.02, 0.0, -0.004])
def test_bayesian_signed_rank_matches_its_posterior_restated(shift):
    rng = np.random.default_rng(3)
    y = rng.normal(0.8, 0.01, 20)
    x = y + shift + rng.normal(0, 0.005, 20)
    got = report.bayesian_signed_rank(x, y, rope=0.01)
    worse, equivalent, better = _posterior_by_hand(x, y, 0.01)
    assert got["better"] == pytest.approx(better, abs=0.03)
    assert got["equivalent"] == pytest.approx(equivalent, abs=0.03)
    assert got["worse"] == pytest.approx(worse, abs=0.03)
    assert sum(got.values()) == pytest.approx(1.0)
    assert report.bayesian_signed_rank(x, y, rope=0.01) == got  # seeded: the same every time
    table = report.bayesian_against(_frame(np.random.default_rng(0)))
    assert set(table.against) == {"random", "fulltuning"} and (table.pairs == 20).all()


def test_budget_curve_area_and_the_budget_that_reaches_95_percent_of_full_ft(tmp_path):
    from peftbench import plots

    rows = [{"task": "sst2", "method": "fulltuning", "budget": "natural", "seed": s, "metric": 0.8,
             "trainable": 1000, "pretrained_entries": 1000} for s in range(3)]
    for budget, metric in (("0.001", 0.6), ("0.01", 0.7), ("0.1", 0.78)):
        rows += [{"task": "sst2", "method": "random", "budget": budget, "seed": s, "metric": metric,
                  "trainable": float(budget) * 1000, "pretrained_entries": 1000} for s in range(3)]
    frame = pd.DataFrame(rows)
    curves = report.budget_curves(frame)
    row = curves.set_index("method").loc["random"]
    # trapezoids over log10 trainable (-> 0, 1, 2): ((0.6+0.7)/2 + (0.7+0.78)/2) / 2
    assert row.area == pytest.approx(((0.6 + 0.7) / 2 + (0.7 + 0.78) / 2) / 2)
    assert row.reaches_95pct_full_ft_at == 0.1  # 0.78 >= 0.76 > 0.7
    assert "fulltuning" not in set(curves.method)  # one count: no curve
    assert plots.curves_png(frame, tmp_path / "curves.png").stat().st_size > 0


def test_best_per_budget_names_the_best_and_how_sure():
    frame = _frame(np.random.default_rng(0)).assign(pretrained_entries=100_000)  # 100 = 0.1%
    best = report.best_per_budget(frame).set_index(["task", "budget"])
    assert len(best) == 4 and set(best.best) <= {"random", "sam", "fish"}  # full FT has no budget
    assert (best.over_budget == "").all()
    row = best.iloc[0]
    cells = frame[(frame.task == best.index[0][0]) & (frame.budget == best.index[0][1])]
    means = cells.groupby("method").metric.mean().sort_values(ascending=False)
    assert (row.best, row.runner_up) == tuple(means.index[:2])
    assert row.p_better + row.p_equivalent + row.p_worse == pytest.approx(1.0)


def test_best_per_budget_leaves_out_a_method_whose_count_overshoots_the_budget():
    """ChildTuning-F's budget is a per-step share, yet a run moves every entry: at 0.1% it is
    not a 0.1% method, however well it scores. Within 1% of the budget still competes."""
    frame = _frame(np.random.default_rng(0)).assign(pretrained_entries=100_000)
    budgeted = frame[frame.budget != "natural"]
    redrawn = budgeted[budgeted.method == "random"].assign(method="childtuning-f", trainable=100_000,
                                                           metric=0.99)
    nearly = budgeted[budgeted.method == "sam"].assign(method="ggm", trainable=100.9, metric=0.98)
    best = report.best_per_budget(pd.concat([frame, redrawn, nearly])).set_index(["task", "budget"])
    assert set(best.best) == {"ggm"} and "childtuning-f" not in set(best.runner_up)
    assert set(best.loc[("sst2", "0.005")].over_budget.split("; ")) == {"childtuning-f (100,000)"}


def test_curves_axis_keeps_a_far_constant_predictor_out_of_the_way():
    """STS-B's constant predictor scores 0 while every curve sits near 0.7-0.8: the panel spans
    the methods' intervals and names the constant instead of squashing the curves onto a line;
    a constant within reach (SST-2's 0.5 beside curves at 0.55-0.8) stays on the axis."""
    from peftbench import plots

    cells = pd.DataFrame({"mean": [0.73, 0.77], "ci_low": [0.70, 0.74], "ci_high": [0.76, 0.80]})
    low, high = plots.y_span(cells, 0.0)
    assert 0.6 < low < 0.70 and 0.80 < high < 0.85
    near = pd.DataFrame({"mean": [0.57, 0.75], "ci_low": [0.55, 0.7], "ci_high": [0.6, 0.8]})
    assert plots.y_span(near, 0.5)[0] < 0.5
    assert plots.y_span(cells, None) == plots.y_span(cells, 0.0)
    one_seed = pd.DataFrame({"mean": [0.73, 0.77], "ci_low": [np.nan, np.nan], "ci_high": [np.nan, np.nan]})
    low, high = plots.y_span(one_seed, None)  # no interval: the means bound the axis
    assert low < 0.73 and 0.77 < high < 0.8

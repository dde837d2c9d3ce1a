"""The board's statistics against values computed independently: Friedman and Iman-Davenport
per budget over tasks (scipy + the formula), Wilcoxon with Holm by hand, the per-task intervals
with test-set error by hand, the hierarchical model against scipy's quadrature."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from peftbench.analysis import checks, ranks, statistics
from peftbench.analysis import frame as analysis_frame
from peftbench.rendering import report, styles, verdict
from peftbench.sweep import spec as sweep_spec


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


def _holm_by_hand(raw):
    order = np.argsort(raw)  # Holm: sorted p times (m - rank), running max, capped at 1
    m, adjusted, running = len(raw), np.empty_like(raw), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * raw[i]))
        adjusted[i] = running
    return adjusted


def _tasks_frame(rng, tasks=6):
    """`tasks` accuracy tasks (200 test rows), two budgets, 3 seeds; full FT at its natural count
    and a ChildTuning-F that overshoots every budget."""
    rows = []
    for t in range(tasks):
        for budget in ("0.001", "0.005"):
            for seed in range(3):
                for i, method in enumerate(["random", "sam", "fish", "fulltuning", "childtuning-f"]):
                    natural = method == "fulltuning"
                    rows.append({"task": f"t{t}", "method": method, "budget": "natural" if natural else budget,
                                 "seed": seed, "metric": 0.7 + 0.01 * i + rng.normal(0, 0.01),
                                 "trainable": 1000 if method in ("fulltuning", "childtuning-f") else float(budget) * 1000,
                                 "pretrained_entries": 1000, "metric_name": "accuracy", "test_rows": 200,
                                 "constant_metric": 0.5})
    return pd.DataFrame(rows).drop_duplicates(["task", "method", "budget", "seed"])


def test_friedman_runs_per_budget_over_tasks_with_iman_davenport_and_no_reference_rows():
    frame = _tasks_frame(np.random.default_rng(0))
    rankings = ranks.friedman_by_budget(frame)
    assert [r["budget"] for r in rankings] == ["0.001", "0.005"]
    for r in rankings:
        assert set(r["ranks"].index) == {"random", "sam", "fish"}  # no natural-count, no over-budget row
        matrix = frame[frame.budget == r["budget"]].groupby(["task", "method"]).metric.mean().unstack()[
            list(r["ranks"].index)]
        expected = scipy.stats.friedmanchisquare(*matrix.T.to_numpy())
        n, k = matrix.shape
        assert r["n_tasks"] == n == 6 and r["statistic"] == pytest.approx(expected.statistic)
        f = (n - 1) * expected.statistic / (n * (k - 1) - expected.statistic)  # Iman & Davenport 1980
        assert r["iman_davenport"] == pytest.approx(f)
        assert r["p_iman_davenport"] == pytest.approx(scipy.stats.f.sf(f, k - 1, (k - 1) * (n - 1)))
        assert not r["descriptive"]
        raw = np.array([scipy.stats.wilcoxon(matrix[a] - matrix[b]).pvalue
                        for a, b in itertools.combinations(matrix.columns, 2)])
        adjusted = _holm_by_hand(raw)
        got = r["pairwise"].loc[list(matrix.columns), list(matrix.columns)]
        for (a, b), p in zip(itertools.combinations(matrix.columns, 2), adjusted):
            assert got.loc[a, b] == pytest.approx(p)


@pytest.mark.slow
def test_with_fewer_than_five_tasks_the_ranking_is_descriptive_and_has_no_pairwise_tests():
    few = _tasks_frame(np.random.default_rng(0), tasks=2)
    assert all(r["descriptive"] and r["pairwise"] is None for r in ranks.friedman_by_budget(few))
    said = verdict.verdict(few)
    assert "descriptive only (fewer than 5 tasks)" in said and "over 2 task(s)" in said
    assert "natural count: fulltuning" in said and "over budget: childtuning-f at 0.1%" in said


@pytest.mark.slow
def test_comparisons_are_per_task_with_test_set_error_and_holm_within_each_family():
    from peftbench.analysis import uncertainty

    frame = _tasks_frame(np.random.default_rng(1), tasks=3)
    got = statistics.comparisons(frame)
    per_task = got[~got.task.str.startswith("across")]
    assert set(per_task.method) == {"sam", "fish", "random"}  # random itself against full FT
    assert "childtuning-f" not in set(got.method)  # over budget: not in a budget's family
    row = per_task[(per_task.budget == "0.005") & (per_task.against == "random") & (per_task.method == "sam")
                   & (per_task.task == "t1")].iloc[0]
    a = frame[(frame.task == "t1") & (frame.method == "sam") & (frame.budget == "0.005")].sort_values("seed").metric.to_numpy()
    b = frame[(frame.task == "t1") & (frame.method == "random") & (frame.budget == "0.005")].sort_values("seed").metric.to_numpy()
    d = a - b  # by hand: seed SE of the paired differences, binomial SE of each mean, Satterthwaite df
    se_seed, se_test = d.std(ddof=1) / np.sqrt(3), np.hypot(*(np.sqrt(m * (1 - m) / 200) for m in (a.mean(), b.mean())))
    total = np.hypot(se_seed, se_test)
    df = 2 * total ** 4 / se_seed ** 4
    assert row.difference == pytest.approx(100 * d.mean()) and row.se_test == pytest.approx(100 * se_test)
    assert row.p == pytest.approx(2 * scipy.stats.t.sf(abs(d.mean()) / total, df))
    assert row.ci_high - row.ci_low == pytest.approx(2 * 100 * scipy.stats.t.ppf(0.975, df) * total)
    family = per_task[(per_task.budget == "0.005") & (per_task.against == "random")]
    assert family.p_holm.to_numpy() == pytest.approx(_holm_by_hand(family.p.to_numpy()))
    across = got[got.task.str.startswith("across")]
    assert set(across.task) == {"across 3 task(s)"} and (across.draws == uncertainty.DRAWS).all()
    probs = across[["p_better", "p_equivalent", "p_worse"]].sum(axis=1)
    assert probs.to_numpy() == pytest.approx(1.0)


def test_cell_intervals_carry_the_test_set_as_well_as_the_seeds():
    frame = _tasks_frame(np.random.default_rng(2), tasks=1)
    stats = statistics.cell_stats(frame).set_index(["method", "budget"])
    row = stats.loc[("sam", "0.001")]
    values = frame[(frame.method == "sam") & (frame.budget == "0.001")].metric.to_numpy()
    total = np.hypot(values.std(ddof=1) / np.sqrt(3), np.sqrt(values.mean() * (1 - values.mean()) / 200))
    assert row.interval == "seeds + test (binomial)"
    assert row.ci_high - row.ci_low > 2 * 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / 200)
    assert row.ci_high - row.ci_low < 2 * scipy.stats.t.ppf(0.975, 2) * total + 1e-12
    unknown = frame.assign(metric_name="f1")  # no analytic test-set SE: said, seeds only
    assert set(statistics.cell_stats(unknown).interval) == {"seeds only"}


def test_a_correlation_interval_is_fishers_z_transformed_back():
    from peftbench.analysis import uncertainty

    values = np.array([0.80, 0.82, 0.81])
    got = uncertainty.cell_interval(values, 1500, "fisher-z")
    z = np.arctanh(values)
    total = np.hypot(z.std(ddof=1) / np.sqrt(3), 1 / np.sqrt(1497))
    df = 2 * total ** 4 / (z.std(ddof=1) / np.sqrt(3)) ** 4
    half = scipy.stats.t.ppf(0.975, df) * total
    assert (got["low"], got["high"]) == pytest.approx((np.tanh(z.mean() - half), np.tanh(z.mean() + half)))
    assert uncertainty.test_se_kind("pearson+spearman") == "fisher-z"
    assert uncertainty.test_se_kind("accuracy") == "binomial" and uncertainty.test_se_kind("accuracy+f1") is None


def test_hierarchical_posterior_equals_numerical_integration():
    """The grid posterior of tau and the draws of mu against scipy's quadrature of the same
    model (normal likelihood, flat mu, half-Cauchy(0, 1) tau)."""
    from scipy import integrate

    from peftbench.analysis import uncertainty

    y, s = np.array([2.0, -0.5, 1.2]), np.array([1.5, 1.4, 2.0])

    def joint(mu, tau):
        prior = 2 / (np.pi * (1 + tau ** 2))
        return prior * np.prod(scipy.stats.norm.pdf(y, mu, np.sqrt(s ** 2 + tau ** 2)))

    z, _ = integrate.dblquad(lambda mu, tau: joint(mu, tau), 0, np.inf, -30, 30)
    above, _ = integrate.dblquad(lambda mu, tau: joint(mu, tau), 0, np.inf, 1.0, 30)
    inside, _ = integrate.dblquad(lambda mu, tau: joint(mu, tau), 0, np.inf, -1.0, 1.0)
    got = uncertainty.hierarchical(y, s, rope=1.0, draws=200_000)
    assert got["p_better"] == pytest.approx(above / z, abs=0.006)
    assert got["p_equivalent"] == pytest.approx(inside / z, abs=0.006)
    mean_mu, _ = integrate.dblquad(lambda mu, tau: mu * joint(mu, tau), 0, np.inf, -30, 30)
    assert got["mu"] == pytest.approx(mean_mu / z, abs=0.02)
    assert uncertainty.hierarchical(y, s) == uncertainty.hierarchical(y, s)  # seeded draws


def test_the_budget_reaching_95_percent_of_full_ft_is_chance_normalised_bracketed_and_censored(tmp_path):
    from peftbench.rendering import plots

    def cells(method, budget, metric, trainable):
        return [{"task": "sst2", "method": method, "budget": budget, "seed": s, "metric": metric + 0.002 * s,
                 "trainable": trainable, "pretrained_entries": 1000, "constant_metric": 0.5, "test_rows": 872,
                 "metric_name": "accuracy"} for s in range(3)]

    rows = cells("fulltuning", "natural", 0.80, 1000)
    for budget, metric in (("0.001", 0.6), ("0.01", 0.7), ("0.1", 0.79)):
        rows += cells("random", budget, metric, float(budget) * 1000)
        rows += cells("sam", budget, 0.79, float(budget) * 1000)
    curves = statistics.budget_curves(pd.DataFrame(rows)).set_index("method")
    # target on the chance-normalised scale: 0.5 + 0.95 * (0.802 - 0.5) = 0.7869 (not 0.95 * 0.802)
    assert curves.loc["random", "target_x100"] == pytest.approx(100 * (0.5 + 0.95 * (0.802 - 0.5)))
    assert curves.loc["random", "reaches"] == "10%" and curves.loc["random", "surely"] == "> 10%"
    assert curves.loc["sam", "reaches"] == "<= 0.1%"  # censored at the smallest budget tried
    assert "area" not in curves.columns and "fulltuning" not in curves.index
    assert plots.curves_png(pd.DataFrame(rows), tmp_path / "curves.png").stat().st_size > 0


def test_best_per_budget_names_the_best_and_how_sure():
    frame = _tasks_frame(np.random.default_rng(0), tasks=2)
    best = statistics.best_per_budget(frame).set_index(["task", "budget"])
    assert len(best) == 4 and set(best.best) <= {"random", "sam", "fish"}  # full FT has no budget
    row = best.iloc[0]
    cells = frame[(frame.task == best.index[0][0]) & (frame.budget == best.index[0][1])
                  & (frame.method != "childtuning-f")]
    means = cells.groupby("method").metric.mean().sort_values(ascending=False)
    assert (row.best, row.runner_up) == tuple(means.index[:2])
    assert row.ci_low < row.difference < row.ci_high and 0 <= row.p_uncorrected <= 1
    assert row.over_budget.startswith("childtuning-f (1,000)")


def test_best_per_budget_leaves_out_a_method_whose_count_overshoots_the_budget():
    """ChildTuning-F's budget is a per-step share, yet a run moves every entry: at 0.1% it is
    not a 0.1% method, however well it scores. Within 1% of the budget still competes."""
    frame = _frame(np.random.default_rng(0)).assign(pretrained_entries=100_000)
    budgeted = frame[frame.budget != "natural"]
    redrawn = budgeted[budgeted.method == "random"].assign(method="childtuning-f", trainable=100_000,
                                                           metric=0.99)
    nearly = budgeted[budgeted.method == "sam"].assign(method="ggm", trainable=100.9, metric=0.98)
    best = statistics.best_per_budget(pd.concat([frame, redrawn, nearly])).set_index(["task", "budget"])
    assert set(best.best) == {"ggm"} and "childtuning-f" not in set(best.runner_up)
    assert set(best.loc[("sst2", "0.005")].over_budget.split("; ")) == {"childtuning-f (100,000)"}


def test_curves_axis_keeps_a_far_constant_predictor_out_of_the_way():
    """STS-B's constant predictor scores 0 while every curve sits near 0.7-0.8: the panel spans
    the methods' intervals and names the constant instead of squashing the curves onto a line;
    a constant within reach (SST-2's 0.5 beside curves at 0.55-0.8) stays on the axis."""

    cells = pd.DataFrame({"mean": [0.73, 0.77], "ci_low": [0.70, 0.74], "ci_high": [0.76, 0.80]})
    low, high = styles.y_span(cells, 0.0)
    assert 0.6 < low < 0.70 and 0.80 < high < 0.85
    near = pd.DataFrame({"mean": [0.57, 0.75], "ci_low": [0.55, 0.7], "ci_high": [0.6, 0.8]})
    assert styles.y_span(near, 0.5)[0] < 0.5
    assert styles.y_span(cells, None) == styles.y_span(cells, 0.0)
    one_seed = pd.DataFrame({"mean": [0.73, 0.77], "ci_low": [np.nan, np.nan], "ci_high": [np.nan, np.nan]})
    low, high = styles.y_span(one_seed, None)  # no interval: the means bound the axis
    assert low < 0.73 and 0.77 < high < 0.8


def test_the_paired_bootstrap_over_test_examples_against_independent_computations():
    from peftbench.analysis import uncertainty
    from peftbench.data import metrics

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    a = np.where(rng.random(400) < 0.8, y, 1 - y)  # 80% right
    b = np.where(rng.random(400) < 0.05, 1 - a, a)  # agrees with a on ~95% of the examples
    cell = lambda p: {"predictions": [int(v) for v in p], "labels": [int(v) for v in y], "num_classes": 2}  # noqa: E731
    one = uncertainty.bootstrap_test_se([cell(a)], None, ["accuracy"], draws=4000)
    acc = (a == y).mean()
    assert one == pytest.approx(np.sqrt(acc * (1 - acc) / 400), rel=0.1)  # binomial, by hand
    paired = uncertainty.bootstrap_test_se([cell(a)], [cell(b)], ["accuracy"], draws=4000)
    independent = np.hypot(*(np.sqrt(m * (1 - m) / 400) for m in ((a == y).mean(), (b == y).mean())))
    assert paired < independent / 2  # what both get right together cancels
    assert uncertainty.bootstrap_test_se([cell(a)], [cell(a)], ["accuracy"]) == 0
    found = uncertainty.mcnemar([cell(a), cell(b)], [cell(b), cell(a)])  # two seeds as strata
    a_only, b_only = int(((a == y) & (b != y)).sum()), int(((a != y) & (b == y)).sum())
    assert (found["a_only"], found["b_only"]) == (a_only + b_only, b_only + a_only)
    assert found["p"] == pytest.approx(scipy.stats.binomtest(a_only + b_only, 2 * (a_only + b_only)).pvalue)
    # the vectorised Pearson / Spearman path equals metrics.compute on the same resamples
    x, t = rng.normal(size=300), rng.normal(size=300)
    reg = {"predictions": list(x + t), "labels": list(t), "num_classes": None}
    idx = rng.integers(0, 300, size=(5, 300))
    fast = uncertainty._resampled_main(reg, ["pearson", "spearman"], idx)
    slow = [metrics.compute(["pearson", "spearman"], ["pearson", "spearman"], (x + t)[i], t[i])["main"] for i in idx]
    assert fast == pytest.approx(slow)



@pytest.mark.parametrize("values", [np.arange(40.0)[::-1], np.array([3, 1, 3, 2, 2, 3, 0, 1] * 5),
                                    np.round(np.random.default_rng(1).normal(size=60), 1)])
def test_resampled_ranks_equal_scipys_average_ranks_of_every_resample(values):
    """Spearman's ranks of every bootstrap resample at once (ties averaged), to the last bit."""
    from peftbench.analysis import uncertainty

    idx = np.random.default_rng(0).integers(0, len(values), size=(50, len(values)))
    assert np.array_equal(uncertainty.resampled_ranks(values, idx), scipy.stats.rankdata(values[idx], axis=1))


def test_the_bootstrap_scores_each_seed_once_and_never_reuses_another_predictions_draws(monkeypatch):
    """A report enters one seed in many comparisons: its resamples are computed once. A seed
    with other predictions (or labels) is computed afresh."""
    from peftbench.analysis import uncertainty

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    cell = lambda p: {"predictions": [int(v) for v in p], "labels": [int(v) for v in y], "num_classes": 2}  # noqa: E731
    a, b = cell(np.where(rng.random(200) < 0.2, 1 - y, y)), cell(np.where(rng.random(200) < 0.3, 1 - y, y))
    monkeypatch.setattr(uncertainty, "_RESAMPLED", {})
    calls = []
    real = uncertainty._resampled_main
    monkeypatch.setattr(uncertainty, "_resampled_main", lambda c, m, i: calls.append(1) or real(c, m, i))
    first = uncertainty.bootstrap_test_se([a], [b], ["accuracy"], draws=300)
    assert uncertainty.bootstrap_test_se([a], [b], ["accuracy"], draws=300) == first
    assert uncertainty.bootstrap_test_se([a], None, ["accuracy"], draws=300) > 0
    assert len(calls) == 2
    flipped = dict(a, predictions=[1 - v for v in a["predictions"]])
    assert uncertainty.bootstrap_test_se([flipped], [b], ["accuracy"], draws=300) != first
    assert len(calls) == 3
    monkeypatch.setattr(uncertainty, "_RESAMPLED", {})
    assert uncertainty.bootstrap_test_se([a], [b], ["accuracy"], draws=300) == first  # the cache changes no number

@pytest.mark.slow
@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_a_run_stores_its_test_predictions_and_the_report_bootstraps_them(tiny_model_dir, tmp_path, task):
    """End to end on real task data: each seed's result keeps its per-example test predictions,
    which reproduce its test metric; a report over such runs takes the test-set error from the
    paired bootstrap, not the analytic formula."""
    import json

    from peftbench.contract.settings import TrainConfig
    from peftbench.data import metrics
    from peftbench.data.tasks import load_task
    from peftbench.training.experiment import RunConfig, run_experiment

    for method in ("random", "magpruning"):
        config = RunConfig(method=method, task=task, budget="0.01", model=tiny_model_dir, limit=24, seeds=[0, 1],
                           train=TrainConfig(epochs=1, batch_size=8, max_length=32, lr=1e-2),
                           output_dir=str(tmp_path / "runs"))
        _, run_dir = run_experiment(config, progress=False)
    spec = load_task(task)
    result = json.loads((run_dir / "seed-1" / "result.json").read_text())
    kept = result["test_predictions"]
    again = metrics.compute(spec.main_metric, spec.main_metric, np.array(kept["predictions"], dtype=np.float32 if task == "stsb" else None),
                            np.array(kept["labels"], dtype=np.float32 if task == "stsb" else None), kept["num_classes"])["main"]
    assert again == pytest.approx(result["test"]["main"], abs=1e-6) and len(kept["labels"]) == result[
        "constant_predictor"]["test_rows"]
    frame = analysis_frame.load_runs([tmp_path / "runs"])
    assert set(statistics.cell_stats(frame).interval) == {"seeds + test (bootstrap)"}
    compared = statistics.comparisons(frame)
    assert set(compared.test_error.dropna()) == {"paired bootstrap"}
    per_task = compared[~compared.task.str.startswith("across")]
    assert per_task.mcnemar_p.notna().all() == (task == "rte")  # classification only
    assert not (tmp_path / "out").exists()
    report.build_report(frame, tmp_path / "out")
    assert "predictions" not in pd.read_csv(tmp_path / "out" / "results.csv").columns
    forgot = pd.read_csv(tmp_path / "out" / "forgetting.csv")  # every run measured what it forgets
    assert len(forgot) == 2 and (forgot.seeds == 2).all()


@pytest.mark.slow
def test_a_declared_comparison_family_is_used_and_said_and_an_unknown_reference_refused(tmp_path):
    from peftbench.core.errors import UsageError

    frame = _tasks_frame(np.random.default_rng(3), tasks=2).assign(run_dir=str(tmp_path / "none"), model="default",
                                                                   scoring_time_s=1.0, train_time_s=2.0)
    text = report.build_report(frame, tmp_path / "declared", against=["sam"])
    assert "Declared in this board's spec before it ran (`compare_against`)" in text
    compared = pd.read_csv(tmp_path / "declared" / "comparisons.csv")
    assert set(compared.against) == {"sam"}
    assert "Not declared in this board's spec" in report.build_report(frame, tmp_path / "default")
    with pytest.raises(UsageError, match="compare_against: 'lora' is not in 'methods'"):
        sweep_spec.parse_spec({"name": "x", "tasks": ["sst2"], "methods": {"random": {}}, "compare_against": ["lora"]})


def test_selection_checks_flag_a_concentrated_or_underspent_cell_but_not_a_proportional_one():
    """Full FT gives the tensors' sizes: the word embeddings are 52% of the model, so a
    per-tensor Random spending 52% there is proportion; 87% of a 0.1% budget in a pooler of
    0.65% is concentration; a method training a fifth of its budget is underspent."""
    sizes = {"bert.embeddings.word_embeddings.weight": 520, "bert.pooler.dense.weight": 7,
             "bert.encoder.layer.0.attention.self.query.weight": 473}

    def run(method, budget, spend):
        return {"task": "stsb", "method": method, "budget": budget, "seed": 0, "spend": spend,
                "trainable": sum(spend.values()), "pretrained_entries": 1000}

    frame = pd.DataFrame([
        run("fulltuning", "natural", sizes),
        run("random", "0.1", {"bert.embeddings.word_embeddings.weight": 52,
                              "bert.encoder.layer.0.attention.self.query.weight": 48}),
        run("fish", "0.1", {"bert.pooler.dense.weight": 7, "bert.encoder.layer.0.attention.self.query.weight": 1}),
        run("adapeft", "0.1", {"bert.encoder.layer.0.attention.self.query.weight": 20})])
    found = checks.selection_checks(frame).set_index(["method", "check"])
    assert set(found.index) == {("fish", "concentrated"), ("adapeft", "underspent"), ("fish", "underspent")}
    assert "bert.pooler.dense.weight holds 88%" in found.loc[("fish", "concentrated"), "detail"]
    said = verdict.verdict(frame.assign(metric=0.5, metric_name="pearson+spearman", test_rows=100,
                                       constant_metric=0.0))
    assert "1 cell(s) put more than half their selection in one tensor" in said and "stsb/fish/b0.1" in said


def test_selection_checks_name_the_seeds_that_underspend_when_the_mean_does_not():
    """AdaPEFT's spend depends on the seed: a cell whose mean keeps to half the budget can hold a
    seed that trained a third of it. The check names that seed; a cell whose every seed keeps to
    half is not flagged, and an underspent mean is flagged once, as `underspent`."""
    def run(method, seed, trained):
        return {"task": "stsb", "method": method, "budget": "0.1", "seed": seed, "pretrained_entries": 1000,
                "spend": {"bert.encoder.layer.0.attention.self.query.weight": trained}, "trainable": trained}

    frame = pd.DataFrame([run("adapeft", 0, 95), run("adapeft", 1, 30), run("adapeft", 2, 90),
                          run("ggm", 0, 100), run("ggm", 1, 50),
                          run("diffpruning", 0, 40), run("diffpruning", 1, 20)])
    found = checks.selection_checks(frame).set_index(["method", "check"])
    assert set(found.index) == {("adapeft", "underspent seeds"), ("diffpruning", "underspent")}
    assert found.loc[("adapeft", "underspent seeds"), "detail"] == (
        "1 of 3 seeds train less than 50% of the budget (seed 1: 30%); the mean is 72%")
    said = verdict.verdict(frame.assign(metric=0.5, metric_name="pearson+spearman", test_rows=100,
                                       constant_metric=0.0))
    assert "1 cell(s) keep to half their budget on average but not in every seed: stsb/adapeft/b0.1" in said


@pytest.mark.parametrize("classes, main", [(3, ["accuracy", "macro_f1"]), (3, ["mcc"]), (2, ["accuracy", "f1"]),
                                           (2, ["mcc"]), (2, ["macro_f1"])])
def test_the_bootstraps_confusion_metrics_equal_metrics_compute_on_every_resample(classes, main):
    """The vectorised accuracy / F1 / macro-F1 / MCC of the bootstrap against scikit-learn's,
    draw by draw, a draw holding a single class included."""
    import warnings

    from peftbench.analysis import uncertainty
    from peftbench.data import metrics

    rng = np.random.default_rng(classes)
    y = rng.integers(0, classes, 56)
    p = np.where(rng.random(56) < 0.6, y, rng.integers(0, classes, 56))
    cell = {"predictions": [int(v) for v in p], "labels": [int(v) for v in y], "num_classes": classes}
    idx = rng.integers(0, 56, size=(40, 56))
    idx[0] = np.where(y == 0)[0][0]  # one example, repeated: one class only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = [metrics.compute(main, main, p[i], y[i], classes)["main"] for i in idx]
    assert uncertainty._resampled_main(cell, main, idx) == pytest.approx(slow, abs=1e-12)


def test_health_flags_are_a_selection_check_and_an_exhausted_pool_is_not_ranked():
    """A seed whose run says it did not work as designed (DiffPruning projected from a
    collapsed model; GGM's pool exhausted) is listed as protocol-limited; a cell outside the
    method's design range (pool exhausted) is a reference row, not ranked."""
    from peftbench.analysis.statistics import competing, kept_budget

    def run(method, seed, health):
        return {"task": "stsb", "method": method, "budget": "0.02", "seed": seed, "spend": {},
                "trainable": 10, "pretrained_entries": 1000, "health": health}

    frame = pd.DataFrame([run("diffpruning", 0, []), run("diffpruning", 1, ["validation before step 75 at the "
                                                                            "constant predictor (0.01 <= 0.02)"]),
                          run("ggm", 0, ["pool exhausted (budget 20 > a third of the pool's 30 entries)"]),
                          run("ggm", 1, []), run("random", 0, []), run("random", 1, [])])
    found = checks.selection_checks(frame).set_index(["method", "check"])
    assert "1 of 2 seeds: seed 1: validation before step 75" in found.loc[("diffpruning", "protocol-limited"), "detail"]
    assert ("ggm", "protocol-limited") in found.index
    kept = kept_budget(frame)
    assert not kept[("stsb", "ggm", "0.02")] and kept[("stsb", "diffpruning", "0.02")]
    assert set(competing(frame, "0.02").method) == {"diffpruning", "random"}


def test_health_flags_of_a_run_record():
    """The run's own flags and a change of form reached from a model at the constant predictor."""
    from peftbench.training.record import RunRecord, health_flags

    record = RunRecord.model_construct(
        method_record={"flags": ["mask did not learn"]},
        phases=[{"step": 75, "validation_before": {"main": 0.01}, "validation_after": {"main": 0.2}}],
        constant_predictor=type("C", (), {"validation": {"main": 0.02}})())
    assert health_flags(record) == ["mask did not learn",
                                    "validation before step 75 at the constant predictor (0.010 <= 0.020)"]


def test_cell_stats_do_not_depend_on_the_order_the_cells_were_read_in():
    """The carry table's seed spread came out one digit apart on a fresh clone (cells read back
    in another order): a std summed in row order is not the same float in every order."""
    from peftbench.analysis.statistics import cell_stats

    rng = np.random.default_rng(0)
    rows = [{"task": "sst2", "method": "ggm", "budget": "0.001", "seed": s, "metric": m, "trainable": 10,
             "test_rows": 872, "metric_name": "accuracy"}
            for s, m in enumerate([0.7982, 0.7924, 0.7821, 0.7924, 0.7844])]
    frame = pd.DataFrame(rows)
    expected = cell_stats(frame)[["mean", "std"]].to_numpy()
    for _ in range(20):
        shuffled = frame.sample(frac=1, random_state=int(rng.integers(1 << 30)))
        assert (cell_stats(shuffled)[["mean", "std"]].to_numpy() == expected).all()

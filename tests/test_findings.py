"""Fu et al.'s findings tested on a board's runs (`peftbench.analysis.findings`): verdicts follow the
data, in either direction, and a shared full-FT reference is not counted as many samples."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from peftbench.analysis import findings


def runs(cells: dict[tuple[str, str, str], list[float]], test_rows: int = 1_000_000) -> pd.DataFrame:
    """{(task, method, budget): [metric per seed]} -> one row per run, as `analysis.frame.load_runs`."""
    return pd.DataFrame([{"task": t, "method": m, "budget": b, "seed": s, "metric": v, "trainable": 1,
                          "pretrained_entries": 1000, "metric_name": "accuracy", "test_rows": test_rows,
                          "constant_metric": 0.5}
                         for (t, m, b), values in cells.items() for s, v in enumerate(values)])


def test_sam_vs_random_is_a_paired_test_with_its_direction():
    rng = np.random.default_rng(0)
    base = rng.normal(0.8, 0.02, 8)
    sam = base + 0.01 + rng.normal(0, 0.002, 8)
    frame = runs({("sst2", "random", "0.005"): list(base), ("sst2", "sam", "0.005"): list(sam)})
    table = findings.sam_vs_random(frame)
    row = table[table.task == "sst2"].iloc[0]
    d = sam - base  # by hand: seed SE of the paired differences and both binomial test-set SEs
    total = np.hypot(d.std(ddof=1) / np.sqrt(8), np.hypot(*(np.sqrt(m * (1 - m) / 1e6) for m in (sam.mean(), base.mean()))))
    df = 7 * total ** 4 / (d.std(ddof=1) / np.sqrt(8)) ** 4
    assert row.p == pytest.approx(2 * scipy.stats.t.sf(abs(d.mean()) / total, df))
    assert row.difference == pytest.approx(np.mean(100 * d)) and row.verdict == "holds"
    assert row.ci_low < row.difference < row.ci_high
    # the same seeds scored on a 200-example test set: its error swamps a 1-point difference
    assert findings.sam_vs_random(runs({("sst2", "random", "0.005"): list(base), ("sst2", "sam", "0.005"): list(sam)},
                                       test_rows=200)).verdict.iloc[0] == "not resolved"
    # the same numbers swapped: significant against Fu et al.
    swapped = runs({("sst2", "random", "0.005"): list(sam), ("sst2", "sam", "0.005"): list(base)})
    assert findings.sam_vs_random(swapped).verdict.iloc[-1] == "opposite"
    # unpaired noise larger than the effect: not resolved
    noisy = runs({("sst2", "random", "0.005"): list(base), ("sst2", "sam", "0.005"): list(base[::-1] + 0.001)})
    assert findings.sam_vs_random(noisy).verdict.iloc[-1] == "not resolved"
    # only at the 0.5% budget, and nothing without both methods
    assert findings.sam_vs_random(frame.assign(budget="0.02")).empty
    assert findings.sam_vs_random(frame[frame.method == "sam"]).empty


def test_stability_holds_when_full_ft_is_clearly_noisier():
    rng = np.random.default_rng(1)
    cells = {("t", "fulltuning", "natural"): list(rng.normal(0.8, 0.05, 8))}
    for method in ("random", "sam", "magpruning"):
        cells[("t", method, "0.005")] = list(rng.normal(0.8, 0.005, 8))
    table, summary = findings.stability_vs_full(runs(cells))
    assert len(table) == 3 and (table.ratio < 0.3).all()
    assert summary["verdict"] == "holds on t (the only task)"
    assert summary["per_task"]["t"]["ci_high"] < 1 and summary["per_task"]["t"]["p"] < 0.05


def test_many_cells_sharing_one_noisy_full_ft_std_do_not_make_a_finding():
    """Full FT's spread comes from one of 3 seeds: its std is one noisy number. Thirty sparse
    cells below it are not thirty independent confirmations (a sign test over cells would say
    p ~ 2e-9); resampling full FT's seeds says it is not resolved."""
    rng = np.random.default_rng(2)
    cells = {("t", "fulltuning", "natural"): [0.5, 0.5, 0.8]}
    for i in range(30):
        cells[("t", f"m{i}", "0.005")] = list(rng.normal(0.7, 0.01, 3))
    table, summary = findings.stability_vs_full(runs(cells))
    assert summary["stabler"] == 30
    assert scipy.stats.binomtest(30, 30).pvalue < 1e-8
    assert summary["verdict"] == "not resolved (one task)" and summary["per_task"]["t"]["ci_high"] == np.inf


def test_stability_opposite_when_sparse_cells_are_noisier():
    rng = np.random.default_rng(3)
    cells = {(t, "fulltuning", "natural"): list(rng.normal(0.8, 0.002, 8)) for t in ("a", "b")}
    for t in ("a", "b"):
        for method in ("random", "sam"):
            cells[(t, method, "0.005")] = list(rng.normal(0.8, 0.05, 8))
    assert findings.stability_vs_full(runs(cells))[1]["verdict"] == "opposite on all 2 tasks"


def test_a_verdict_over_tasks_says_on_which_tasks_it_holds():
    assert findings.worded({"sst2": "not resolved", "stsb": "holds"}) == "holds on stsb only (1 of 2 tasks)"
    assert findings.worded({"a": "holds", "b": "opposite"}) == "mixed: holds on a, opposite on b (of 2 tasks)"
    assert findings.worded({"a": "not resolved", "b": "not resolved"}) == "not resolved on any of 2 tasks"


@pytest.mark.slow
def test_a_rank_correlation_that_rests_on_collapsing_runs_is_said_to():
    """Two methods whose seeds sometimes fall to the constant predictor are both the worst and
    the least stable: they alone make rho significant; without them it is not resolved."""
    rng = np.random.default_rng(5)
    cells = {}
    for t in ("a", "b", "c"):
        for k in range(6):
            cells[(t, f"m{k}", "0.005")] = list(0.8 + rng.normal(0, 0.01, 5))
        cells[(t, "x1", "0.005")] = [0.8, 0.79, 0.5, 0.81, 0.5]
        cells[(t, "x2", "0.005")] = [0.78, 0.5, 0.79, 0.5, 0.5]
    ranks = findings.rank_correlation(runs(cells)).iloc[0]
    assert ranks.cells == 24 and ranks.cells_without_collapsed == 18
    assert ranks.verdict == "holds" and ranks.verdict_without_collapsed == "not resolved"
    assert "rests on collapsing runs" in "\n".join(f["note"] for f in findings.sections(runs(cells)))


def test_rank_correlation_per_budget_and_the_published_rho_inside_or_not():
    # stabler methods are better on every task: rho = 1 on the ranks
    cells = {}
    for t in ("a", "b", "c"):
        for k, method in enumerate(("m1", "m2", "m3", "m4")):
            cells[(t, method, "0.005")] = [0.9 - 0.1 * k + d * (k + 1) * 0.01 for d in (-1, 0, 1)]
    ranks = findings.rank_correlation(runs(cells))
    row = ranks.iloc[0]
    assert row.budget == "0.005" and row.cells == 12 and row.spearman == 1.0
    assert row.verdict == "holds" and not row.contains_fu  # every resample gives rho = 1


def test_sections_name_each_finding_and_write_its_tables(tmp_path):
    from peftbench.rendering.sections import Section, markdown, write_all

    rng = np.random.default_rng(4)
    cells = {("t", m, "0.005"): list(rng.normal(0.8, 0.01, 5)) for m in ("random", "sam", "bitfit")}
    cells[("t", "fulltuning", "natural")] = list(rng.normal(0.8, 0.02, 5))
    sections = [Section(**fields) for fields in findings.sections(runs(cells))]
    write_all(sections, tmp_path)
    text = markdown(sections)
    assert "Does SAM beat Random at 0.5%?" in text and "more stable than full fine-tuning" in text
    assert "stability rank correlate" in text
    assert {p.name for p in tmp_path.iterdir()} == {"findings-sam-random.csv", "findings-stability.csv",
                                                    "findings-ranks.csv"}

"""Reports: Fu et al.'s Table 1 form, stability and rank correlations, significance, overlap.

Input is one DataFrame with a row per finished run (task, method, budget, seed, metric,
trainable, run_dir, ...), read from a sweep's study (`sweep.state.trials_frame`) or from run
directories (`analysis.frame.load_runs`). Conventions, as Fu et al. 2023 (their Table 1):
- metric = the task's main metric on test at the best-validation checkpoint, shown x100;
- std = population std over seeds (ddof=0);
- performance rank = rank of the mean, descending; stability rank = rank of the std,
  ascending (stabler = better); `ties="average"` by default, `"min"` reproduces Fu's brackets;
- AVG column = mean of the task means, +- the mean of the task stds.

`report_sections` computes every section (with `analysis`) and saves its CSV; `publish` writes
the same sections as the README (or report.md) and, when asked, as the page, for `peftbench
report` and every board alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from peftbench.analysis import findings
from peftbench.analysis.checks import (
    constant_cells,
    constant_scores,
    cost_table,
    forgetting_table,
    selection_checks,
)
from peftbench.analysis.overlap import (
    mask_overlap,
    mask_overlap_seeds,
    score_correlation,
    score_correlation_seeds,
)
from peftbench.analysis.published import compare_published, parse_published
from peftbench.analysis.ranks import MIN_RANK_CELLS, friedman_by_budget, stability_correlation, table1
from peftbench.analysis.statistics import (
    MIN_TASKS,
    best_per_budget,
    budget_rows,
    cell_stats,
    comparisons,
    competing,
    paired_tests,
)
from peftbench.rendering.sections import Section, write_all
from peftbench.rendering.verdict import DEFAULT_AGAINST, verdict
from peftbench.training.record import at_budget, budget_blocks


READING = (
    "Cells: test main metric x100 at the best-validation checkpoint, mean ± population "
    "std over seeds; [r] = rank in the column among the methods that keep to the budget "
    "(mean: higher is better; std: lower is better; ties: {ties}); reference rows "
    "(natural-count methods, and methods whose count overshoots the budget) carry no "
    "rank; AVG = mean of task means ± mean of task stds; † = worse than the column's best "
    "by a paired t-test over the seeds both ran, Holm-adjusted over the column (the best "
    "is picked after seeing the data: a mark, not a verdict; tests.csv); ≈ = within noise "
    "of the constant predictor (less than max(2 standard errors of the mean over seeds, "
    "1/sqrt(test rows)) above it: the cell did not measurably learn). The row 'constant "
    "predictor' is the train majority class (mean label for regression) scored on test. "
    "Units: every score and difference on this page is x100; probabilities are 0-1.")


def build_report(frame: pd.DataFrame, out_dir: str | Path, title: str = "peftbench report",
                 header: str = "", published: dict | None = None, cache_dir: str | Path | None = None,
                 ties: str = "average", markdown: str = "report.md",
                 known: dict[str, pd.DataFrame] | None = None, against: list[str] | None = None) -> str:
    """The report of `frame` in `out_dir`: its sections' CSVs and `markdown`; returns the Markdown."""
    sections = report_sections(frame, out_dir, published=published, cache_dir=cache_dir, ties=ties,
                               known=known, against=against)
    return publish(out_dir, title, header, sections, markdown)


def publish(folder: str | Path, title: str, header: str, sections: list[Section],
            markdown: str | None = "README.md", page: dict | None = None) -> str:
    """The one path from sections to what people read: `markdown` (the README or report.md;
    None: no file) and, with `page` (`pages.write_page`'s intro, meta, spec_text, extra_html,
    plotly_js), index.html, both from the same sections in the same order. Returns the Markdown."""
    from peftbench.rendering import pages
    from peftbench.rendering.sections import markdown as as_markdown

    folder = Path(folder)
    write_all(sections, folder)
    text = "\n".join([f"# {title}", "", *([header, ""] if header else []), as_markdown(sections)])
    if markdown:
        (folder / markdown).write_text(text)
    if page is not None:
        pages.write_page(folder, title, sections=sections, **page)
    return text


def report_sections(frame: pd.DataFrame, out_dir: str | Path, published: dict | None = None,
                    cache_dir: str | Path | None = None, ties: str = "average",
                    known: dict[str, pd.DataFrame] | None = None,
                    against: list[str] | None = None) -> list[Section]:
    """Every section of the report of `frame`, in reading order, with the data files beside
    them in `out_dir`: results.csv (one row per run), cells.csv, intervals.csv, tests.csv,
    verdict.md, and the per-seed rows behind the overlap and score correlations. `known`: per-seed
    overlap ("overlap") and score correlation ("scores") rows measured earlier, for cells whose
    masks or scores are not on this machine (`mask_overlap_seeds`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = frame.sort_values(["task", "method", "budget", "seed"])
    # the run folder's name, not its path on this machine (a board's runs/<name>/ holds it);
    # no trial number (a study-local id): the same cells give the same file on any machine
    frame.drop(columns=["spend", "trial", "predictions"], errors="ignore").assign(
        run_dir=[Path(p).name for p in frame.run_dir],
        **({"health": ["; ".join(h) if isinstance(h, list) else "" for h in frame.health]}
           if "health" in frame else {})).to_csv(out / "results.csv", index=False)
    stats = cell_stats(frame)
    stats.to_csv(out / "cells.csv", index=False)
    stats.assign(**{c: 100 * stats[c] for c in ("mean", "std", "ci_low", "ci_high", "se_test")})[
        ["task", "method", "budget", "seeds", "mean", "std", "ci_low", "ci_high", "se_test", "interval"]
    ].to_csv(out / "intervals.csv", index=False)  # x100, as every score shown
    compared = comparisons(frame, tuple(against) if against else DEFAULT_AGAINST)
    rankings = friedman_by_budget(frame)
    said = verdict(frame, rankings=rankings, compared=compared)
    (out / "verdict.md").write_text(said + "\n")
    sections = [Section("How to read the tables", note="\n\n".join(
                    [READING.format(ties=ties), *[f"Note: {n}" for n in frame.attrs.get("notes", [])]])),
                Section("Verdict", note=said)]
    failed = frame.attrs.get("failed", {})
    if failed:
        sections.append(Section(f"Failed cells ({len(failed)}), left out of every mean and rank",
                                note="\n".join(f"- {cell}: {reason}" for cell, reason in sorted(failed.items()))))
    tests_all = []
    blocks = budget_blocks(stats.budget)
    for stale in out.glob("table1-b*.csv"):  # a block these cells no longer have (natural, once alone)
        if stale.stem.removeprefix("table1-b") not in {*blocks, "published"}:
            stale.unlink()
    for budget in blocks:
        budget_sections, tests = _budget_sections(frame, stats, budget, ties)
        sections += budget_sections
        tests_all.append(tests.assign(budget=budget))
    pd.concat(tests_all).to_csv(out / "tests.csv", index=False)
    sections += _table_section(
        forgetting_table(frame), "forgetting.csv",
        "What each run forgets (representation retention on SICK-R TRIAL)",
        "`spearman`: Spearman x100 of the probe's 495 pairs (cosine of mean-pooled last hidden "
        "states against the gold relatedness); `next_token_loss` (a causal LM): held-out "
        "next-token loss in nats on the probe's sentences. After training, and the change from the "
        "pre-trained model's, mean ± std over seeds (`peftbench/training/forgetting.py`; cells written "
        "before runs measured it have none). A larger Spearman drop or loss rise: the selection "
        "moved the model further (forgetting.csv).")
    sections += _table_section(
        selection_checks(frame), "selection-checks.csv",
        "Cells that do not measure the method as budgeted (selection checks)",
        "From each seed's trained entries per tensor (the head apart), mean over seeds: "
        "'concentrated' = one tensor outside the repeated blocks holds more than half of the "
        "selection and more than twice its share of the model (the cell measures that tensor); "
        "'underspent' = the method trained less than half its budget (the cell measures a smaller "
        "budget than its column); 'underspent seeds' = the mean keeps to half the budget but the "
        "seeds named do not; 'protocol-limited' = seeds whose run says it did not work as "
        "designed (health flags). Read these cells' ranks with that in mind (selection-checks.csv).")
    sections += _ranking_sections(frame, out, rankings, compared, declared=against is not None)
    sections += _table_section(
        best_per_budget(frame), "best-per-budget.csv",
        "Which selection method is best at which budget",
        "Per (task, budget), among the methods that keep to the budget: the best by mean, the "
        "runner-up, their difference x100 paired by seed with a 95% interval carrying seed and "
        "test-set error, and its p (best-per-budget.csv). Both are picked after seeing the data: "
        "the p is uncorrected and optimistic. An interval that includes 0 means the data do not "
        "single out one method there. over_budget names a method whose mean trainable count "
        "exceeds the budget by more than 1% (with that count), left out: it did not compete there.")
    sections += [Section(**fields) for fields in findings.sections(frame)]
    sections.append(_cost_section(frame))
    if published:
        sections += _published_sections(stats, published)
    sections += _overlap_sections(frame, out, known.get("overlap") if known else None)
    if cache_dir is not None:
        sections += _score_sections(frame, cache_dir, out, known.get("scores") if known else None)
    return sections


def _table_section(table: pd.DataFrame, csv: str, title: str, note: str, level: int = 3) -> list[Section]:
    """One table's section, or none for an empty table."""
    return [] if table.empty else [Section(title, level=level, note=note, table=table, csv=csv, floatfmt=".3f")]


def _budget_sections(frame, stats, budget: str, ties: str) -> tuple[list[Section], pd.DataFrame]:
    """Fu et al.'s Table 1 at one budget (table1-b<budget>.csv): the methods that keep to the
    budget ranked, natural-count and over-budget methods as unranked reference rows; the
    paired tests against the column's best, the near-constant marks, the trainable count,
    the per-task intervals (seeds + test set) and the stability correlation."""
    constant = constant_scores(frame)
    rows = budget_rows(stats, budget)
    ranked = set(competing(frame, budget).method)
    tests = paired_tests(frame, rows[rows.method.isin(ranked)])
    table = table1(rows, ties=ties, ranked=ranked)
    if not tests.empty:
        table.worse = tests.pivot_table(index="method", columns="task", values="worse",
                                        aggfunc="any").reindex(table.mean.index).fillna(False)
    order = sorted(table.mean.index, key=lambda m: (m not in ranked, m))
    rendered = table.render().loc[order]
    stuck = set(constant_cells(frame, stats))
    for row in rows.itertuples():
        if f"{row.task}/{row.method}/b{row.budget}" in stuck:
            rendered.loc[row.method, row.task] += " ≈"
    counts = rows.groupby("method")["trainable"].mean().reindex(rendered.index)
    share = 100 * counts / frame.pretrained_entries.iloc[0]
    rendered["trainable"] = [f"{int(c):,} ({s:.3f}%)" for c, s in zip(counts, share)]
    rendered["row"] = ["ranked" if m in ranked else ("natural count" if m in set(frame.loc[frame.budget == "natural", "method"])
                       else "over budget") for m in rendered.index]
    rendered.loc["constant predictor"] = {
        **{t: f"{100 * constant.loc[t, 'metric']:.2f}" if t in constant.index else "-"
           for t in rendered.columns}, "trainable": "0", "row": "reference"}
    ranked_table = table1(rows[rows.method.isin(ranked)], ties=ties)
    corr = stability_correlation(ranked_table)
    per_cell = at_budget(frame, budget).groupby(["task", "method"]).seed.nunique()
    seeds = (f"{per_cell.min()} seeds" if per_cell.min() == per_cell.max()
             else f"{per_cell.min()}-{per_cell.max()} seeds per cell")
    intervals = rows.assign(**{c: 100 * rows[c] for c in ("mean", "ci_low", "ci_high", "se_test")})[
        ["task", "method", "seeds", "mean", "ci_low", "ci_high", "se_test", "interval"]]
    correlation = (
        f"Stability vs performance among the ranked methods (Fu et al. Fig. 2): Spearman rho = "
        f"{corr['spearman']:.4f} (p = {corr['spearman_p']:.3g}), Kendall tau = {corr['kendall']:.4f} "
        f"(p = {corr['kendall_p']:.3g}) over n = {corr['n']} (method, task) cells; the cells of a "
        "task share its seeds and test set, so n overstates the independent evidence."
        if np.isfinite(corr["spearman"]) else
        f"Stability vs performance among the ranked methods (Fu et al. Fig. 2): not computed over "
        f"n = {corr['n']} (method, task) cells (fewer than {MIN_RANK_CELLS}, where a rank "
        "correlation cannot reach p < 0.05, or a constant rank).")
    return [Section(f"Budget {budget} ({len(ranked)} methods ranked; reference rows unranked), {seeds}",
                    table=rendered.rename_axis("method"), index=True, csv=f"table1-b{budget}.csv",
                    after=correlation),
            Section(f"Per-task 95% intervals of each mean, budget {budget} (x100)", level=3,
                    note="Seed error and test-set error together (`interval` says which: a bootstrap "
                         "over the test examples where every seed stored its predictions, else "
                         "analytic, binomial for accuracy and Fisher's z for correlations).",
                    table=intervals, floatfmt=".2f")], tests


def _ranking_sections(frame, out: Path, rankings: list[dict], compared: pd.DataFrame,
                      declared: bool) -> list[Section]:
    """Per budget: Friedman over the tasks with Iman-Davenport's F (descriptive below
    MIN_TASKS tasks; pairwise Wilcoxon-Holm over tasks only from MIN_TASKS up); then the
    pre-declared comparisons against Random and full fine-tuning (comparisons.csv)."""
    sections = []
    for stale in out.glob("wilcoxon-holm*.csv"):  # this section's files: none left from other evidence
        stale.unlink()
    if rankings:
        table = pd.DataFrame([{"budget": r["budget"], "tasks": r["n_tasks"], "methods": r["n_methods"],
                               "chi2": r["statistic"], "p": r["p"], "iman_davenport_F": r["iman_davenport"],
                               "p_F": r["p_iman_davenport"],
                               "reading": "descriptive" if r["descriptive"] else "test"} for r in rankings])
        ranks = pd.DataFrame({r["budget"]: r["ranks"] for r in rankings})
        ranks.index.name = "method"
        sections += [
            Section("Ranking per budget (Friedman over tasks; Iman-Davenport)", table=table, csv="friedman.csv",
                    note="Blocks are the tasks, the independent units; each method's value in a task is "
                         "its mean over seeds (seeds are repeated measurements inside a task, never "
                         "blocks). Only the methods that keep to the budget take part. With fewer than "
                         f"{MIN_TASKS} tasks the test and the mean ranks only describe: no pairwise "
                         "verdict and no critical-difference diagram are drawn (Demsar 2006). Equal "
                         "mean ranks are ties (ranks.csv)."),
            Section("Mean rank over the tasks at each budget", level=3, table=ranks.sort_values(ranks.columns[0]),
                    data=ranks, index=True, csv="ranks.csv", floatfmt=".2f",
                    note="1 = best; blank: not competing there.")]
        for r in rankings:
            if r["pairwise"] is not None:
                r["pairwise"].to_csv(out / f"wilcoxon-holm-b{r['budget']}.csv")
    if compared.empty:
        return sections
    per_task = compared[~compared.task.str.startswith("across")]
    across = compared[compared.task.str.startswith("across")]
    sections.append(Section(
        "Against " + " and ".join(dict.fromkeys(compared.against)) + " (the pre-declared comparison families)",
        note=("Declared in this board's spec before it ran (`compare_against`): "
              if declared else "Not declared in this board's spec: peftbench's default family, "
              "fixed before any board ran: ")
        + "at each budget, each method that keeps to it against each reference (a budgeted "
        "reference at the same budget, a natural-count one at its count). Per task: the "
        "difference x100 paired by seed, a 95% interval carrying seed error and test-set error "
        "(`test_error`: a paired bootstrap over the test examples where every seed stored its "
        "predictions; else analytic, treating the two methods' errors as independent, which "
        "is conservative), p, and p Holm-adjusted within the family (one budget, one "
        "reference).",
        table=per_task[["budget", "against", "method", "task", "seeds", "difference", "ci_low", "ci_high",
                        "se_seed", "se_test", "test_error", "p", "p_holm", "mcnemar_p"]],
        data=compared, csv="comparisons.csv",
        after="mcnemar_p (accuracy tasks whose seeds stored their predictions): McNemar's exact test "
              "on the test examples the two classify differently, summed over the paired seeds: "
              "test-set evidence alone, uncorrected (empty where predictions were not stored)."))
    if not across.empty:
        h = across.iloc[0]
        sections.append(Section(
            "Across tasks (hierarchical model)", level=3,
            note="A hierarchical model with the tasks as units (per-task differences "
                 "standardised by the task's test-set SE of the reference; delta_task ~ N(mu, tau^2), "
                 "mu flat, tau half-Cauchy(0, 1); `peftbench/analysis/uncertainty.py`). P(better / "
                 "equivalent / worse) for mu, the mean effect, and for a new task, with the region of "
                 f"practical equivalence = {h.rope:g} test-set SE of the task; mu in those units with its "
                 f"95% interval. Monte-Carlo: {int(h.draws):,} draws from seed {int(h.seed)}.",
            table=across[["budget", "against", "method", "task", "mu", "mu_low", "mu_high", "p_better",
                          "p_equivalent", "p_worse", "new_task_better", "new_task_worse"]]))
    return sections


def _cost_section(frame) -> Section:
    return Section("Cost per run", table=cost_table(frame), index=True, csv="cost.csv", floatfmt=".1f",
                   note="Mean seconds of scoring and of training (evaluation included) per run, "
                        "training steps per second, and the largest peak memory of a run (MiB; peak "
                        "RSS on CPU, max allocated on CUDA; scoring or training, whichever is larger), "
                        "and the machine's mean 1-minute load average around the runs (timings taken "
                        "at a load above the machine's cores are slower than a quiet machine's); a "
                        "row per method, task and device, with its number of runs, where the runs "
                        "came from several tasks or devices (a step's cost depends on both).")


def _published_sections(stats, published: dict) -> list[Section]:
    theirs = parse_published(published)
    both, taus = compare_published(stats, theirs)
    both = both.assign(**{c: 100 * both[c] for c in ("mean", "std", "mean_published", "difference") if c in both})
    return [Section("Against the published numbers", csv="published.csv", data=both,
                    note="Each of our budgets against the published column separately (never pooled), x100.",
                    table=both[["compared_at", "task", "method", "budget", "mean", "mean_published",
                                "difference"]].set_index(["compared_at", "task", "method"]),
                    index=True, floatfmt=".4f"),
            Section("Kendall's tau between our ranking and theirs", level=3,
                    note="Per task and budget (n = methods).", table=taus.set_index(["task", "budget"]),
                    index=True, floatfmt=".4f")]


def _overlap_sections(frame, out: Path, known) -> list[Section]:
    overlap_seeds = mask_overlap_seeds(frame, known=known)
    overlap_seeds.to_csv(out / "overlap-seeds.csv", index=False)
    overlap = mask_overlap(overlap_seeds)
    overlap.to_csv(out / "overlap.csv", index=False)
    if overlap.empty:
        return []
    sections = [Section("Do methods pick the same entries? (Jaccard of the masks, mean over seeds)",
                        note="Per task, budget and pair of methods; natural-count methods at their own "
                             "count (overlap.csv, and each seed's in overlap-seeds.csv).")]
    for (task, budget), g in overlap.groupby(["task", "budget"]):
        both = pd.concat([g, g.rename(columns={"method_a": "method_b", "method_b": "method_a"})])
        matrix = both.pivot(index="method_a", columns="method_b", values="jaccard")
        for m in matrix.index:
            matrix.loc[m, m] = 1.0
        sections.append(Section(f"{task}, budget {budget}", level=3, table=matrix, index=True, floatfmt=".3f"))
    return sections


def _score_sections(frame, cache_dir, out: Path, known) -> list[Section]:
    seeds = score_correlation_seeds(frame, cache_dir, known=known)
    seeds.to_csv(out / "score-correlation-seeds.csv", index=False)
    corr_scores = score_correlation(seeds)
    corr_scores.to_csv(out / "score-correlation.csv", index=False)
    if corr_scores.empty:
        return []
    return [Section("Rank correlation of importance scores (same sampled entries)",
                    note="Spearman and Kendall between two methods' scores, mean over seeds "
                         "(score-correlation.csv).",
                    table=corr_scores, floatfmt=("", "", "", ".4f", ".4f", ".0f", ".0f"))]

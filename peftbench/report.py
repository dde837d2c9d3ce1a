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
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch

from peftbench import findings
from peftbench.errors import UsageError
from peftbench.record import RunRecord, analysis_row, at_budget, budget_blocks, budget_label, read_json
from peftbench.safeload import load_pt
from peftbench.statistics import (  # noqa: F401  (re-exported: report.cell_stats etc.)
    EXACT_UP_TO,
    MIN_RANK_CELLS,
    MIN_TASKS,
    TIES,
    Table1,
    best_per_budget,
    bootstrap_ci,
    budget_curves,
    budget_rows,
    cell_stats,
    comparisons,
    competing,
    constant_cells,
    constant_scores,
    cost_table,
    friedman_by_budget,
    holm,
    kept_budget,
    paired_test,
    forgetting_table,
    paired_tests,
    selection_checks,
    spearman,
    stability_correlation,
    table1,
    wilcoxon_holm)


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
    from peftbench.experiment import INCOMPLETE

    rows, failed, notes = [], {}, []
    incomplete = sorted(str(p.parent) for f in folders for p in Path(f).glob(f"**/{INCOMPLETE}"))
    for folder in folders:
        for result_file in sorted(Path(folder).glob("**/seed-*/result.json")):
            run_dir = result_file.parent.parent
            if str(run_dir) in incomplete:
                continue
            config = read_json(run_dir / "config.json")
            record = RunRecord.read(result_file)  # checked, one line if not
            task = Path(config["task"]).stem
            budget = budget_label(config["method"], config["budget"])
            if record.diverged is not None:
                d = record.diverged
                failed[f"{task}/{config['method']}/b{budget}/s{record.seed}"] = \
                    f"diverged at step {d.step} (loss {d.loss})"
                continue
            rows.append({**analysis_row(record, task=task, method=config["method"], budget=budget,
                                        model=config.get("model", ""),
                                        metric_name=_metric_name(config["task"]), run_dir=str(run_dir)),
                         "written": result_file.stat().st_mtime,
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
    budgets = budget_blocks(frame.budget)
    groups = [((task, budget), at_budget(frame[frame.task == task], budget))
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
    budgets = budget_blocks(stats.budget)
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


DEFAULT_AGAINST = ("random", "fulltuning")


def _pct(budget: str) -> str:
    return f"{100 * float(budget):g}%"


def verdict(frame: pd.DataFrame, rankings: list[dict] | None = None, compared: pd.DataFrame | None = None,
            alpha: float = 0.05) -> str:
    """One paragraph a reader can quote, written from the statistics at the strength they
    support: per budget, Friedman over the tasks (descriptive below MIN_TASKS tasks); the
    pre-declared comparisons against Random and full fine-tuning, per task (Holm within each
    budget's family) and across tasks (hierarchical); the reference rows that are never
    ranked; the cells at the constant predictor."""
    rankings = rankings if rankings is not None else friedman_by_budget(frame)
    compared = compared if compared is not None else comparisons(frame)
    parts = []
    natural = sorted(set(frame.loc[frame.budget == "natural", "method"]))
    kept = kept_budget(frame)
    over = sorted({f"{m} at {_pct(b)}" for (t, m, b), ok in kept.items() if not ok})
    if natural or over:
        parts.append("Reference rows, never ranked in a budget: "
                     + "; ".join(filter(None, [f"natural count: {', '.join(natural)}" if natural else "",
                                               f"over budget: {', '.join(over)}" if over else ""])) + ".")
    for r in rankings:
        head = (f"At {_pct(r['budget'])}, Friedman over {r['n_tasks']} task(s) (the independent units) and "
                f"{r['n_methods']} methods: chi2 = {r['statistic']:.2f}, p = {r['p']:.2g}; Iman-Davenport "
                f"F = {r['iman_davenport']:.2f}, p = {r['p_iman_davenport']:.2g}")
        if r["descriptive"]:
            head += (f": descriptive only (fewer than {MIN_TASKS} tasks), no ranking of pairs is "
                     f"claimed; best mean rank {_ties(r['ranks'])}.")
        else:
            head += (": the mean ranks " + ("differ" if r["p_iman_davenport"] < alpha else "do not differ")
                     + f" at {alpha}; best mean rank {_ties(r['ranks'])}.")
        parts.append(head)
    if not compared.empty:
        per_task = compared[compared.task.str.startswith("across") == False]  # noqa: E712
        across = compared[compared.task.str.startswith("across")]
        for reference in dict.fromkeys(per_task.against):
            fam = per_task[per_task.against == reference]
            above = fam[(fam.p_holm < alpha) & (fam.difference > 0)]
            below = fam[(fam.p_holm < alpha) & (fam.difference < 0)]
            text = (f"Against {reference} ({len(fam)} per-task comparisons, seed and test-set error, "
                    f"Holm within each budget): ")
            text += (f"{len(above)} above ({_list(above)}), {len(below)} below ({_list(below)}); "
                     f"the other {len(fam) - len(above) - len(below)} are not resolved.")
            h = across[across.against == reference]
            if not h.empty:
                sure_better = h[h.p_better >= 0.95]
                sure_worse = h[h.p_worse >= 0.95]
                tasks = int(h.tasks.max())
                text += (f" Across the {tasks} task(s) (hierarchical model, ROPE one test-set SE): "
                         f"P(better) >= 0.95 for {_list(sure_better, task=False)}; P(worse) >= 0.95 for "
                         f"{_list(sure_worse, task=False)}"
                         + ("; with so few tasks the mean effect across tasks is weakly identified."
                            if tasks < MIN_TASKS else "."))
            parts.append(text)
    checks = selection_checks(frame)
    for check, what in (("concentrated", "put more than half their selection in one tensor outside the repeated "
                                          "blocks (they measure that tensor)"),
                         ("underspent", "trained less than half their budget")):
        found = checks[checks.check == check] if not checks.empty else checks
        if not found.empty:
            parts.append(f"{len(found)} cell(s) {what}: " + ", ".join(
                f"{r.task}/{r.method}/b{r.budget}" for r in found.itertuples()) + ".")
    stuck = constant_cells(frame)
    parts.append(f"{len(stuck)} cell(s) are within noise of the constant predictor (did not measurably "
                 f"learn; their order among themselves is noise): {', '.join(stuck[:12])}"
                 f"{' ...' if len(stuck) > 12 else ''}." if stuck else
                 "No cell is within noise of the constant predictor.")
    return " ".join(parts)


def _ties(ranks: pd.Series) -> str:
    """'a (1.50)' or, when several share the best mean rank, 'a, b (tied, 1.50)'."""
    best = ranks[np.isclose(ranks, ranks.iloc[0])]
    return (f"{best.index[0]} ({best.iloc[0]:.2f})" if len(best) == 1
            else f"{', '.join(best.index)} (tied, {best.iloc[0]:.2f})")


def _list(rows: pd.DataFrame, task: bool = True, most: int = 12) -> str:
    if rows.empty:
        return "none"
    names = [f"{r.method} {_pct(r.budget)}" + (f" {r.task}" if task else "") for r in rows.itertuples()]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


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
                 known: dict[str, pd.DataFrame] | None = None, against: list[str] | None = None) -> str:
    """Write results.csv (one row per run), cells.csv, table1-b<budget>.csv, tests.csv,
    overlap.csv, score-correlation.csv (and their per-seed rows), published.csv and `markdown`
    into `out_dir`; return the Markdown. `known`: per-seed overlap ("overlap") and score
    correlation ("scores") rows measured earlier, for cells whose masks or scores are not on
    this machine (`mask_overlap_seeds`). Each section below computes with `statistics` and
    writes its CSV; this function only puts them in order."""
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
    ].to_csv(out / "intervals.csv", index=False)  # the page's table, x100 as every score shown
    compared = comparisons(frame, tuple(against) if against else DEFAULT_AGAINST)
    rankings = friedman_by_budget(frame)
    lines = _opening_section(frame, out, title, header, ties, compared, rankings)
    tests_all = []
    for budget in budget_blocks(stats.budget):
        section, tests = _budget_section(frame, stats, budget, ties, out)
        lines += section
        tests_all.append(tests.assign(budget=budget))
    pd.concat(tests_all).to_csv(out / "tests.csv", index=False)
    lines += table_section(
        out / "forgetting.csv", forgetting_table(frame),
        "### What each run forgets (representation retention on SICK-R TRIAL)",
        "`spearman`: Spearman x100 of the probe's 495 pairs (cosine of mean-pooled last hidden "
        "states against the gold relatedness); `next_token_loss` (a causal LM): held-out "
        "next-token loss in nats on the probe's sentences. After training, and the change from the "
        "pre-trained model's, mean ± std over seeds (`peftbench/forgetting.py`; cells written "
        "before runs measured it have none). A larger Spearman drop or loss rise: the selection "
        "moved the model further (forgetting.csv).")
    lines += table_section(
        out / "selection-checks.csv", selection_checks(frame),
        "### Cells that do not measure the method as budgeted (selection checks)",
        "From each seed's trained entries per tensor (the head apart), mean over seeds: "
        "'concentrated' = one tensor outside the repeated blocks holds more than half of the "
        "selection and more than twice its share of the model (the cell measures that tensor); "
        "'underspent' = the method trained less than half its budget (the cell measures a smaller "
        "budget than its column). Read these cells' ranks with that in mind (selection-checks.csv).")
    lines += _ranking_section(frame, out, rankings, compared, declared=against is not None)
    lines += table_section(
        out / "best-per-budget.csv", best_per_budget(frame),
        "### Which selection method is best at which budget",
        "Per (task, budget), among the methods that keep to the budget: the best by mean, the "
        "runner-up, their difference x100 paired by seed with a 95% interval carrying seed and "
        "test-set error, and its p (best-per-budget.csv). Both are picked after seeing the data: "
        "the p is uncorrected and optimistic. An interval that includes 0 means the data do not "
        "single out one method there. over_budget names a method whose mean trainable count "
        "exceeds the budget by more than 1% (with that count), left out: it did not compete there.")
    lines += findings.section(frame, out)
    lines += _cost_section(frame, out)
    if published:
        lines += _published_section(stats, published, out)
    lines += _overlap_section(frame, out, known.get("overlap") if known else None)
    if cache_dir is not None:
        lines += _score_section(frame, cache_dir, out, known.get("scores") if known else None)
    text = "\n".join(lines)
    (out / markdown).write_text(text)
    return text


def _opening_section(frame, out: Path, title: str, header: str, ties: str, compared: pd.DataFrame,
                     rankings: list[dict]) -> list[str]:
    """Title, how to read the tables, notes, the verdict (verdict.md) and the failed cells."""
    lines = [f"# {title}", "", header, ""] if header else [f"# {title}", ""]
    lines += ["Cells: test main metric x100 at the best-validation checkpoint, mean ± population "
              "std over seeds; [r] = rank in the column among the methods that keep to the budget "
              f"(mean: higher is better; std: lower is better; ties: {ties}); reference rows "
              "(natural-count methods, and methods whose count overshoots the budget) carry no "
              "rank; AVG = mean of task means ± mean of task stds; † = worse than the column's best "
              "by a paired t-test over the seeds both ran, Holm-adjusted over the column (the best "
              "is picked after seeing the data: a mark, not a verdict; tests.csv); ≈ = within noise "
              "of the constant predictor (less than max(2 standard errors of the mean over seeds, "
              "1/sqrt(test rows)) above it: the cell did not measurably learn). The row 'constant "
              "predictor' is the train majority class (mean label for regression) scored on test. "
              "Units: every score and difference on this page is x100; probabilities are 0-1.", ""]
    lines += [f"Note: {note}" for note in frame.attrs.get("notes", [])]
    said = verdict(frame, rankings=rankings, compared=compared)
    (out / "verdict.md").write_text(said + "\n")
    lines += ["", "**Verdict.** " + said, ""]
    failed = frame.attrs.get("failed", {})
    if failed:
        lines += ["", f"Failed cells ({len(failed)}), left out of every mean and rank:", ""]
        lines += [f"- {cell}: {reason}" for cell, reason in sorted(failed.items())]
    return lines + [""]


def _budget_section(frame, stats, budget: str, ties: str, out: Path) -> tuple[list[str], pd.DataFrame]:
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
    rendered.to_csv(out / f"table1-b{budget}.csv")
    ranked_table = table1(rows[rows.method.isin(ranked)], ties=ties)
    corr = stability_correlation(ranked_table)
    per_cell = at_budget(frame, budget).groupby(["task", "method"]).seed.nunique()
    seeds = (f"{per_cell.min()} seeds" if per_cell.min() == per_cell.max()
             else f"{per_cell.min()}-{per_cell.max()} seeds per cell")
    intervals = rows.assign(**{c: 100 * rows[c] for c in ("mean", "ci_low", "ci_high", "se_test")})[
        ["task", "method", "seeds", "mean", "ci_low", "ci_high", "se_test", "interval"]]
    return [f"## Budget {budget} ({len(ranked)} methods ranked; reference rows unranked), {seeds}", "",
            rendered.to_markdown(), "",
            (f"Stability vs performance among the ranked methods (Fu et al. Fig. 2): Spearman rho = "
             f"{corr['spearman']:.4f} (p = {corr['spearman_p']:.3g}), Kendall tau = {corr['kendall']:.4f} "
             f"(p = {corr['kendall_p']:.3g}) over n = {corr['n']} (method, task) cells; the cells of a "
             "task share its seeds and test set, so n overstates the independent evidence."
             if np.isfinite(corr["spearman"]) else
             f"Stability vs performance among the ranked methods (Fu et al. Fig. 2): not computed over "
             f"n = {corr['n']} (method, task) cells (fewer than {MIN_RANK_CELLS}, where a rank "
             "correlation cannot reach p < 0.05, or a constant rank)."), "",
            "Per-task 95% intervals of each mean (x100): seed error and test-set error together "
            "(`interval` says which: a bootstrap over the test examples where every seed stored its "
            "predictions, else analytic, binomial for accuracy and Fisher's z for correlations):", "",
            intervals.to_markdown(index=False, floatfmt=".2f"), ""], tests


def _ranking_section(frame, out: Path, rankings: list[dict], compared: pd.DataFrame, declared: bool) -> list[str]:
    """Per budget: Friedman over the tasks with Iman-Davenport's F (descriptive below
    MIN_TASKS tasks; pairwise Wilcoxon-Holm over tasks only from MIN_TASKS up); then the
    pre-declared comparisons against Random and full fine-tuning (comparisons.csv)."""
    lines = []
    for stale in out.glob("wilcoxon-holm*.csv"):  # this section's files: none left from other evidence
        stale.unlink()
    if rankings:
        lines += ["## Ranking per budget (Friedman over tasks; Iman-Davenport)", "",
                  "Blocks are the tasks, the independent units; each method's value in a task is its "
                  "mean over seeds (seeds are repeated measurements inside a task, never blocks). Only "
                  "the methods that keep to the budget take part. With fewer than "
                  f"{MIN_TASKS} tasks the test and the mean ranks only describe: no pairwise verdict "
                  "and no critical-difference diagram are drawn (Demsar 2006). Equal mean ranks are "
                  "ties (ranks.csv).", ""]
        table = pd.DataFrame([{"budget": r["budget"], "tasks": r["n_tasks"], "methods": r["n_methods"],
                               "chi2": r["statistic"], "p": r["p"], "iman_davenport_F": r["iman_davenport"],
                               "p_F": r["p_iman_davenport"],
                               "reading": "descriptive" if r["descriptive"] else "test"} for r in rankings])
        table.to_csv(out / "friedman.csv", index=False)
        lines += [table.to_markdown(index=False, floatfmt=".3g"), ""]
        ranks = pd.DataFrame({r["budget"]: r["ranks"] for r in rankings})
        ranks.index.name = "method"
        ranks.to_csv(out / "ranks.csv")
        lines += ["Mean rank over the tasks at each budget (1 = best; blank: not competing there):", "",
                  ranks.sort_values(ranks.columns[0]).to_markdown(floatfmt=".2f"), ""]
        for r in rankings:
            if r["pairwise"] is not None:
                r["pairwise"].to_csv(out / f"wilcoxon-holm-b{r['budget']}.csv")
    if compared.empty:
        return lines
    compared.to_csv(out / "comparisons.csv", index=False)
    per_task = compared[~compared.task.str.startswith("across")]
    across = compared[compared.task.str.startswith("across")]
    lines += ["## Against " + " and ".join(dict.fromkeys(compared.against)) + " (the pre-declared comparison families)", "",
              ("Declared in this board's spec before it ran (`compare_against`): "
                 if declared else "Not declared in this board's spec: peftbench's default family, "
                 "fixed before any board ran: ")
              + "at each budget, each method that keeps to it against each reference (a budgeted "
              "reference at the same budget, a natural-count one at its count). Per task: the "
              "difference x100 paired by seed, a 95% interval carrying seed error and test-set error "
              "(`test_error`: a paired bootstrap over the test examples where every seed stored its "
              "predictions; else analytic, treating the two methods' errors as independent, which "
              "is conservative), p, and p Holm-adjusted within the family (one budget, one "
              "reference).", "",
              per_task[["budget", "against", "method", "task", "seeds", "difference", "ci_low", "ci_high",
                        "se_seed", "se_test", "test_error", "p", "p_holm", "mcnemar_p"]].to_markdown(
                  index=False, floatfmt=".3g"), "",
              "mcnemar_p (accuracy tasks whose seeds stored their predictions): McNemar's exact test "
              "on the test examples the two classify differently, summed over the paired seeds: "
              "test-set evidence alone, uncorrected (empty where predictions were not stored).", ""]
    if not across.empty:
        h = across.iloc[0]
        lines += ["Across tasks: a hierarchical model with the tasks as units (per-task differences "
                  "standardised by the task's test-set SE of the reference; delta_task ~ N(mu, tau^2), "
                  "mu flat, tau half-Cauchy(0, 1); `peftbench/uncertainty.py`). P(better / equivalent / "
                  "worse) for mu, the mean effect, and for a new task, with the region of practical "
                  f"equivalence = {h.rope:g} test-set SE of the task; mu in those units with its 95% "
                  f"interval. Monte-Carlo: {int(h.draws):,} draws from seed {int(h.seed)}.", "",
                  across[["budget", "against", "method", "task", "mu", "mu_low", "mu_high", "p_better",
                          "p_equivalent", "p_worse", "new_task_better", "new_task_worse"]].to_markdown(
                      index=False, floatfmt=".3g"), ""]
    return lines


def _cost_section(frame, out: Path) -> list[str]:
    cost = cost_table(frame)
    cost.to_csv(out / "cost.csv")
    return ["## Cost per run", "", "Mean seconds of scoring and of training (evaluation included) "
            "per run, training steps per second, and the largest peak memory of a run (MiB; peak "
            "RSS on CPU, max allocated on CUDA; scoring or training, whichever is larger); a row "
            "per method, task and device, with its number of runs, where the runs came from "
            "several tasks or devices (a step's cost depends on both).", "",
            cost.to_markdown(floatfmt=".1f"), ""]


def _published_section(stats, published: dict, out: Path) -> list[str]:
    theirs = parse_published(published)
    both, taus = compare_published(stats, theirs)
    both = both.assign(**{c: 100 * both[c] for c in ("mean", "std", "mean_published", "difference") if c in both})
    both.to_csv(out / "published.csv", index=False)
    return ["## Against the published numbers", "",
            "Each of our budgets against the published column separately (never pooled), x100:", "",
            to_markdown(both[["compared_at", "task", "method", "budget", "mean", "mean_published",
                              "difference"]].set_index(["compared_at", "task", "method"])), "",
            "Kendall's tau between our ranking and theirs, per task and budget (n = methods):", "",
            to_markdown(taus.set_index(["task", "budget"])), ""]


def _overlap_section(frame, out: Path, known) -> list[str]:
    overlap_seeds = mask_overlap_seeds(frame, known=known)
    overlap_seeds.to_csv(out / "overlap-seeds.csv", index=False)
    overlap = mask_overlap(overlap_seeds)
    overlap.to_csv(out / "overlap.csv", index=False)
    if overlap.empty:
        return []
    lines = ["## Do methods pick the same entries? (Jaccard of the masks, mean over seeds)", ""]
    for (task, budget), g in overlap.groupby(["task", "budget"]):
        both = pd.concat([g, g.rename(columns={"method_a": "method_b", "method_b": "method_a"})])
        matrix = both.pivot(index="method_a", columns="method_b", values="jaccard")
        for m in matrix.index:
            matrix.loc[m, m] = 1.0
        lines += [f"{task}, budget {budget}:", "", matrix.to_markdown(floatfmt=".3f"), ""]
    return lines


def _score_section(frame, cache_dir, out: Path, known) -> list[str]:
    seeds = score_correlation_seeds(frame, cache_dir, known=known)
    seeds.to_csv(out / "score-correlation-seeds.csv", index=False)
    corr_scores = score_correlation(seeds)
    corr_scores.to_csv(out / "score-correlation.csv", index=False)
    if corr_scores.empty:
        return []
    return ["## Rank correlation of importance scores (same sampled entries)", "",
            corr_scores.to_markdown(index=False, floatfmt=("", "", "", ".4f", ".4f", ".0f", ".0f")), ""]

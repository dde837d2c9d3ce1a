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
    TIES,
    Table1,
    bayesian_against,
    bayesian_signed_rank,
    best_per_budget,
    bootstrap_ci,
    budget_curves,
    budget_rows,
    cell_stats,
    constant_cells,
    constant_scores,
    cost_table,
    friedman_ranking,
    holm,
    natural_methods,
    pair_values,
    paired_matrix,
    paired_test,
    paired_tests,
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


def verdict(frame: pd.DataFrame, ranking: dict | None = None, alpha: float = 0.05) -> str:
    """One paragraph a reader can quote, written from the statistics: Friedman over the
    (task, budget) blocks, which pairs the Holm-adjusted Wilcoxon tests separate ("no pair
    differs" when none does), and the cells at the constant predictor, which weigh on ranks."""
    ranking = ranking if ranking is not None else friedman_ranking(frame)
    stuck = constant_cells(frame)
    stuck_text = (f"{len(stuck)} cell(s) are within noise of the constant predictor (did not "
                  f"measurably learn: among themselves, their order in a block's ranking is noise): "
                  f"{', '.join(stuck[:12])}"
                  f"{' ...' if len(stuck) > 12 else ''}." if stuck else
                  "No cell is within noise of the constant predictor.")
    if ranking is None:
        return ("Too few (task, budget) blocks or methods for a ranking test (at least 2 blocks and "
                f"3 methods). {stuck_text}")
    ranks, pairwise = ranking["ranks"], ranking["pairwise"]
    separated = []
    for a, b in itertools.combinations(list(ranks.index), 2):  # ranks are sorted: a ranks better
        if a in pairwise.index and b in pairwise.columns and pairwise.loc[a, b] < alpha:
            separated.append(f"{a} over {b} (p = {pairwise.loc[a, b]:.2g})")
    friedman = (f"Friedman's test over {ranking['n_blocks']} (task, budget) blocks gives p = "
                f"{ranking['p']:.2g}: the methods' mean ranks "
                + ("differ" if ranking["p"] < alpha else "do not differ") + f" at {alpha}.")
    pairs = (f"Pairwise (Wilcoxon signed-rank over {ranking['n_pairs']} (task, budget, seed) pairs, "
             f"Holm-adjusted): " + (f"no pair differs at {alpha}." if not separated else
                                    f"{len(separated)} pair(s) differ at {alpha}: "
                                    + "; ".join(separated[:15]) + (" ..." if len(separated) > 15 else "") + "."))
    best = f"Best mean rank: {ranks.index[0]} ({ranks.iloc[0]:.2f})."
    return " ".join([friedman, pairs, best, stuck_text])


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
                 known: dict[str, pd.DataFrame] | None = None) -> str:
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
    frame.drop(columns=["spend", "trial"], errors="ignore").assign(
        run_dir=[Path(p).name for p in frame.run_dir]).to_csv(out / "results.csv", index=False)
    stats = cell_stats(frame)
    stats.to_csv(out / "cells.csv", index=False)
    lines = _opening_section(frame, out, title, header, ties)
    tests_all = []
    for budget in budget_blocks(stats.budget):
        section, tests = _budget_section(frame, stats, budget, ties, out)
        lines += section
        tests_all.append(tests.assign(budget=budget))
    pd.concat(tests_all).to_csv(out / "tests.csv", index=False)
    lines += _ranking_section(frame, out)
    lines += table_section(
        out / "best-per-budget.csv", best_per_budget(frame),
        "### Which selection method is best at which budget",
        "Per (task, budget), among the budget-parameterised methods whose trainable count keeps "
        "to the budget: the best by mean, the runner-up, their mean paired difference over "
        "seeds, and the Bayesian signed-rank probabilities (ROPE one point) that the best is "
        "better than the runner-up, practically equivalent, or worse (best-per-budget.csv). A "
        "P(better) below 0.95 means the data do not single out one method there. over_budget "
        "names a method whose mean trainable count exceeds the budget by more than 1% (with that "
        "count), left out of the ranking: it did not compete at that budget.")
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


def _opening_section(frame, out: Path, title: str, header: str, ties: str) -> list[str]:
    """Title, how to read the tables, notes, the verdict (verdict.md) and the failed cells."""
    lines = [f"# {title}", "", header, ""] if header else [f"# {title}", ""]
    lines += ["Cells: test main metric x100 at the best-validation checkpoint, mean ± population "
              "std over seeds; [r] = rank in the column (mean: higher is better; std: lower is "
              f"better; ties: {ties}); AVG = mean of task means ± mean of task stds; † = worse "
              "than the column's best by a paired t-test over the n seeds both ran (p < 0.05; n "
              "per test in tests.csv); ≈ = within noise of the constant predictor (less than "
              "max(2 standard errors of the mean over seeds, 1/sqrt(test rows)) above it: the cell "
              "did not measurably learn). The "
              "row 'constant predictor' is the train majority class (mean label for regression) "
              "scored on test.", ""]
    lines += [f"Note: {note}" for note in frame.attrs.get("notes", [])]
    said = verdict(frame)
    (out / "verdict.md").write_text(said + "\n")
    lines += ["", "**Verdict.** " + said, ""]
    failed = frame.attrs.get("failed", {})
    if failed:
        lines += ["", f"Failed cells ({len(failed)}), left out of every mean and rank:", ""]
        lines += [f"- {cell}: {reason}" for cell, reason in sorted(failed.items())]
    return lines + [""]


def _budget_section(frame, stats, budget: str, ties: str, out: Path) -> tuple[list[str], pd.DataFrame]:
    """Fu et al.'s Table 1 at one budget (table1-b<budget>.csv), with its paired tests, the
    near-constant marks, the trainable count and the stability correlation; and the tests."""
    constant = constant_scores(frame)
    rows = budget_rows(stats, budget)
    tests = paired_tests(frame, rows)
    table = table1(rows, ties=ties)
    if not tests.empty:
        table.worse = tests.pivot_table(index="method", columns="task", values="worse",
                                        aggfunc="any").reindex(table.mean.index).fillna(False)
    rendered = table.render()
    stuck = set(constant_cells(frame, stats))
    for row in rows.itertuples():
        if f"{row.task}/{row.method}/b{row.budget}" in stuck:
            rendered.loc[row.method, row.task] += " ≈"
    counts = rows.groupby("method")["trainable"].mean().reindex(rendered.index)
    share = 100 * counts / frame.pretrained_entries.iloc[0]
    rendered["trainable"] = [f"{int(c):,} ({s:.3f}%)" for c, s in zip(counts, share)]
    rendered.loc["constant predictor"] = {
        **{t: f"{100 * constant.loc[t, 'metric']:.2f}" if t in constant.index else "-"
           for t in rendered.columns}, "trainable": "0"}
    rendered.to_csv(out / f"table1-b{budget}.csv")
    corr = stability_correlation(table)
    per_cell = at_budget(frame, budget).groupby(["task", "method"]).seed.nunique()
    seeds = (f"{per_cell.min()} seeds" if per_cell.min() == per_cell.max()
             else f"{per_cell.min()}-{per_cell.max()} seeds per cell")
    return [f"## Budget {budget} (natural-count methods included), {seeds}", "",
            rendered.to_markdown(), "",
            f"Stability vs performance (Fu et al. Fig. 2): Spearman rho = {corr['spearman']:.4f} "
            f"(p = {corr['spearman_p']:.3g}), Kendall tau = {corr['kendall']:.4f} "
            f"(p = {corr['kendall_p']:.3g}) over n = {corr['n']} (method, task) cells.", ""], tests


def _ranking_section(frame, out: Path) -> list[str]:
    """Friedman over (task, budget) blocks, Wilcoxon-Holm pairs, the Bayesian comparisons."""
    ranking = friedman_ranking(frame)
    if ranking is None:
        return []
    ranking["pairwise"].to_csv(out / "wilcoxon-holm.csv")
    ranking["ranks"].rename("mean_rank").to_csv(out / "ranks.csv")
    lines = ["## Ranking over all (task, budget) cells (Friedman; Wilcoxon-Holm)", "",
             f"Friedman chi2 = {ranking['statistic']:.3f}, p = {ranking['p']:.3g} over "
             f"{ranking['n_blocks']} blocks ({', '.join(ranking['blocks'])}) and "
             f"{len(ranking['ranks'])} methods (Demsar 2006). Mean rank (1 = best) below. "
             "Pairwise: two-sided Wilcoxon signed-rank tests over the "
             f"{ranking['n_pairs']} (task, budget, seed) pairs, Holm-adjusted over all pairs "
             "(Benavoli, Corani & Mangili 2016), in wilcoxon-holm.csv, drawn as the "
             "critical-difference diagram cd.png (the methods dotted on one bar are not "
             "significantly different at 0.05).", "",
             ranking["ranks"].rename("mean rank").to_frame().to_markdown(floatfmt=".2f"), ""]
    return lines + table_section(
        out / "bayesian.csv", bayesian_against(frame),
        "### Against Random and full fine-tuning (Bayesian signed-rank, ROPE 1 point)",
        "Benavoli et al. (2017): the posterior probability that the method is better than the "
        "reference by more than 0.01 (one point x100), practically equivalent, or worse, over "
        "the (task, budget, seed) pairs both ran (bayesian.csv; `baycomp`).", drop=["rope"])


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
    both.to_csv(out / "published.csv", index=False)
    return ["## Against the published numbers", "",
            "Each of our budgets against the published column separately (never pooled):", "",
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

"""Cells that do not measure the method as budgeted (concentrated, underspent, protocol-limited), forgetting and cost tables."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from peftbench.analysis.statistics import cell_stats, constant_scores
from peftbench.data.metrics import near_constant
from peftbench.training.record import NATURAL


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean scoring and training seconds, mean steps/s, max peak memory (MiB), and
    the mean 1-minute load average around the runs (NaN for runs that did not record it).

    A mean over runs that differ in what they cost per step measures the mix, not the method,
    so the table splits where the runs do, with the number of runs behind each row:
    - by task, where the runs come from several (STS-B's sentence pairs are longer than
      SST-2's sentences: a step costs more);
    - by device, where the runs come from several (a board grown on several machines: one CPU
      ran a cell 2.6x slower per step than another)."""
    for column in ("steps_per_s", "peak_memory_mb", "load_1min"):
        if column not in frame:
            frame = frame.assign(**{column: np.nan})
    split = [c for c in ("task", "device") if c in frame and frame[c].nunique() > 1]
    g = frame.groupby(["method", *split])
    table = pd.DataFrame({"scoring_s": g.scoring_time_s.mean(), "training_s": g.train_time_s.mean(),
                          "steps_per_s": g.steps_per_s.mean(), "peak_memory_mb": g.peak_memory_mb.max(),
                          "load_1min": g.load_1min.mean()})
    if split:
        table = table.assign(runs=g.size()).reset_index(level=split)
    return table


def forgetting_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method, budget): the forgetting probe's statistic after training
    (`peftbench.training.forgetting`: an encoder's Spearman x100, higher is better; a causal LM's held-out
    next-token loss in nats, lower is) and its change from the pre-trained model's (mean and
    population std over the seeds that measured it). Empty when no run measured it."""
    if "retention_change" not in frame or frame.retention_change.isna().all():
        return pd.DataFrame()
    measured = frame.dropna(subset=["retention_change"])
    statistic = (measured.retention_statistic.fillna("spearman") if "retention_statistic" in measured
                 else pd.Series("spearman", index=measured.index))
    scale = np.where(statistic == "spearman", 100.0, 1.0)
    measured = measured.assign(statistic=statistic, after=measured.retention_after * scale,
                               change=measured.retention_change * scale)
    g = measured.groupby(["task", "method", "budget", "statistic"], sort=True)
    return pd.DataFrame({"seeds": g.size(), "after": g.after.mean(), "change": g.change.mean(),
                         "change_std": g.change.std(ddof=0)}).reset_index()


BLOCK = re.compile(r"\.(layer|layers|h|block|blocks)\.\d+\.")  # a tensor inside the repeated blocks


def selection_checks(frame: pd.DataFrame, share: float = 0.5, spent: float = 0.5) -> pd.DataFrame:
    """Cells whose selection does not measure the method as budgeted, one row per finding:
    - `concentrated`: one pre-trained tensor outside the repeated blocks (embeddings, a pooler,
      a final norm) holds more than `share` of the trained entries (mean over seeds), and more
      than twice its own share of the model (a per-tensor Random puts 52% in MiniLM's word
      embeddings because they are 52% of the model: that is proportion, not concentration). The
      cell measures that tensor (all-methods-cpu's FISH put 88% of its 0.1% in an untrained
      pooler of 0.65% of the entries). A tensor's size is read from a run of the task that
      trained every entry (full fine-tuning); without one, `share` alone decides, and the
      detail says so;
    - `underspent`: a budgeted method trained less than `spent` of its budget (mean over seeds):
      the cell measures a smaller budget than its column says;
    - `underspent seeds`: the mean keeps to `spent` but some seeds do not (a method whose spend
      depends on the seed, as AdaPEFT's knapsack over probed values): those seeds measure a
      smaller budget, and a mean would hide them;
    - `protocol-limited`: seeds whose run says it did not work as designed (`training.record.health_flags`:
      DiffPruning's mask did not learn, or it was projected from a collapsed model).
    From each seed's `trainable_by_tensor` (the head apart); empty where runs do not record it."""
    rows = []
    if "spend" not in frame:
        return pd.DataFrame(rows)
    sizes = {}
    for task, runs in frame.groupby("task"):
        whole = runs[runs.trainable >= runs.pretrained_entries]
        spend = next((s for s in whole.spend if isinstance(s, dict)), None)
        if spend:
            sizes[task] = {t: c / float(whole.pretrained_entries.iloc[0]) for t, c in spend.items()}
    for (task, method, budget), cells in frame.groupby(["task", "method", "budget"]):
        shares = {}
        for spend, trained in zip(cells.spend, cells.trainable):
            if not isinstance(spend, dict) or not trained:
                continue
            for tensor, count in spend.items():
                if not BLOCK.search(tensor):
                    shares[tensor] = shares.get(tensor, 0.0) + count / trained / len(cells)
        if shares:
            tensor, top = max(shares.items(), key=lambda kv: kv[1])
            size = sizes.get(task, {}).get(tensor)
            if top > share and (size is None or top > 2 * size):
                rows.append({"task": task, "method": method, "budget": budget, "check": "concentrated",
                             "detail": f"{tensor} holds {100 * top:.0f}% of the trained entries"
                                       + (f" ({100 * size:.2f}% of the model's)" if size is not None
                                          else " (its size unknown: no full fine-tuning run of the task)")})
        flagged = [(seed, flags) for seed, flags in zip(cells.seed, cells.get("health", [None] * len(cells))) if flags]
        if flagged:
            rows.append({"task": task, "method": method, "budget": budget, "check": "protocol-limited",
                         "detail": f"{len(flagged)} of {len(cells)} seeds: "
                                   + "; ".join(f"seed {s}: {', '.join(f)}" for s, f in flagged)})
        if budget != NATURAL:
            rows += [{"task": task, "method": method, "budget": budget, **row} for row in _spend(cells, budget, spent)]
    return pd.DataFrame(rows)


def _spend(cells: pd.DataFrame, budget: str, spent: float) -> list[dict]:
    """A budgeted cell's `underspent` row (its seeds' mean below `spent` of the budget), else its
    `underspent seeds` row (the seeds below it), else none."""
    from peftbench.contract.selector import Budget

    allowed = Budget.parse(budget).entries(int(cells.pretrained_entries.iloc[0]))
    if not allowed:  # a budget of no entries: nothing to under-spend
        return []
    used = float(cells.trainable.mean()) / allowed
    low = sorted((t / allowed, seed) for seed, t in zip(cells.seed, cells.trainable) if t / allowed < spent)
    if used < spent:
        return [{"check": "underspent", "detail": f"trains {100 * used:.0f}% of its budget "
                                                  f"({cells.trainable.mean():,.0f} of {allowed:,} entries)"}]
    if low:
        return [{"check": "underspent seeds",
                 "detail": f"{len(low)} of {len(cells)} seeds train less than {100 * spent:.0f}% of the budget ("
                           + ", ".join(f"seed {s}: {100 * u:.0f}%" for u, s in low) + f"); the mean is {100 * used:.0f}%"}]
    return []


def constant_cells(frame: pd.DataFrame, stats: pd.DataFrame | None = None) -> list[str]:
    """'task/method/bBUDGET' of every cell whose mean is within noise of the constant predictor
    (`data.metrics.near_constant`): cells that did not measurably learn. `stats`: the frame's
    `cell_stats`, when the caller has them."""
    constant = constant_scores(frame)
    out = []
    for row in (stats if stats is not None else cell_stats(frame)).itertuples():
        if row.task in constant.index and near_constant(row.mean, row.std, constant.loc[row.task, "metric"],
                                                        int(constant.loc[row.task, "test_rows"]), row.seeds):
            out.append(f"{row.task}/{row.method}/b{row.budget}")
    return sorted(out)

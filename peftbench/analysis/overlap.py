"""Do methods choose the same entries? Jaccard of the masks and rank correlation of the scores, per seed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch

from peftbench.core.safeload import load_pt
from peftbench.training.record import at_budget, budget_blocks


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

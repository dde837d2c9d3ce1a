"""What a board costs: cells per hour under each declared setting (`bench cells`), what cheaper
tuning rules would have chosen on a board's committed search records (`bench tuning`), and a
board's projected CPU hours from those figures (`bench project`).

Every figure is measured in one run against a baseline in the same run (never an absolute
threshold: machines differ), or read from committed files.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peftbench.core.errors import UsageError

#: train settings of each variant `bench cells` times, over the board's schedule
CELL_VARIANTS = {
    "fp32": {},
    "length": {"eval_order": "length"},
    "bf16": {"bf16": True},
    "bf16+length": {"bf16": True, "eval_order": "length"},
}
#: the board schedule every cell runs (all-methods-cpu's and seed-methods-cpu's)
BOARD_TRAIN = {"epochs": 1, "max_steps": 150, "batch_size": 16, "max_length": 128}
#: one cell per worker: all-methods-cpu's throughput cells (STS-B, Random, 0.5%, lr 1e-2) and a
#: scoring-heavy one (ChildTuning-D's Fisher pass over the training set)
DEFAULT_CELLS = ("stsb/random/0.005/0.01/0", "sst2/childtuning-d/0.005/0.001/0")


def parse_cell(text: str) -> dict:
    """`task/method/budget/lr/seed` -> its parts, or a UsageError naming the bad part."""
    parts = text.split("/")
    if len(parts) != 5:
        raise UsageError(f"cell {text!r}: give task/method/budget/lr/seed, e.g. {DEFAULT_CELLS[0]}")
    task, method, budget, lr, seed = parts
    try:
        lr_value, seed_value = float(lr), int(seed)
    except ValueError:
        raise UsageError(f"cell {text!r}: the learning rate and seed must be numbers") from None
    if not (lr_value > 0 and math.isfinite(lr_value)) or seed_value < 0:
        raise UsageError(f"cell {text!r}: a positive learning rate and a non-negative seed")
    return {"task": task, "method": method, "budget": budget, "lr": lr_value, "seed": seed_value}


def run_cell(cell: str, variant: str, out: str, model: str = "default", limit: int | None = None) -> dict:
    """One real cell under `variant` in this process: its wall time split into scoring, the
    training loop, evaluation (validation, test) and the rest (loading, tokenising, the
    forgetting probe, checks, writing); and its validation and test metrics."""
    from peftbench.contract.settings import train_config
    from peftbench.training.experiment import RunConfig, run_experiment

    c = parse_cell(cell)
    config = RunConfig(method=c["method"], task=c["task"], budget=c["budget"], seeds=[c["seed"]],
                       train=train_config({**BOARD_TRAIN, "lr": c["lr"], **CELL_VARIANTS[variant]}),
                       model=model, limit=limit, output_dir=out)
    start = time.perf_counter()
    _, run_dir = run_experiment(config, progress=False)
    wall = time.perf_counter() - start
    result = json.loads((run_dir / f"seed-{c['seed']}" / "result.json").read_text())
    loop = result["steps"] / result["steps_per_s"]
    return {"cell": cell, "variant": variant, "wall_s": wall, "scoring_s": result["scoring_time_s"],
            "step_loop_s": loop, "evaluation_s": result["train_time_s"] - loop,
            "other_s": wall - result["scoring_time_s"] - result["train_time_s"],
            "validation": result["validation"]["main"], "test": result["test"]["main"],
            "retention_change": (result.get("forgetting") or {}).get("change")}


def cells_per_hour(cells=DEFAULT_CELLS, variants=tuple(CELL_VARIANTS), rounds: int = 1,
                   model: str = "default", limit: int | None = None, progress=None) -> dict:
    """Each variant runs the cells as the board's workers do: one 1-thread process per cell, all
    at once (two cells = the two workers of a 2-core board), fresh processes for every variant,
    rounds interleaved (every variant once per round). Cells per hour = the sum of the workers'
    own rates (3600 / a cell's median wall time over rounds): the steady state of workers that
    each keep drawing cells like theirs; ratios against the first variant in the same run."""
    import os
    import tempfile

    from peftbench.sweep.workers import worker_environments

    for cell in cells:
        parse_cell(cell)
    unknown = [v for v in variants if v not in CELL_VARIANTS]
    if unknown:
        raise UsageError(f"bench cells: unknown variants {unknown}; allowed: {list(CELL_VARIANTS)}")
    environments = worker_environments(len(cells))
    runs: dict[str, list[list[dict]]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants:
            with tempfile.TemporaryDirectory() as out:
                procs = [subprocess.Popen(
                    [sys.executable, "-c", "import json, sys; from peftbench.bench.cells import run_cell; "
                     f"print(json.dumps(run_cell({cell!r}, {variant!r}, {out!r}, {model!r}, {limit!r})))"],
                    env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for cell, env in zip(cells, environments)]
                done = [(p, *p.communicate()) for p in procs]
            for p, _, err in done:
                if p.returncode:
                    raise RuntimeError(f"bench cells {variant}: {err.strip().splitlines()[-1:]}")
            measured = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in done]
            runs[variant].append(measured)
            if progress:
                progress(f"round {r + 1}/{rounds} {variant}: "
                         + ", ".join(f"{m['cell']} {m['wall_s']:.0f} s" for m in measured))
    base = variants[0]
    out = {"cells": list(cells), "model": model, "limit": limit, "train": BOARD_TRAIN, "rounds": rounds, "workers": len(cells),
           "threads_per_worker": [env.get("OMP_NUM_THREADS") for env in environments], "variants": {}}
    for variant, measured in runs.items():
        per_cell = {cell: {key: statistics.median(one[i][key] for one in measured)
                           for key in ("wall_s", "scoring_s", "step_loop_s", "evaluation_s", "other_s")}
                    for i, cell in enumerate(cells)}
        for i, cell in enumerate(cells):
            per_cell[cell].update({k: measured[0][i][k] for k in ("validation", "test", "retention_change")})
        out["variants"][variant] = {"cells_per_hour": sum(3600 / c["wall_s"] for c in per_cell.values()),
                                    "cells": per_cell, "settings": CELL_VARIANTS[variant]}
    for variant, row in out["variants"].items():
        row["vs_" + base] = row["cells_per_hour"] / out["variants"][base]["cells_per_hour"]
        for cell, c in row["cells"].items():
            b = out["variants"][base]["cells"][cell]
            c["test_minus_" + base] = c["test"] - b["test"]
            c["validation_minus_" + base] = c["validation"] - b["validation"]
    return out


def tuning_rules(board: str) -> dict:
    """What cheaper tuning rules would have chosen on a board's committed per-budget search.

    Each key (task, method, budget) of `per-budget.json` whose three rates were trained on both
    tuning seeds (the first seed read from `carry.json`, the second's value recovered from the
    two-seed mean) is replayed under three rules over those same rates:
    - `two-seed`: the committed rule, the best mean over both seeds (6 runs for 3 rates);
    - `one-seed`: the best on the first seed alone (3 runs);
    - `halving`: the first seed on every rate, the second on its best two, the best mean of
      those (5 runs; successive halving over seeds).
    A rule's pick is scored by the second seed alone (held out from the one-seed rule) and by
    the two-seed mean, each against the committed rule's pick; "equally good" = given up no
    more than the key's seed spread (population std of validation over the reported seeds of
    the committed cell, results.csv). Keys whose rates were widened beyond the carry check's
    three use those three only."""
    import pandas as pd

    from peftbench.board.paths import find

    folder = find(board)
    try:
        carry = json.loads((folder / "carry.json").read_text())
        per_budget = json.loads((folder / "per-budget.json").read_text())
    except FileNotFoundError as err:
        raise UsageError(f"bench tuning {board}: the board has no {Path(err.filename).name} "
                         "(only a board with a carry check and a per-budget search can be replayed)") from None
    results = pd.read_csv(folder / "results.csv")
    rows = []
    for key, entry in sorted(per_budget.items()):
        if key not in carry:
            continue
        first = {t["params"]["lr"]: t["validation"] for t in carry[key]["tried"] if t["state"] == "complete"}
        mean = {t["params"]["lr"]: t["validation"] for t in entry["tried"] if t["state"] == "complete"}
        rates = [lr for lr in first if any(math.isclose(lr, m, rel_tol=1e-9) for m in mean)]
        if len(rates) < 2:
            continue
        mean = {lr: next(v for m, v in mean.items() if math.isclose(lr, m, rel_tol=1e-9)) for lr in rates}
        second = {lr: 2 * mean[lr] - first[lr] for lr in rates}
        two = max(rates, key=mean.get)
        one = max(rates, key=first.get)
        top2 = sorted(rates, key=first.get, reverse=True)[:2]
        halving = max(top2, key=mean.get)
        task, method, budget = key.split("/")
        cell = results[(results.task == task) & (results.method == method)
                       & (results.budget.astype(str) == budget)]
        spread = float(cell.validation.std(ddof=0)) if len(cell) else float("nan")
        row = {"task": task, "method": method, "budget": budget, "rates": len(rates),
               "two_seed": two, "one_seed": one, "halving": halving, "seed_spread": spread,
               "committed": entry["train"]["lr"], "committed_widened": len(entry["tried"]) > len(rates)}
        for rule, pick in (("one_seed", one), ("halving", halving)):
            row[f"{rule}_same"] = math.isclose(pick, two, rel_tol=1e-9)
            row[f"{rule}_gives_up_mean"] = mean[two] - mean[pick]
            row[f"{rule}_gives_up_second_seed"] = second[two] - second[pick]
            row[f"{rule}_within_spread"] = mean[two] - mean[pick] <= spread
        rows.append(row)
    if not rows:
        raise UsageError(f"bench tuning {board}: no key of per-budget.json has its rates in carry.json")
    frame = pd.DataFrame(rows)
    summary = {"keys": len(frame), "runs_per_key": {"two_seed": 6, "one_seed": 3, "halving": 5}}
    for rule in ("one_seed", "halving"):
        summary[rule] = {"same_rate": int(frame[f"{rule}_same"].sum()),
                         "within_spread": int(frame[f"{rule}_within_spread"].sum()),
                         "gives_up_mean_max": float(frame[f"{rule}_gives_up_mean"].max()),
                         "not_within": [f"{r.task}/{r.method}/{r.budget}" for r in frame.itertuples()
                                        if not getattr(r, f"{rule}_within_spread")]}
    return {"board": board, "summary": summary, "keys": frame.to_dict(orient="records")}

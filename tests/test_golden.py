"""The guard against numbers that move silently: one tiny golden cell (the tiny BERT of
conftest, real STS-B rows, Random at 5%, 4 steps, seed 0) against its test metric and step
losses committed with `peftbench.__version__` in golden_cell.json.

Cells of a study and a board are keyed on the version, so a change that moves numbers must
bump it: if the numbers here change while the version did not, this test fails and says so.
After a bump, regenerate: PEFTBENCH_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py

Tolerance: exact equality is what the same software on the same CPU gives (and what
`leaderboard verify` checks); across CPUs torch's kernels may vectorise differently (AVX2 vs
AVX-512: another float32 summation order, ~1e-7 relative per operation), so losses are compared
to a relative 1e-5 over these 4 steps. A change that moves numbers (the loss, the head's start,
the schedule, a method's choice) moves them by orders of magnitude more. The test metric is
compared to an absolute 1e-3: after 4 steps it is a correlation over 32 rows of nearly constant
predictions, which magnifies those float differences: an AMD EPYC (AVX2) gave -0.082542
against the Xeon's -0.082479 (7.6e-4 relative) from losses equal to 1e-7.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import peftbench
from peftbench.contract.settings import TrainConfig
from peftbench.training.experiment import RunConfig, run_experiment

GOLDEN = Path(__file__).with_name("golden_cell.json")
RTOL = 1e-5
METRIC_ATOL = 1e-3  # see the docstring: an ill-conditioned correlation, not a loss


def golden_cell(model_dir: str, out: Path) -> dict:
    config = RunConfig(method="random", task="stsb", budget="0.05", seeds=[0], model=model_dir,
                       train=TrainConfig(epochs=1, max_steps=4, batch_size=8, lr=1e-2, max_length=32),
                       limit=32, output_dir=str(out))
    summary, run_dir = run_experiment(config, progress=False)
    epochs = [json.loads(line) for line in (run_dir / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    return {"version": peftbench.__version__, "test_main": summary["test_main_mean"],
            "validation_main": summary["validation_main_mean"],
            "step_losses": [loss for e in epochs for loss in e["step_losses"]]}


def test_golden_cell_moves_only_with_a_version_bump(tiny_model_dir, tmp_path):
    got = golden_cell(tiny_model_dir, tmp_path)
    if os.environ.get("PEFTBENCH_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
        pytest.skip(f"wrote {GOLDEN} for version {got['version']}")
    golden = json.loads(GOLDEN.read_text())
    if golden["version"] != peftbench.__version__:
        pytest.fail(f"{GOLDEN.name} holds version {golden['version']}, peftbench is "
                    f"{peftbench.__version__}: regenerate it after the bump "
                    "(PEFTBENCH_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py)")
    moved = got["step_losses"] != pytest.approx(golden["step_losses"], rel=RTOL) or \
        got["test_main"] != pytest.approx(golden["test_main"], rel=0, abs=METRIC_ATOL)
    if moved:
        pytest.fail(f"the golden cell's numbers moved at version {peftbench.__version__} "
                    f"(step losses {golden['step_losses']} -> {got['step_losses']}; test "
                    f"{golden['test_main']} -> {got['test_main']}): bump the version and "
                    "regenerate (peftbench.__version__, then PEFTBENCH_WRITE_GOLDEN=1 python -m "
                    "pytest tests/test_golden.py, then every board the change moves)")

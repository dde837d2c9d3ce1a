"""The training-step benchmark under pytest-benchmark (out of the default test run):

    pip install -e ".[bench]"
    pytest benchmarks/ --benchmark-group-by=param:variant --benchmark-columns=min,median,rounds

Each variant is prepared in this process; for figures to compare or cite, prefer
`peftbench bench step`, which runs every variant in a fresh process, in interleaved rounds, and
prints the ratios to the floor and to full fine-tuning. PEFTBENCH_BENCH_MODEL picks the model
(default: the offline default model); PEFTBENCH_BENCH_DEVICE=cuda times the GPU path.
"""
from __future__ import annotations

import gc
import os

import pytest

from peftbench.bench.step import STEP_VARIANTS, prepare_step
from peftbench.training import memory

MODEL = os.environ.get("PEFTBENCH_BENCH_MODEL", "default")
DEVICE = os.environ.get("PEFTBENCH_BENCH_DEVICE", "cpu")


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_training_step(benchmark, variant):
    one_step, _ = prepare_step(variant, MODEL, device=DEVICE)
    gc.collect()
    since_reset = memory.reset_peak(DEVICE)
    benchmark.pedantic(one_step, rounds=4, warmup_rounds=1)
    peak = memory.peak(DEVICE, since_reset)
    benchmark.extra_info.update(variant=variant, peak_memory_bytes=peak["bytes"],
                                peak_memory_kind=peak["kind"])

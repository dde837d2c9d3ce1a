"""Local workers: each with its share of the machine (threads on CPU, one GPU each), started as
separate processes."""

from __future__ import annotations

import os
import sys

from peftbench.core.errors import UsageError


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def worker_environments(workers: int) -> list[dict[str, str]]:
    """Environment overrides for `workers` local workers that do not fight over the machine:
    on a GPU machine one worker per visible device (CUDA_VISIBLE_DEVICES), at most that many;
    on CPU each worker gets its share of the cores as its thread count (two torch processes
    that each use every core slowed each other 6-8x here)."""
    import torch

    if workers < 1:
        raise UsageError(f"--workers {workers}: give a positive number of workers")
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if workers > len(devices):
            raise UsageError(f"--workers {workers}: this machine shows {len(devices)} GPU(s); "
                             f"allowed 1..{len(devices)} (one worker per device)")
        return [{"CUDA_VISIBLE_DEVICES": devices[i]} for i in range(workers)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > cores:
        raise UsageError(f"--workers {workers}: this machine has {cores} core(s); allowed 1..{cores} "
                         "(each worker needs at least one)")
    shares = [cores // workers + (1 if i < cores % workers else 0) for i in range(workers)]
    return [{name: str(n) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} for n in shares]


def spawn_workers(argv: list[str], workers: int, log=print, command: tuple[str, ...] = ("sweep",)) -> int:
    """`workers` local `peftbench COMMAND ARGV` processes, each with its share of the machine
    (`worker_environments`); returns the worst exit code; Ctrl-C reaches every worker."""
    import subprocess

    environments = worker_environments(workers)
    log(f"starting {workers} worker(s) of `peftbench {' '.join(command)}`: "
        + "; ".join(" ".join(f"{k}={v}" for k, v in env.items() if k != "MKL_NUM_THREADS")
                    for env in environments))
    import signal

    procs = [subprocess.Popen([sys.executable, "-m", "peftbench", *command, *argv],
                              env={**os.environ, **env}) for env in environments]

    def forward(signum, frame):  # SIGTERM to the parent (a scheduler, `kill`): the workers stop too
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward) if threading_main() else None
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        codes = [p.wait() for p in procs]  # each worker got the Ctrl-C and saves its state
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return max(codes)


def threading_main() -> bool:
    """Signal handlers can only be set from the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()

"""Peak memory of a stretch of work: max allocated on CUDA, peak resident set size on CPU.

A process's peak RSS only grows, so one sweep process running many cells, or a benchmark that
selects before it trains, would report the largest peak so far. On Linux the peak is reset by
writing 5 to /proc/self/clear_refs; where that is not possible (macOS, some sandboxes) the
figure is the process peak since start and `peak()` says so with `since_reset: False`.
"""

from __future__ import annotations

import resource
import sys

import torch

_STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"


def reset_peak(device: torch.device | str = "cpu") -> bool:
    """Start a new peak here; True if this platform could reset it."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    release_free_memory()  # what an earlier stretch freed is not this one's
    try:
        with open(_CLEAR, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def current_bytes(device: torch.device | str = "cpu") -> int:
    """Memory held now: allocated on CUDA, resident set size on CPU (0 where unknown)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS") or 0


def release_free_memory() -> None:
    """Ask glibc to return free heap pages to the system (no-op elsewhere), so that memory a
    previous stretch freed is not counted as held by the next one."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open(_STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_peak_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak(device: torch.device | str = "cpu", since_reset: bool = True) -> dict:
    """{"bytes", "kind" ("cuda_max_allocated" or "rss"), "since_reset"} for the stretch since
    `reset_peak` (pass its return value as `since_reset`)."""
    if torch.device(device).type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated",
                "since_reset": since_reset}
    return {"bytes": _rss_peak_bytes(), "kind": "rss", "since_reset": since_reset}


def peak_memory_mb(result: dict) -> float:
    """A run's peak memory in MiB, the larger of scoring and training (NaN if not recorded)."""
    peak = result.get("peak_memory")
    if not peak:
        return float("nan")
    return max(peak["scoring_bytes"], peak["training_bytes"]) / 2**20


def mean_load(result: dict) -> float:
    """The mean of a result's 1-minute load averages before and after its run (NaN if unrecorded)."""
    load = result.get("load") or {}
    values = [v for v in (load.get("before"), load.get("after")) if v is not None]
    return sum(values) / len(values) if values else float("nan")

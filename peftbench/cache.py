"""Score once, threshold many: importance scores cached on disk by content.

A method's scores depend on the method and its hyper-parameters, the model, the task's data,
the seed and the scoring-relevant training settings, never on the budget (the budget enters in
`select`). So a sweep over budgets scores once per (method, params, model, task, seed) and every
other budget reads the file. The key is a SHA-256 of exactly those inputs (`score_key`).

Concurrent workers are safe: the first to take the key's file lock computes and writes the file
atomically (temporary file + `os.replace`); the others wait on the lock and then read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def score_key(method: str, params: dict, model: str, task_files: list[str], seed: int,
              settings: dict) -> str:
    """Content address of one scoring pass; `settings` = the training settings scoring reads
    (batch size, max length, row limit)."""
    from peftbench import __version__

    payload = {"method": method, "params": params, "model": model, "seed": seed,
               "data": [file_digest(f) for f in task_files], "settings": settings,
               "peftbench": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ScoreCache:
    """A folder of `<key>.pt` files; `hits` / `misses` count this process's lookups."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def get_or_compute(self, key: str, compute: Callable[[], object]) -> tuple[object, float, bool]:
        """(scores, seconds the scoring took when it ran, whether it came from the cache).
        A cached entry reports the scoring time measured when it was computed."""
        path = self.path(key)
        with FileLock(str(path) + ".lock"):
            if path.exists():
                self.hits += 1
                entry = torch.load(path, weights_only=False)
                return entry["scores"], entry["seconds"], True
            self.misses += 1
            start = time.perf_counter()
            scores = compute()
            seconds = time.perf_counter() - start
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            os.close(fd)
            torch.save({"scores": scores, "seconds": seconds}, tmp)
            os.replace(tmp, path)
            return scores, seconds, False

"""Score once, threshold many: importance scores cached on disk by content.

A method's scores depend on the method's code and hyper-parameters, the model's weights, the
task's data, the seed, the scoring-relevant training settings, the device type and dtype and
the library versions; never on the budget (the budget enters in `select`). So a sweep over
budgets scores once per such input and every other budget reads the file. The key is a SHA-256
of all of them (`score_key`, with identities from `peftbench.training.identity`): a checkpoint saved
again at the same path, an edited method or another torch is a miss, never a silent reuse.

Concurrent workers are safe: the first to take the key's file lock computes and writes the file
atomically (temporary file + `os.replace`); the others wait on the lock and then read it. A file
that cannot be read back (truncated by a full disk, say) is recomputed, with a warning.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock

from peftbench.core.files import digest, file_digest, write_atomic
from peftbench.core.ownership import MARKER, claim, require
from peftbench.core.safeload import load_pt
from peftbench.training.identity import code_identity, environment, model_fingerprint


def score_key(method: str, params: dict, model: str, task_files: list[str], seed: int,
              settings: dict) -> tuple[str, dict]:
    """(content address, what it is made of) of one scoring pass; `settings` = the training
    settings scoring reads (batch size, max length, row limit, device type, dtype)."""
    payload = {"code": code_identity(method), "params": params, "model": model_fingerprint(model),
               "seed": seed, "data": [file_digest(f) for f in task_files], "settings": settings,
               "environment": environment()}
    return digest(payload), {**payload, "method": method, "model_name": model}


ENTRY = re.compile(r"^[0-9a-f]{64}\.(pt|reads\.json)(\.lock)?$|^(score-)?tmp[^/]*\.tmp$|^score-[^/]*\.tmp$")


def refined_key(key: str, read: dict) -> str:
    """The entry's key: `key`, or with the training settings the scoring read (name -> value)."""
    return digest({"key": key, "read": read}) if read else key


def looks_like_cache(folder: Path) -> bool:
    """Every file is a cache entry, its lock or a temporary file (a cache from before markers)."""
    return all(p.is_file() and ENTRY.match(p.name) for p in folder.iterdir() if p.name != MARKER)


class ScoreCache:
    """A folder of `<key>.pt` files; `hits` / `misses` count this process's lookups.

    `create`: the folder is made (and marked, `peftbench.core.ownership`) if missing, as a sweep
    does; False (`cache list` / `clear` on a folder the user names): it must already be a
    score cache, and nothing is written to find out."""

    def __init__(self, root: str | Path, create: bool = True):
        what = "score cache folder"
        self.root = (claim if create else require)(root, "score-cache", looks_like_cache, what)
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def _read(self, path: Path):
        try:
            return load_pt(path)
        except Exception as err:  # truncated or foreign file: recompute rather than fail forever
            print(f"peftbench: score cache file {path} is unreadable ({type(err).__name__}); "
                  "recomputing it", file=sys.stderr)
            return None

    def get_or_compute(self, key: str, compute: Callable[[], object], about: dict | None = None,
                       settings=None) -> tuple[object, float, bool, str]:
        """(scores, seconds the scoring took when it ran, whether it came from the cache, the
        entry's key). A cached entry reports the scoring time measured when it was computed;
        `about` (what the key is made of) is stored beside the scores for `peftbench cache list`.

        `settings` (`contract.scoring.RecordedSettings`): the training settings scoring may read. The
        entry is keyed on `key` plus the values of the settings it read, which are noted per key
        in `<key>.reads.json` (a union over the times it was computed): the next lookup keys on
        those settings' current values, so a setting scoring reads can never bring back a score
        made at another value, and one it does not read costs no recomputation."""
        with FileLock(str(self.path(key)) + ".lock"):
            reads_path = self.root / f"{key}.reads.json"
            noted = self._noted(reads_path) if settings is not None else []
            values = settings.values() if settings is not None else {}
            full = refined_key(key, {n: values[n] for n in noted})
            path = self.path(full)
            entry = self._read(path) if path.exists() else None
            if entry is not None:
                self.hits += 1
                return entry["scores"], entry["seconds"], True, full
            self.misses += 1
            start = time.perf_counter()
            scores = compute()
            seconds = time.perf_counter() - start
            if settings is not None:
                noted = sorted(set(noted) | settings.read)
                full = refined_key(key, {n: values[n] for n in noted})
                path = self.path(full)
                about = {**(about or {}), "settings_read": {n: values[n] for n in noted}}
                write_atomic(reads_path, json.dumps(noted), prefix="score-")
            # `about` as plain JSON types: the entry must load with weights_only=True
            entry = {"scores": scores, "seconds": seconds,
                     "about": json.loads(json.dumps(about or {}, default=str)), "created": time.time()}
            write_atomic(path, lambda tmp: torch.save(entry, tmp), prefix="score-")
            return scores, seconds, False, full

    def _noted(self, path: Path) -> list[str]:
        """The settings a key's scoring read before ([] when never computed, or unreadable:
        then the scoring runs and notes them again)."""
        try:
            noted = json.loads(path.read_text()) if path.is_file() else []
        except (OSError, ValueError):
            return []
        return [n for n in noted if isinstance(n, str)] if isinstance(noted, list) else []

    def entries(self) -> list[dict]:
        """One row per cached file: key, size, what it scores, when it was made."""
        rows = []
        for path in sorted(self.root.glob("*.pt")):
            entry = self._read(path) or {}
            about = entry.get("about", {})
            rows.append({"key": path.stem, "bytes": path.stat().st_size,
                         "method": about.get("method", "?"), "model": about.get("model_name", "?"),
                         "seed": about.get("seed", "?"), "params": about.get("params", {}),
                         "seconds": entry.get("seconds"), "readable": bool(entry)})
        return rows

    def clear(self) -> int:
        """Delete every cached file (and its lock); returns how many score files went. Only
        files named as the cache names them go: nothing else in the folder is touched."""
        removed = 0
        for path in sorted(self.root.iterdir()):
            if path.is_file() and ENTRY.match(path.name):
                removed += path.suffix == ".pt"
                path.unlink(missing_ok=True)
        return removed

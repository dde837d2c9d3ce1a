"""Search work shared between workers and machines: claims per key, the trial log, and the edge rule's widened grid."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from peftbench import __version__
from peftbench.core.errors import UsageError
from peftbench.core.files import write_json
from peftbench.sweep.records import current_entries, method_code, read_record, read_trial_log, write_search
from peftbench.sweep.spec import StudySpec
from peftbench.sweep.storage import pid_alive


class SearchClaims:
    """Which (task, method) pairs of a search are tuned, taken or free, shared by every search
    worker on this output folder: under a file lock, a worker takes the first pair that is
    neither in search.json nor claimed by a live worker (`search-claims.json`; a dead local
    worker's claim is taken over), and records its result by merging it into search.json as it
    is on disk then (and into the board's committed copy, `mirror`), so workers never overwrite
    each other's pairs. One worker takes the pairs in the spec's order, as before. The carry
    check shares the mechanism with its own record (`carry.json`) and keys."""

    def __init__(self, spec: StudySpec, mirror: Path | None, record: str = "search.json",
                 keys: list[str] | None = None):
        self.spec, self.mirror, self.record_name = spec, mirror, record
        stem = record.removesuffix(".json")
        self.path = spec.out / f"{stem}-claims.json"
        self.lock = FileLock(str(spec.out / f"{stem}.lock"))
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.pairs = keys if keys is not None else [f"{t}/{m}" for t in spec.tasks for m in spec.methods]
        self.trial_paths = [spec.out / f"{stem}-trials.json",
                            *([mirror.with_name(f"{stem}-trials.json")] if mirror is not None else [])]

    def trials(self, key: str) -> TrialLog:
        """`key`'s trial log (`TrialLog`)."""
        return TrialLog(self, key)

    def read_trials(self) -> dict[str, list[dict]]:
        """{key: finished trial rows} of the keys not recorded yet, the sweep folder's and the
        board's copy merged."""
        log: dict[str, list[dict]] = {}
        for path in reversed(self.trial_paths):  # the board's copy first, the sweep folder's after
            for key, rows in read_trial_log(path).items():
                kept = log.setdefault(key, [])
                kept += [r for r in rows if not any(r["seeds"] == k["seeds"] and _same(r["params"], k["params"])
                                                    for k in kept)]
        return log

    def write_trials(self, log: dict[str, list[dict]]) -> None:
        """Write the trial log (both copies; removed where no key has a row left)."""
        log = {k: rows for k, rows in log.items() if rows}
        for path in self.trial_paths:
            if not log:
                path.unlink(missing_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, log)

    def _claims(self) -> dict[str, str]:
        try:
            claims = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        host = socket.gethostname()
        return {k: v for k, v in claims.items()
                if not (v.rpartition(":")[0] == host and v.rpartition(":")[2].isdigit()
                        and not pid_alive(int(v.rpartition(":")[2])))}

    def merged(self) -> dict:
        """search.json as on disk, with the board's copy merged in (never an entry lost)."""
        best = {}
        if self.mirror is not None and self.mirror.is_file():
            best.update(current_entries(json.loads(self.mirror.read_text())))
        best.update(read_record(self.spec.out / self.record_name))
        return best

    def next(self) -> str | None:
        """The next key neither recorded nor claimed by a live worker, now claimed by this one."""
        with self.lock:
            best, claims = self.merged(), self._claims()
            for key in self.pairs:
                if key not in best and claims.get(key, self.me) == self.me:
                    claims[key] = self.me
                    write_json(self.path, claims)
                    return key
        return None

    def release(self, key: str) -> None:
        with self.lock:
            claims = self._claims()
            claims.pop(key, None)
            write_json(self.path, claims)

    def record(self, key: str, entry: dict) -> dict:
        entry = {**entry, "code": method_code(key.split("/")[1])}
        with self.lock:
            best = {**self.merged(), key: entry}
            write_search(self.spec, best, self.mirror, self.record_name)
            log = self.read_trials()
            if log.pop(key, None) is not None:  # its rows are in the entry's `tried` now
                self.write_trials(log)
            claims = self._claims()
            claims.pop(key, None)
            write_json(self.path, claims)
            return best


class TrialLog:
    """The finished trials of one search key whose search has not finished, kept beside its
    record (`search-trials.json`, `carry-trials.json`, `per-budget-trials.json`, in the sweep
    folder and the board's committed copy): a key stopped mid-way (a sitting's end, a machine
    given back) resumes on any machine from its finished settings instead of only the Optuna
    study's database, which stays on the machine. A row counts only for the same settings, the
    same seeds, this `peftbench.__version__` and the method's source as it is now (`code`: the
    digest that keys its cells; a row without one cannot show which code made it and runs
    again); the key's rows go when its entry is recorded (its `tried` list keeps them). A pruned
    trial has no value to read back and runs again."""

    def __init__(self, claims: SearchClaims, key: str):
        self.claims, self.key = claims, key
        self.code = method_code(key.split("/")[1])

    def finished(self, params: dict, seeds: list[int]) -> dict | None:
        """The row of a finished trial at `params` on `seeds`, or None."""
        for row in self.claims.read_trials().get(self.key, []):
            if (row.get("version") == __version__ and row.get("code") == self.code and row["seeds"] == list(seeds)
                    and _same(row["params"], params)):
                return row
        return None

    def add(self, params: dict, seeds: list[int], validation: float, duration_s: float) -> None:
        row = {"params": dict(params), "seeds": list(seeds), "validation": validation,
               "duration_s": round(duration_s, 3), "version": __version__, "code": self.code}
        with self.claims.lock:
            log = self.claims.read_trials()
            log[self.key] = [r for r in log.get(self.key, []) if not (
                r["seeds"] == row["seeds"] and _same(r["params"], params))] + [row]
            self.claims.write_trials(log)


def _same(a: dict, b: dict) -> bool:
    """Two trials' settings equal (floats to 1e-9: they went through JSON)."""
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-9) if isinstance(a[k], float) and isinstance(b[k], (int, float))
        else a[k] == b[k] for k in a)


def unmeasured_points(study: optuna.Study, grid: dict) -> list[dict]:
    """The grid points with no trial that ran to its end: none complete or pruned, and none
    failed by the setting's own error (the `failure` a search trial records). A trial cut off
    from outside (its worker killed: failed by the heartbeat with no reason, or left running or
    waiting) does not measure its point."""
    names = sorted(grid)
    measured = {tuple(t.params.get(n) for n in names) for t in study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state == TrialState.FAIL and "failure" in t.user_attrs)}
    return [dict(zip(names, point)) for point in itertools.product(*(grid[n] for n in names))
            if point not in measured]


def measure_cut_off_points(study: optuna.Study, grid: dict, objective, pair: str) -> None:
    """Run every grid point whose trials were all cut off, before the search chooses.

    Why: Optuna's GridSampler stops a study once each point has a *finished* trial, and a trial
    failed because its worker was killed counts as finished; the copy that the heartbeat's
    RetryHeartbeatStaleTrialCallback queues then waits forever, and the point is never measured
    (all-methods-cpu's sst2/ggm chose among 4 of its 5 rates so). Each such point runs once more
    (its waiting copy, or a queued one); a pass that measures none of them is an error."""
    points = unmeasured_points(study, grid)
    while points:
        waiting = [t.params or t.system_attrs.get("fixed_params") for t in
                   study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
        for point in points:
            if point not in waiting:
                study.enqueue_trial(point)
        study.optimize(objective, n_trials=len(points), catch=(Exception,))
        left = unmeasured_points(study, grid)
        if left == points:
            raise UsageError(f"search {pair}: the grid point(s) {points} ran again and still have no "
                             "finished trial; see the study's trials")
        points = left


def widened(studies: list, grid: dict | None, widen: int):
    """The search's edge rule, fixed before it runs: while the best completed value of the one
    numeric grid setting is its smallest (largest) value tried, yield the next value beyond it
    (times the grid's ratio at that end), at most `widen` values per side. Each yielded value
    is tried (by the caller, into a study appended to `studies`) before the next is decided."""
    if not widen or not grid or len(grid) != 1:
        return
    (name, choices), = grid.items()
    ordered = sorted(choices)
    low_ratio, high_ratio = ordered[1] / ordered[0], ordered[-1] / ordered[-2]
    added = {"low": 0, "high": 0}
    while True:
        complete = [t for st in studies for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if name in t.params and t.value is not None]
        if not complete:
            return
        tried_values = sorted({t.params[name] for t in complete})
        best = max(complete, key=lambda t: t.value).params[name]
        if best == tried_values[0] and added["low"] < widen:
            added["low"] += 1
            yield {name: tried_values[0] / low_ratio}
        elif best == tried_values[-1] and added["high"] < widen:
            added["high"] += 1
            yield {name: tried_values[-1] * high_ratio}
        else:
            return

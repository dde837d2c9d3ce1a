"""The grid: every cell queued once, a worker's objective that runs one queued cell, the loop that
works until nothing is left."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from peftbench.core.errors import UsageError
from peftbench.data.metrics import metric_label
from peftbench.sweep.records import untuned
from peftbench.sweep.spec import Cell, StudySpec, cell_config, cell_run_config, cells, config_difference
from peftbench.sweep.state import Fingerprints, progress_line, settled
from peftbench.sweep.storage import claim_out, counts, open_study, reclaim_dead_local_trials, uses_heartbeat
from peftbench.sweep.workers import spawn_workers, torch_threads
from peftbench.training import experiment
from peftbench.training.cache import ScoreCache
from peftbench.training.experiment import RunConfig
from peftbench.training.identity import machine_fingerprint
from peftbench.training.record import RunRecord
from peftbench.training.trainer import pick_device


def enqueue_missing(study: optuna.Study, spec: StudySpec, restart_changed: bool = False) -> int:
    """Queue every cell of the spec with no settled trial of the current fingerprint; refuse
    (UsageError, the differing keys named) cells whose settled trials were run otherwise,
    unless `restart_changed`. Returns how many cells were queued."""
    lock = FileLock(str(spec.out / ".enqueue.lock")) if spec.storage_url.startswith(("sqlite", "journal")) else None
    spec.out.mkdir(parents=True, exist_ok=True)
    prints = Fingerprints(spec)
    waiting = untuned(spec, prints.best)
    pairs = [k for k in waiting if k.count("/") == 1]
    if pairs:  # never a cell at the untuned settings of a spec that tunes them
        raise UsageError(f"study {spec.name!r} has a search: section, and {len(pairs)} (task, method) "
                         f"pair(s) are not tuned yet ({', '.join(pairs[:4])}{' ...' if len(pairs) > 4 else ''}; "
                         f"search.json in {spec.out}): run the search first (`peftbench sweep SPEC --search`, "
                         "or `peftbench leaderboard run NAME`, which searches before the grid)")
    if waiting:
        raise UsageError(f"study {spec.name!r} tunes each budget on its own (search: per_budget), and "
                         f"{len(waiting)} (task, method, budget) key(s) are not tuned yet ({', '.join(waiting[:4])}"
                         f"{' ...' if len(waiting) > 4 else ''}; per-budget.json in {spec.out}): run the "
                         "carry check and the per-budget search first (`peftbench leaderboard run NAME`)")
    with lock or nullcontext():
        held: dict[str, list] = {}
        for t in study.get_trials(deepcopy=False):
            if settled(t) and "cell" in t.user_attrs:
                held.setdefault(t.user_attrs["cell"], []).append(t)
        missing, changed = [], {}
        for cell in cells(spec):
            mine = prints.of(cell)
            trials = held.get(cell.key, [])
            if any(t.user_attrs.get("fingerprint") == mine for t in trials):
                continue
            if trials and not restart_changed:
                old = trials[0].user_attrs.get("config", {})
                diff = config_difference(old, prints.config(cell)) if old else ["fingerprint: (none recorded)"]
                changed.setdefault("; ".join(diff), []).append(cell.key)
                continue
            missing.append(cell)
        if changed:
            diff, keys = next(iter(changed.items()))
            total = sum(len(v) for v in changed.values())
            raise UsageError(
                f"study {spec.name!r} in {spec.storage_url} already holds {total} of these cells run "
                f"with other settings ({diff}; e.g. {keys[0]}): give the study another name, or pass "
                "--restart-changed to run those cells afresh (the old trials stay, unreported)")
        for cell in missing:
            study.enqueue_trial({}, user_attrs={**cell.attrs(), "fingerprint": prints.of(cell),
                                                "config": prints.config(cell)})
    return len(missing)


def refuse_changed_code(study: optuna.Study, spec: StudySpec) -> None:
    """`enqueue_missing`'s refusal, for what is known before any search: cells of `spec` the
    study holds that another code of their method (its source, or peftbench's version) made.
    Their search entries are keyed by the same code, so a board would search them again, then
    be refused at the grid; refused here, the command stops before the search."""
    from peftbench.training.identity import code_identity

    wanted = {c.key: c.method for c in cells(spec)}
    now: dict[str, dict] = {}
    changed = []
    for t in study.get_trials(deepcopy=False):
        method = wanted.get(t.user_attrs.get("cell"))
        code = t.user_attrs.get("config", {}).get("code")
        if method is None or code is None or not settled(t):
            continue
        if method not in now:
            now[method] = code_identity(method, strict=False)
        if code != now[method]:
            changed.append((t.user_attrs["cell"], config_difference({"code": code}, {"code": now[method]})))
    if changed:
        keys = sorted({key for key, _ in changed})
        raise UsageError(
            f"study {spec.name!r} in {spec.storage_url} already holds {len(keys)} of these cells run "
            f"with other code ({'; '.join(changed[0][1])}; e.g. {keys[0]}): give the study another name, "
            "or pass --restart-changed to run those cells afresh (the old trials stay, unreported)")


def result_attrs(result: dict, config: RunConfig, run_dir: Path) -> dict:
    """A finished cell's trial attributes: its `RunRecord` whole (`record`), where it ran, and
    the settings it ran with, from its `result.json` and its run config alone, so a cell
    committed to a board reads back exactly as it was written."""
    from peftbench.data.tasks import load_task

    return {"run_dir": str(Path(run_dir).resolve()),
            "record": RunRecord.model_validate(result).model_dump(mode="json"),
            "main_metric": load_task(config.task).main_metric, "model": config.model,
            "train_config": asdict(config.train), "method_params": config.method_params}


class CellTimedOut(Exception):
    """A cell that ran past the spec's `cell_time_limit`."""


@contextmanager
def time_limit(seconds: int | None):
    """Raise `CellTimedOut` in the main thread after `seconds` (SIGALRM); no limit when None or
    off the main thread (signals reach only it)."""
    import signal
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CellTimedOut(f"the cell ran past its time limit of {seconds} s (the spec's "
                           "cell_time_limit): ended as failed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class CellFailed(Exception):
    """A cell that failed for a reason the same settings would repeat (it diverged)."""


class GridObjective:
    """Runs one queued cell; returns (test main metric, trainable count)."""

    def __init__(self, spec: StudySpec, cache: ScoreCache | None, progress: bool = False):
        self.spec, self.cache, self.progress = spec, cache, progress
        self.prints = Fingerprints(spec)

    def __call__(self, trial: optuna.Trial):
        attrs = trial.user_attrs
        if "cell" not in attrs:  # the queue emptied between our check and Optuna's pop
            raise optuna.TrialPruned("no queued cell left")
        cell = Cell(attrs["task"], attrs["method"], attrs["budget"], attrs["seed"])
        if not self.prints.current(trial):  # queued by a spec with other settings
            trial.set_user_attr("superseded", True)
            raise optuna.TrialPruned(f"cell {cell.key} was queued with other settings")
        twin = self._twin(trial, attrs["cell"], attrs["fingerprint"])
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"cell {attrs['cell']} is run by trial {twin}")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("threads", torch_threads())
        config = cell_run_config(self.spec, cell, self.prints.best)
        expected = self.prints.config(cell)["task_files"]
        self._same_data(trial, cell, expected, lambda: cell_config(config)["task_files"])
        try:
            with time_limit(self.spec.cell_time_limit):
                summary, run_dir = experiment.run_experiment(config, progress=self.progress, score_cache=self.cache)
        except CellTimedOut as err:
            trial.set_user_attr("failure", str(err))
            trial.set_user_attr("final_failure", True)  # the same settings would hang again
            raise CellFailed(str(err)) from None
        except Exception as err:
            trial.set_user_attr("failure", f"{type(err).__name__}: {err}".splitlines()[0][:500])
            raise
        # the data the run read (digests taken as it loaded them), not what the sweep saw at start
        self._same_data(trial, cell, expected,
                        lambda: json.loads((run_dir / "config.json").read_text())["task_files"])
        result = RunRecord.read(run_dir / f"seed-{attrs['seed']}" / "result.json").model_dump(mode="json")
        for key, value in result_attrs(result, config, run_dir).items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("machine", machine_fingerprint(str(pick_device(config.device))))
        if result.get("diverged"):
            d = result["diverged"]
            trial.set_user_attr("final_failure", True)
            trial.set_user_attr("failure", f"diverged at step {d['step']} (loss {d['loss']})")
            raise CellFailed(trial.user_attrs["failure"])
        return result["test"]["main"], result["trainable"]["trainable"]

    @staticmethod
    def _same_data(trial: optuna.Trial, cell: Cell, expected: list[str], read) -> None:
        """A cell is recorded under its fingerprint only if it trained on that fingerprint's
        data: task files edited during a sweep fail the cell (and queue nothing under the old
        fingerprint); the next `sweep` fingerprints the new data and queues its cells."""
        if read() != expected:
            trial.set_user_attr("failure", f"task {cell.task!r}: its data files changed since "
                                "this sweep started; run the sweep again to record cells on the new data")
            raise CellFailed(trial.user_attrs["failure"])

    @staticmethod
    def _twin(trial: optuna.Trial, cell: str, fingerprint: str) -> int | None:
        """A trial of the same cell and settings that completed, or runs with a lower number."""
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.user_attrs.get("cell") == cell and t.number != trial.number and \
                    t.user_attrs.get("fingerprint") == fingerprint and (
                    t.state == TrialState.COMPLETE or t.number < trial.number):
                return t.number
        return None


def run_grid(spec: StudySpec, progress: bool = True, log=print, use_cache: bool = True,
             restart_changed: bool = False, on_complete=None) -> optuna.Study:
    """Work on the study until no cell is waiting or running; safe to run in N processes.
    `on_complete(trial)` is called with each cell this process finishes for good (completed,
    or diverged), as it finishes (a leaderboard commits the cell's files there)."""
    claim_out(spec)
    study = open_study(spec)
    added = enqueue_missing(study, spec, restart_changed=restart_changed)
    prints = Fingerprints(spec)
    log(f"study {spec.name!r} in {spec.storage_url}: {len(prints.cells)} cells, {_queued(study, added)}")
    cache = ScoreCache(spec.out / "scores") if use_cache else None
    objective = GridObjective(spec, cache, progress=False)
    heartbeat = uses_heartbeat(spec)
    told_waiting = False
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed cell is reported by our line
    while True:
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        state = counts(study)
        if state["waiting"]:
            told_waiting = False
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            except ValueError as err:
                # SQLite has no row locks: two workers can pop the same waiting trial (the same
                # cell and seed, so the same number); the first to finish records it
                if not str(err).startswith("Cannot tell a "):
                    raise
                log(f"a cell this worker ran was recorded by another worker first ({err}): kept once")
                continue
            last = _my_last_trial(study)
            if on_complete is not None and last is not None and (
                    last.state == TrialState.COMPLETE or last.user_attrs.get("final_failure")):
                on_complete(last)  # a diverged cell is a result too: committed as it finishes
            if progress:
                log(_trial_line(study, prints))
        elif state["running"] and not heartbeat and reclaim_dead_local_trials(study):
            added = enqueue_missing(study, spec)
            log(f"{added} cell(s) of dead local workers queued again")
        elif state["running"]:
            if not told_waiting:
                log(f"waiting for {state['running']} running trial(s): other workers, or lost ones "
                    f"that turn stale {spec.grace_period} s after their last heartbeat")
                told_waiting = True
            time.sleep(min(spec.heartbeat_interval, 5))
        else:
            break
    log(progress_line(study, prints))
    return study


def run_workers(spec: StudySpec, argv: list[str], workers: int, restart_changed: bool = False,
                log=print, command: tuple[str, ...] = ("sweep",)) -> int:
    """Queue the spec's cells once, then run `workers` local `peftbench sweep` processes on the
    study (`argv`: the spec and the options they share), each with its share of the machine
    (`worker_environments`). Returns the worst exit code; Ctrl-C reaches every worker."""

    study = open_study(spec)
    added = enqueue_missing(study, spec, restart_changed=restart_changed)
    log(f"study {spec.name!r}: {_queued(study, added)}")
    return spawn_workers(argv, workers, log, command)


def _queued(study: optuna.Study, added: int) -> str:
    """What this call queued and what the study holds to do ('0 queued' alone reads as 'nothing
    to do' while cells that a stopped run, or this run's parent, queued still wait)."""
    state = counts(study)
    pending = state["waiting"] + state["running"]
    return f"{added} cells queued now" + (f", {pending} waiting or running in all" if pending != added else "")


def _my_last_trial(study: optuna.Study):
    """The trial this process finished last (None before its first)."""
    mine = [t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("worker") == f"{socket.gethostname()}:{os.getpid()}"
            and t.state.is_finished()]
    return max(mine, key=lambda t: t.datetime_complete) if mine else None


def _trial_line(study: optuna.Study, prints: Fingerprints) -> str:
    t = _my_last_trial(study)
    if t is None:
        return progress_line(study, prints)
    if t.state == TrialState.COMPLETE:
        what = (f"{metric_label(t.user_attrs['main_metric'])} = {t.values[0]:.4f}, "
                f"trainable {int(t.values[1]):,}")
    else:
        what = f"{t.state.name.lower()}: {t.user_attrs.get('failure', '')}"
    return f"[{progress_line(study, prints)}] {t.user_attrs['cell']}: {what}"

"""What a study holds for the current spec: each cell's fingerprint, state (done, running, waiting,
failed, stale, missing) and the live progress line; its finished cells as the analysis frame."""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from peftbench.contract import registry
from peftbench.core.errors import UsageError
from peftbench.core.files import digest
from peftbench.sweep.records import tuned_settings
from peftbench.sweep.spec import Cell, StudySpec, cell_config, cell_run_config, cells, config_difference
from peftbench.sweep.storage import NotStarted, counts, open_study
from peftbench.training.record import NATURAL, RunRecord


class Fingerprints:
    """The current spec's cells, and each cell's `cell_config` and its digest (computed once per
    task/method: budget and seed are the cell's key, not part of its configuration)."""

    def __init__(self, spec: StudySpec):
        self.spec, self.best, self._by_pair = spec, tuned_settings(spec), {}
        self.cells = {c.key: c for c in cells(spec)}

    def _entry(self, cell: Cell) -> tuple[dict, str]:
        own = f"{cell.task}/{cell.method}/{cell.budget}" in self.best  # tuned at its own budget
        pair = (cell.task, cell.method, cell.budget if own else cell.budget == NATURAL)
        if pair not in self._by_pair:
            config = cell_config(cell_run_config(self.spec, cell, self.best))
            self._by_pair[pair] = (config, digest(config))
        return self._by_pair[pair]

    def config(self, cell: Cell) -> dict:
        return self._entry(cell)[0]

    def of(self, cell: Cell) -> str:
        """The cell's fingerprint under the current code; on a frozen board, the committed one
        proven to be this spec's cell (`sweep.cellstore.accept_frozen`)."""
        if self.spec.frozen is not None:
            return self.spec._accepted.get(cell.key, "")
        return self._entry(cell)[1]

    def current(self, trial) -> bool:
        """Whether a trial belongs to this spec: one of its cells, with its fingerprint."""
        cell = self.cells.get(trial.user_attrs.get("cell"))
        return cell is not None and trial.user_attrs.get("fingerprint") == self.of(cell)


def settled(trial) -> bool:
    """A trial that holds its cell: queued, running, complete, or failed for good (diverged)."""
    return trial.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE) or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("final_failure"))


def cell_states(study: optuna.Study, prints: Fingerprints) -> dict[str, dict]:
    """Per cell of the current spec: 'done', 'running', 'waiting', 'failed' (with the last
    failure's reason) or 'missing', from its trials with the current fingerprint."""
    out = {key: {"state": "missing"} for key in prints.cells}
    rank = {"done": 4, "running": 3, "waiting": 2, "failed": 1, "stale": 0.5, "missing": 0}
    for t in study.get_trials(deepcopy=False):
        if not prints.current(t):
            key = t.user_attrs.get("cell")
            if t.state == TrialState.COMPLETE and key in out and out[key]["state"] == "missing" \
                    and isinstance(t.user_attrs.get("config"), dict):
                out[key] = {"state": "stale", "reason": stale_reason(
                    t.user_attrs["config"], prints.config(prints.cells[key]), prints.cells[key].method)}
            continue
        state = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running",
                 TrialState.WAITING: "waiting", TrialState.FAIL: "failed"}.get(t.state)
        if state is None or rank[state] < rank[out[t.user_attrs["cell"]]["state"]]:
            continue
        out[t.user_attrs["cell"]] = {"state": state, "reason": t.user_attrs.get("failure", "crashed"),
                                     "trial": t.number, "final": bool(t.user_attrs.get("final_failure"))}
    return out


def stale_reason(old: dict, new: dict, method: str) -> str:
    """Why a finished cell no longer counts: 'method code changed: methods/x.py' or the
    settings that changed ('train.lr: 0.001 -> 0.0003')."""
    changed = config_difference(old, new)
    if any(line.startswith("code.source") for line in changed):
        return f"method code changed: {inspect.getfile(registry.get(method))}"
    if any(line.startswith("code.") for line in changed):
        return "code changed: " + "; ".join(line for line in changed if line.startswith("code."))[:200]
    return "settings changed: " + "; ".join(changed)[:200]


def failed_cells(study: optuna.Study, spec: StudySpec) -> dict[str, str]:
    """Cells of the spec whose last attempt failed and none completed: cell -> reason."""
    states = cell_states(study, Fingerprints(spec))
    return {k: v["reason"] for k, v in states.items() if v["state"] == "failed"}


def progress_line(study: optuna.Study, prints: Fingerprints) -> str:
    """'12/36 cells done, 1 running, 0 failed, 23 waiting; ETA 25 min' for the live view."""
    states = cell_states(study, prints)
    tally = {s: sum(v["state"] == s for v in states.values())
             for s in ("done", "running", "waiting", "failed", "stale", "missing")}
    times = [(t.datetime_complete - t.datetime_start).total_seconds()
             for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if "run_dir" in t.user_attrs and prints.current(t)]
    left = tally["waiting"] + tally["running"]  # only what will run: never an ETA for nothing
    eta = ""
    if times and left:
        seconds = sum(times) / len(times) * left / max(tally["running"], 1)
        eta = f"; ETA {seconds / 60:.0f} min" if seconds >= 60 else f"; ETA {seconds:.0f} s"
    line = (f"{tally['done']}/{len(states)} cells done, {tally['running']} running, "
            f"{tally['failed']} failed, {tally['waiting']} waiting{eta}")
    if tally["stale"]:
        reasons = sorted({v["reason"] for v in states.values() if v["state"] == "stale"})
        line += (f"; {tally['stale']} stale ({'; '.join(reasons)[:200]}): `peftbench sweep SPEC` "
                 "runs them again")
    if tally["missing"]:
        line += f"; {tally['missing']} not queued: `peftbench sweep SPEC` queues them"
    return line


def watch(spec: StudySpec, every: float = 10.0, once: bool = False, stream=None) -> None:
    """The live view: one refreshed line per `every` seconds until nothing is waiting or running."""
    stream = stream or sys.stdout
    try:
        study = open_study(spec, read_only=True)
    except NotStarted:  # read-only: say so without creating the storage
        print(f"0/{len(cells(spec))} cells done; study {spec.name!r} not started "
              f"(in {spec.storage_url})", file=stream)
        return
    prints = Fingerprints(spec)
    while True:
        line = progress_line(study, prints)
        state = counts(study)
        if once or not (state["waiting"] or state["running"]):
            print(line, file=stream)
            return
        print("\r" + line.ljust(100), end="", file=stream, flush=True)
        time.sleep(every)


def trial_record(trial) -> RunRecord:
    """A finished grid trial's `RunRecord`: stored whole in the trial, or, for a trial written
    by peftbench before 0.4, read from the result file its run folder holds."""
    attrs = trial.user_attrs
    if "record" in attrs:
        return RunRecord.model_validate(attrs["record"])
    folder = Path(attrs["run_dir"])
    for path in (folder / f"seed-{attrs['seed']}" / "result.json", folder / f"seed-{attrs['seed']}-result.json"):
        if path.is_file():
            return RunRecord.read(path)
    raise UsageError(f"trial {trial.number} ({attrs.get('cell')}) was recorded by an older peftbench and "
                     f"its result file is gone from {folder}: run the cell again (`--restart-changed`)")


def trials_frame(study: optuna.Study, prints: Fingerprints | None = None):
    """Completed grid trials as the analysis frame (`training.record.analysis_row`, as `analysis.frame.load_runs`
    builds it from run folders), one row per (task, method, budget, seed), plus the trial's
    number, fingerprint, device (the CPU or GPU it ran on; '' if not recorded) and duration; with `prints`, only the current spec's cells run with its
    settings."""
    import pandas as pd

    from peftbench.training.record import analysis_row

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if "run_dir" not in a or (prints is not None and not prints.current(t)):
            continue
        model = a.get("model") or a.get("config", {}).get("model_name", "")
        rows.append({**analysis_row(trial_record(t), task=a["task"], method=a["method"], budget=a["budget"],
                                    model=model, metric_name="+".join(a.get("main_metric", [])),
                                    run_dir=a["run_dir"]),
                     "trial": t.number, "fingerprint": a.get("fingerprint", ""),
                     "device": (a.get("machine") or {}).get("device", ""),
                     "duration_s": (t.datetime_complete - t.datetime_start).total_seconds()})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.drop_duplicates(["task", "method", "budget", "seed"], keep="first")
    return frame


def finished_frame(spec: StudySpec):
    """`trials_frame` of the spec's study (its cells, its settings); a clear error when nothing
    has finished yet. The cells that failed for good are in `frame.attrs["failed"]`."""
    study = open_study(spec, read_only=True)
    prints = Fingerprints(spec)
    frame = trials_frame(study, prints)
    states = cell_states(study, prints)
    if frame.empty:
        stale = sorted({v["reason"] for v in states.values() if v["state"] == "stale"})
        raise UsageError(f"study {spec.name!r} in {spec.storage_url} has no finished trial of this "
                         "spec's cells and settings yet" + (
                             f" ({sum(v['state'] == 'stale' for v in states.values())} stale: "
                             f"{'; '.join(stale)[:200]}; `peftbench sweep SPEC` runs them again)" if stale else ""))
    frame.attrs["failed"] = {k: v["reason"] for k, v in states.items() if v["state"] == "failed"}
    left = {k: v for k, v in states.items() if v["state"] not in ("done", "failed")}
    if left:  # never a method dropped without a word
        by_reason = {}
        for key, v in sorted(left.items()):
            by_reason.setdefault(v.get("reason") if v["state"] == "stale" else v["state"], []).append(key)
        frame.attrs["notes"] = [f"left out {len(keys)} cell(s) not finished with these settings "
                                f"({reason}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                                for reason, keys in by_reason.items()]
    return frame

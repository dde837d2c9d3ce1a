"""The analysis frame from run folders: one row per finished seed, re-runs counted once, one model and dataset per task."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd

from peftbench.core.errors import UsageError
from peftbench.training.record import RunRecord, analysis_row, budget_label, read_json


def _one_setting(frame: pd.DataFrame) -> None:
    """Runs of several models, or of two datasets behind one task name, are not seeds of one
    cell: refused (naming both) instead of being dropped as re-runs or divided by one model's
    size."""
    models = frame.groupby("model").size()
    if len(models) > 1:
        raise UsageError(f"the runs are of {len(models)} models ({', '.join(f'{m!r}: {n} seeds' for m, n in models.items())}): "
                         "report one model at a time (give the folders of one)")
    for task, group in frame.groupby("task"):
        if group["data"].nunique() > 1:
            raise UsageError(f"task {task!r}: the runs read {group['data'].nunique()} different data "
                             "files or task files under one name: report one dataset at a time")


def load_runs(folders: list[str | Path]) -> pd.DataFrame:
    """One row per finished seed in the given run directories (or folders of them); run
    directories marked INCOMPLETE (interrupted, crashed) are skipped, with a note.

    A (task, method, budget, seed) found in several run directories (a re-run) counts once:
    the newest run directory's result is kept, so a re-run never adds seeds. Seeds that
    diverged are not rows; they are listed in `frame.attrs["failed"]`, and what was left out
    in `frame.attrs["notes"]`."""
    from peftbench.training.experiment import INCOMPLETE

    rows, failed, notes = [], {}, []
    incomplete = sorted(str(p.parent) for f in folders for p in Path(f).glob(f"**/{INCOMPLETE}"))
    for folder in folders:
        for result_file in sorted(Path(folder).glob("**/seed-*/result.json")):
            run_dir = result_file.parent.parent
            if str(run_dir) in incomplete:
                continue
            config = read_json(run_dir / "config.json")
            record = RunRecord.read(result_file)  # checked, one line if not
            task = Path(config["task"]).stem
            budget = budget_label(config["method"], config["budget"])
            if record.diverged is not None:
                d = record.diverged
                failed[f"{task}/{config['method']}/b{budget}/s{record.seed}"] = \
                    f"diverged at step {d.step} (loss {d.loss})"
                continue
            rows.append({**analysis_row(record, task=task, method=config["method"], budget=budget,
                                        model=config.get("model", ""),
                                        metric_name=_metric_name(config["task"]), run_dir=str(run_dir)),
                         "written": result_file.stat().st_mtime,
                         "data": json.dumps(config.get("task_files") or config.get("task_spec", config["task"]))})
    if incomplete:
        notes.append(f"skipped {len(incomplete)} run directories marked {INCOMPLETE} (interrupted "
                     f"or failed): {', '.join(incomplete)}")
    if not rows:
        raise UsageError(f"no finished runs (seed-*/result.json) under {[str(f) for f in folders]}"
                         + (f"; {notes[0]}" if notes else ""))
    frame = pd.DataFrame(rows).sort_values("written")
    _one_setting(frame)
    frame = frame.drop(columns="data")
    key = ["task", "method", "budget", "seed"]
    repeated = int(frame.duplicated(key, keep="last").sum())
    if repeated:
        notes.append(f"{repeated} re-run seed(s) found twice or more: the newest result of each "
                     "(task, method, budget, seed) is used, never counted as extra seeds")
    frame = frame.drop_duplicates(key, keep="last").drop(columns="written").reset_index(drop=True)
    frame.attrs.update(failed=failed, notes=notes)
    return frame


@functools.lru_cache(maxsize=None)
def _metric_name(task: str) -> str:
    """'accuracy+macro_f1' for a task name or spec path ('' if the spec is gone)."""
    from peftbench.data.tasks import load_task

    try:
        return "+".join(load_task(task).main_metric)
    except UsageError:
        return ""

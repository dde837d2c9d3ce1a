"""A board's committed cells are its store: `leaderboards/<name>/runs/` holds, for every
finished cell, what produced its number and the number itself, so a board grows across
sittings and machines and any committed number can be re-derived (`leaderboard verify`).

    runs/<run>/config.json           the run's config (method, task, budget, seed, training, ...)
    runs/<run>/seed-<s>-result.json  its result (validation/test metrics, counts, cost)
    runs/<run>/cell.json             {cell, fingerprint, config, machine, duration_s}

`cell.json` carries the cell's configuration fingerprint (`sweep.Fingerprints`: model weights,
task files, training settings after the search, method parameters, code version): a committed
cell counts as done for a spec exactly when the spec's cell has the same fingerprint, so a
changed spec or `peftbench.__version__` re-runs the cells it changes and never mixes them with
old ones. `machine` (torch, transformers, device, threads) says whether a re-run can be expected
to match to the last digit. Masks and score caches stay in the sweep folder (megabytes a cell).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

CELL_FILE = "cell.json"


@dataclass(frozen=True)
class CommittedCell:
    """One committed cell: its key, fingerprint and the files that hold it."""

    folder: Path  # runs/<run>
    cell: str  # task/method/b<budget>/s<seed>
    task: str
    method: str
    budget: str
    seed: int
    fingerprint: str
    record: dict  # cell.json

    @property
    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())

    @property
    def result(self) -> dict:
        """The committed result, checked against `RunRecord` (a damaged file is one line)."""
        from peftbench.record import RunRecord

        return RunRecord.read(self.folder / f"seed-{self.seed}-result.json").model_dump(mode="json")

    def run_config(self, output_dir: str = "runs"):
        """The run that produced this cell, from its committed config.json."""
        from peftbench.experiment import RunConfig
        from peftbench.trainer import train_config

        config = self.config
        return RunConfig(method=config["method"], task=config["task"], budget=config["budget"],
                         seeds=[self.seed], model=config["model"], device=config["device"],
                         method_params=config["method_params"],
                         train=train_config(config["train"], f"{self.folder}/config.json"),
                         limit=config.get("limit"), output_dir=output_dir)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def commit_cell(board: Path, attrs: dict, duration_s: float) -> Path:
    """Copy a finished cell's config and result from its run directory (`attrs["run_dir"]`)
    into `board/runs/<run>/` with its `cell.json`; returns that folder. Called as each cell
    finishes, so a sitting that stops after N cells leaves N cells ready to commit."""
    source = Path(attrs["run_dir"])
    target = board / "runs" / source.name
    if source.resolve() == target.resolve():
        return target  # read back from the board itself: already there
    target.mkdir(parents=True, exist_ok=True)
    seed = attrs["seed"]
    config = json.loads((source / "config.json").read_text())
    if config.get("task_spec"):  # no path of this machine in a committed file
        config["task_spec"] = portable_path(config["task_spec"])
    _write_json(target / "config.json", config)
    shutil.copyfile(source / f"seed-{seed}" / "result.json", target / f"seed-{seed}-result.json")
    _write_json(target / CELL_FILE, {
        "cell": attrs["cell"], "task": attrs["task"], "method": attrs["method"],
        "budget": attrs["budget"], "seed": seed, "fingerprint": attrs["fingerprint"],
        "config": attrs.get("config", {}), "machine": attrs.get("machine", {}),
        "threads": attrs.get("threads"), "duration_s": duration_s,
        "failure": attrs.get("failure") if attrs.get("final_failure") else None})
    return target


def portable_path(path: str) -> str:
    """`path` relative to the repository (tasks/sst2.yaml) when it lies inside it, else its
    file name: a committed file never names a folder of the machine that wrote it."""
    root = Path(__file__).resolve().parents[1]
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def committed_cells(board: Path) -> list[CommittedCell]:
    """Every committed cell with a `cell.json` (cells committed before it existed have none
    and cannot be matched to a spec: they are re-run)."""
    out = []
    for path in sorted((board / "runs").glob(f"*/{CELL_FILE}")):
        record = json.loads(path.read_text())
        if not (path.parent / f"seed-{record['seed']}-result.json").is_file():
            continue
        out.append(CommittedCell(path.parent, record["cell"], record["task"], record["method"],
                                 str(record["budget"]), int(record["seed"]), record["fingerprint"],
                                 record))
    return out


def import_committed(study, spec, board: Path, log=print) -> int:
    """Add every committed cell whose fingerprint is the spec's for that cell, and that the
    study does not hold yet, as a COMPLETE trial read from its files; returns how many. A
    queued (WAITING) trial of such a cell is then skipped by the grid as a duplicate."""
    import optuna
    from optuna.trial import TrialState

    from peftbench import sweep

    prints = sweep.Fingerprints(spec)
    held = {(t.user_attrs.get("cell"), t.user_attrs.get("fingerprint"))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
            if t.state == TrialState.COMPLETE or t.user_attrs.get("final_failure")}
    added, stale = 0, []
    for cell in committed_cells(board):
        current = prints.cells.get(cell.cell)
        if current is None or prints.of(current) != cell.fingerprint:
            stale.append(cell.cell)
            continue
        if (cell.cell, cell.fingerprint) in held:
            continue
        run = cell.run_config()
        result = cell.result
        attrs = {**current.attrs(), "fingerprint": cell.fingerprint, "config": cell.record["config"],
                 **sweep.result_attrs(result, run, cell.folder), "committed": True,
                 "machine": cell.record.get("machine", {})}
        failure = cell.record.get("failure")
        if failure:  # failed for good (diverged): the same settings would fail again
            trial = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
                **attrs, "final_failure": True, "failure": failure})
        else:
            trial = optuna.trial.create_trial(
                state=TrialState.COMPLETE, values=[result["test"]["main"], result["trainable"]["trainable"]],
                user_attrs=attrs)
        end = datetime.now()
        trial.datetime_start = end - timedelta(seconds=float(cell.record.get("duration_s") or 0.0))
        trial.datetime_complete = end
        study.add_trial(trial)
        added += 1
    if added or stale:
        log(f"board {board.name}: {added} committed cell(s) read back"
            + (f"; {len(stale)} committed with other settings or no longer in the spec, not used "
               f"(re-run if in the spec; removed when the board is rewritten): "
               f"{', '.join(sorted(stale)[:8])}{' ...' if len(stale) > 8 else ''}" if stale else ""))
    return added


def prune_stale(board: Path, keep: set[Path], cells: set[str] | None = None) -> int:
    """Remove committed cell folders that are not in `keep` and whose cell has a kept result
    (replaced by a run of the current settings), or, with `cells`, is no longer one of the
    board's cells; returns how many. A stale cell nothing replaced stays committed: rewriting a
    board never loses a result it cannot give back."""
    root = board / "runs"
    removed = 0
    if not root.is_dir():
        return 0
    def key(folder: Path) -> str | None:
        try:
            return json.loads((folder / CELL_FILE).read_text()).get("cell")
        except (OSError, ValueError):
            return None
    kept = {key(f) for f in keep}
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        cell = key(folder)
        gone = cells is not None and cell is not None and cell not in cells
        if folder.resolve() not in keep and (cell in kept or gone):
            shutil.rmtree(folder)
            removed += 1
    return removed

"""A board's committed cells are its store: `leaderboards/<name>/runs/` holds, for every
finished cell, what produced its number and the number itself, so a board grows across
sittings and machines and any committed number can be re-derived (`leaderboard verify`).

    runs/<run>/config.json           the run's config (method, task, budget, seed, training, ...)
    runs/<run>/seed-<s>-result.json  its result (validation/test metrics, counts, cost)
    runs/<run>/cell.json             {cell, fingerprint, config, machine, duration_s}

`cell.json` carries the cell's configuration fingerprint (`state.Fingerprints`: model weights,
task files, training settings after the search, method parameters, code version): a committed
cell counts as done for a spec exactly when the spec's cell has the same fingerprint, so a
changed spec or `peftbench.__version__` re-runs the cells it changes and never mixes them with
old ones. `machine` (torch, transformers, device, threads) says whether a re-run can be expected
to match to the last digit. Masks and score caches stay in the sweep folder (megabytes a cell).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from peftbench.core.errors import UsageError
from peftbench.core.files import write_json
from peftbench.sweep import grid, state

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
        from peftbench.training.record import RunRecord

        return RunRecord.read(self.folder / f"seed-{self.seed}-result.json").model_dump(mode="json")

    def run_config(self, output_dir: str = "runs"):
        """The run that produced this cell, from its committed config.json."""
        from peftbench.contract.settings import train_config
        from peftbench.training.experiment import RunConfig

        config = self.config
        return RunConfig(method=config["method"], task=config["task"], budget=config["budget"],
                         seeds=[self.seed], model=config["model"], device=config["device"],
                         method_params=config["method_params"],
                         train=train_config(config["train"], f"{self.folder}/config.json"),
                         limit=config.get("limit"), output_dir=output_dir)


def commit_cell(board: Path, attrs: dict, duration_s: float) -> Path:
    """Copy a finished cell's config and result from its run directory (`attrs["run_dir"]`)
    into `board/runs/<run>/` with its `cell.json`; returns that folder. Called as each cell
    finishes, so a sitting that stops after N cells leaves N cells ready to commit."""
    from filelock import FileLock

    source = Path(attrs["run_dir"])
    target = board / "runs" / source.name
    if source.resolve() == target.resolve():
        return target  # read back from the board itself: already there
    (board / "runs").mkdir(parents=True, exist_ok=True)
    import hashlib
    import tempfile

    # local workers of other studies may commit the same cell; the lock lives outside the board
    # (nothing but cells is written there)
    lock = Path(tempfile.gettempdir()) / f"peftbench-board-{hashlib.sha256(str(board.resolve()).encode()).hexdigest()[:16]}.lock"
    with FileLock(str(lock)):
        twin = _committed_twin(board, attrs["cell"], attrs["fingerprint"])
        if twin is not None:  # one folder per cell and settings: a second would count one run twice
            return twin
        return _commit(source, target, attrs, duration_s)


def _committed_twin(board: Path, cell: str, fingerprint: str) -> Path | None:
    """A folder of `board` that already holds `cell` with the same settings, or None."""
    for folder in (board / "runs").iterdir():
        try:
            record = json.loads((folder / CELL_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("cell") == cell and record.get("fingerprint") == fingerprint:
            return folder
    return None


def _commit(source: Path, target: Path, attrs: dict, duration_s: float) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    seed = attrs["seed"]
    config = json.loads((source / "config.json").read_text())
    for key in ("task_spec", "output_dir"):  # no path of this machine in a committed file
        if config.get(key):
            config[key] = portable_path(config[key])
    write_json(target / "config.json", config)
    shutil.copyfile(source / f"seed-{seed}" / "result.json", target / f"seed-{seed}-result.json")
    write_json(target / CELL_FILE, {
        "cell": attrs["cell"], "task": attrs["task"], "method": attrs["method"],
        "budget": attrs["budget"], "seed": seed, "fingerprint": attrs["fingerprint"],
        "config": attrs.get("config", {}), "machine": attrs.get("machine", {}),
        "threads": attrs.get("threads"), "duration_s": duration_s,
        "failure": attrs.get("failure") if attrs.get("final_failure") else None})
    return target


def portable_path(path: str) -> str:
    """`path` relative to the repository (tasks/sst2.yaml) when it lies inside it, else its
    file name: a committed file never names a folder of the machine that wrote it."""
    root = Path(__file__).resolve().parents[2]
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


class DamagedCell(UsageError):
    """A committed cell whose files disagree with each other or with their fingerprint."""


def _damaged(folder: Path, what: str) -> DamagedCell:
    return DamagedCell(f"committed cell {folder}: {what}: restore the folder from git "
                       "(`git checkout -- <folder>`) or remove it to re-run the cell")


def _read_object(path: Path, folder: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _damaged(folder, f"{path.name} cannot be read ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise _damaged(folder, f"{path.name} is not a JSON object")
    return value


def seal(folder: Path) -> CommittedCell:
    """Read one committed cell and check that it is one sealed unit, or raise `DamagedCell`
    naming the file: cell.json's fields typed and its cell key their own; its fingerprint the
    digest of its recorded configuration; config.json (what `verify` re-runs) the same run as
    that configuration; the result a valid `RunRecord` of the same seed, its test metric finite
    unless the cell is recorded as failed. A hand-edited config or a copied, relabelled cell
    fails here instead of being read as the spec's cell."""
    from peftbench.contract.settings import fingerprinted
    from peftbench.core.files import digest
    from peftbench.training.record import RunRecord

    record = _read_object(folder / CELL_FILE, folder)
    kinds = {"cell": str, "task": str, "method": str, "budget": (str, int, float), "seed": int,
             "fingerprint": str, "config": dict}
    for key, kind in kinds.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise _damaged(folder, f"{CELL_FILE} has no valid {key!r}")
    budget, seed = str(record["budget"]), record["seed"]
    if record["cell"] != f"{record['task']}/{record['method']}/b{budget}/s{seed}":
        raise _damaged(folder, f"{CELL_FILE} names cell {record['cell']!r} but holds "
                               f"{record['task']}/{record['method']}/b{budget}/s{seed}")
    config = record["config"]
    if digest(config) != record["fingerprint"]:
        raise _damaged(folder, f"{CELL_FILE}'s fingerprint is not the digest of its configuration")
    run = _read_object(folder / "config.json", folder)
    train = fingerprinted(run.get("train") or {})
    expected = {"method": record["method"], "budget": budget, "seeds": [seed],
                "model": config.get("model_name"), "method_params": config.get("method_params"),
                "train": config.get("train"), "limit": config.get("limit"), "device": config.get("device"),
                "task_files": config.get("task_files")}
    found = {"method": run.get("method"), "budget": str(run.get("budget")), "seeds": run.get("seeds"),
             "model": run.get("model"), "method_params": run.get("method_params"), "train": train,
             "limit": run.get("limit"), "device": run.get("device"), "task_files": run.get("task_files")}
    if budget == "natural":  # a natural-count method ran at a nominal budget its count ignores
        expected.pop("budget"), found.pop("budget")
    if "task_files" not in run:  # a config.json written before it recorded them
        expected.pop("task_files"), found.pop("task_files")
    expected["task"], found["task"] = record["task"], Path(str(run.get("task"))).stem
    differ = [k for k in expected if expected[k] != found[k]]
    if differ:
        k = differ[0]
        raise _damaged(folder, f"config.json's {k} ({found[k]!r}) is not the fingerprinted configuration's "
                               f"({expected[k]!r})")
    result_path = folder / f"seed-{seed}-result.json"
    if not result_path.is_file():
        raise _damaged(folder, f"{result_path.name} is missing")
    try:
        result = RunRecord.read(result_path)
    except UsageError as err:
        raise _damaged(folder, str(err).replace(str(result_path), result_path.name)) from None
    if result.seed != seed:
        raise _damaged(folder, f"{result_path.name} holds seed {result.seed}, the cell is seed {seed}")
    main = result.test.get("main", float("nan"))
    if not record.get("failure") and not (isinstance(main, (int, float)) and math.isfinite(main)):
        raise _damaged(folder, f"{result_path.name}'s test metric is {main!r} but the cell is not recorded as failed")
    return CommittedCell(folder, record["cell"], record["task"], record["method"], budget, seed,
                         record["fingerprint"], record)


def committed_cells(board: Path) -> list[CommittedCell]:
    """Every committed cell with a `cell.json`, each checked by `seal` (one damaged cell stops
    the command with a line naming it); two folders holding the same cell with the same
    fingerprint are refused by name (a copy would count one run twice). Folders without a
    `cell.json` cannot be matched to a spec: their cells are re-run."""
    out, seen = [], {}
    if (board / "runs").is_symlink():  # rewriting would prune another board's cells through it
        raise _damaged(board / "runs", "it is a symbolic link; a board's runs/ is a plain folder")
    for path in sorted((board / "runs").glob(f"*/{CELL_FILE}")):
        if path.is_symlink() or path.parent.is_symlink():
            raise _damaged(path.parent, "it is a symbolic link; a committed cell is a plain folder")
        cell = seal(path.parent)
        key = (cell.cell, cell.fingerprint)
        if key in seen:
            raise DamagedCell(f"committed cells {seen[key]} and {cell.folder} are the same cell "
                              f"({cell.cell}) with the same settings: keep one (a copy would count "
                              "one run twice)")
        seen[key] = cell.folder
        out.append(cell)
    return out


def accept_frozen(spec, board: Path) -> tuple[int, list[str]]:
    """On a frozen board (`frozen:` in its spec): accept each committed cell whose recorded
    configuration is this spec's cell under the current settings in everything but the code,
    whose code is the version the spec names, and whose fingerprint is that configuration's
    digest; the accepted fingerprints become the cells' own (`Fingerprints.of`). Returns (how
    many accepted, the keys refused with why): a cell edited, or made with other settings or
    another version, is not read back."""
    from peftbench.core.files import digest

    prints = state.Fingerprints(spec)
    accepted, refused = {}, []
    for cell in committed_cells(board):
        current = prints.cells.get(cell.cell)
        if current is None:
            continue
        recorded = cell.record["config"]
        code = recorded.get("code") if isinstance(recorded.get("code"), dict) else {}
        if digest(recorded) != cell.fingerprint:
            refused.append(f"{cell.cell} (its config.json is not the configuration its fingerprint names)")
        elif code.get("peftbench") != spec.frozen.version:
            refused.append(f"{cell.cell} (made with peftbench {code.get('peftbench')}, the spec says "
                           f"{spec.frozen.version})")
        elif {**prints.config(current), "code": code} != recorded:
            refused.append(f"{cell.cell} (made with other settings than the spec's)")
        else:
            accepted[cell.cell] = cell.fingerprint
    spec._accepted = accepted
    return len(accepted), refused


def import_committed(study, spec, board: Path, log=print) -> int:
    """Add every committed cell whose fingerprint is the spec's for that cell, and that the
    study does not hold yet, as a COMPLETE trial read from its files; returns how many. A
    queued (WAITING) trial of such a cell is then skipped by the grid as a duplicate."""
    import optuna
    from optuna.trial import TrialState

    prints = state.Fingerprints(spec)
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
                 **grid.result_attrs(result, run, cell.folder), "committed": True,
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

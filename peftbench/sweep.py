"""Sweeps: a YAML study spec run as an Optuna study, resumable, by one worker or many.

Grid (leaderboards): every cell (task, method, budget, seed) is enqueued once as a WAITING trial
of a two-objective study (maximise the test metric of the best-validation checkpoint, minimise
trainable parameters), so `study.best_trials` is the Pareto front. Workers pop WAITING trials; the
sampler is never consulted. Why not `GridSampler`: with several workers it may hand the same
point out twice (documented by Optuna); a queue of enqueued trials is claimed once each.

One configuration per study: every trial carries `config`, everything that determines its
result (model weights' fingerprint, task files' digests, training settings after any search,
method parameters, the method's code identity, row limit, device), and its digest
`fingerprint`. A spec whose cells contradict trials already in the study is refused with the
differing keys (`restart_changed=True`, `--restart-changed` on the command line, runs those
cells afresh); reports, plots, status and leaderboards only read trials of the current spec's
cells with the current fingerprint.

Exactly once, resumable:
- a cell is enqueued only if no trial of it (with the current fingerprint) is WAITING, RUNNING
  or COMPLETE, or failed for good (diverged), so running the same command again resumes:
  completed cells are kept, crashed or interrupted (Ctrl-C) cells are queued again;
- RDB storages (SQLite, PostgreSQL, MySQL) get a heartbeat: a trial whose worker was killed
  (kill -9, lost machine) turns stale after `grace_period` seconds, is failed and re-queued by
  `RetryHeartbeatStaleTrialCallback`; a worker that finds only RUNNING trials waits for them;
- before training, a trial yields (PRUNED, `duplicate_of`) if another trial of the same cell has
  completed or is running with a lower number: the guard for SQLite's lack of row locks and
  for two machines enqueueing at the same moment.

Search (optional, `search:` in the spec): per (task, method), a single-objective study over
training hyper-parameters (and the method's own `search_space()`), TPE sampler seeded, median
pruner on the per-epoch validation metric; its best parameters are written to `search.json` and
the grid uses them for that (task, method).

Every trial's run directory is in its user attributes (`run_dir`), beside the figures a report
needs, so a report reads the study alone (e.g. from PostgreSQL on another machine).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from filelock import FileLock
from optuna.trial import TrialState
from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    PositiveInt,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic import Field as PydanticField

from peftbench import ownership, registry, yamlio
from peftbench.cache import ScoreCache
from peftbench.errors import UsageError, schema_problem
from peftbench.experiment import RunConfig, run_experiment
from peftbench.fingerprint import code_identity, digest, machine_fingerprint, model_fingerprint
from peftbench.metrics import metric_label
from peftbench.record import NATURAL, RunRecord
from peftbench.selector import Budget
from peftbench.trainer import TrainConfig, pick_device, train_config

TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


@dataclass
class StudySpec:
    """A study: which cells to run, how to train, where to store. See README "Sweeps"."""

    name: str
    tasks: list[str]
    methods: dict[str, dict]  # method name -> hyper-parameters
    budgets: list[str] = field(default_factory=lambda: ["0.005"])
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = "default"
    train: TrainConfig = field(default_factory=TrainConfig)
    # method -> train settings that replace `train`'s for that method (e.g. its learning rate)
    method_train: dict = field(default_factory=dict)
    limit: int | None = None
    device: str = "auto"
    storage: str | None = None  # default: sqlite:///<output_dir>/study.db
    output_dir: str | None = None  # default: sweeps/<name>
    heartbeat_interval: int = 30
    grace_period: int = 120
    search: dict | None = None
    published: dict | None = None  # leaderboards: {task: {method: "mean[r]±std[r]"}}
    method_notes: dict = field(default_factory=dict)  # method -> how it departs from the paper's variant
    description: str = ""
    protocol: str = ""  # Markdown: how the protocol was chosen and what was cut (leaderboard README)
    machine: str = ""

    @property
    def out(self) -> Path:
        return Path(self.output_dir or Path("sweeps") / self.name)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.out / 'study.db'}"


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    budget: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/b{self.budget}/s{self.seed}"

    def attrs(self) -> dict:
        return {"cell": self.key, **asdict(self)}


def load_spec(path: str | Path, **overrides) -> StudySpec:
    """Read and check a study spec; `overrides` (not None) replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study spec {path} does not exist")
    try:
        raw = yamlio.load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"study spec {yamlio.where(err, path)}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"study spec {path}: the top level must be a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_spec(raw, str(path))


class _Range(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    low: StrictInt | StrictFloat  # two ints: an integer range (epochs), else a float range
    high: StrictInt | StrictFloat
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


class _Choices(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    choices: list[StrictBool | StrictInt | StrictFloat | StrictStr] = PydanticField(min_length=1)


class _Search(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    trials: PositiveInt = 10
    params: dict[str, _Range | _Choices] = {}
    method_params: bool = False
    pruner: Literal["median", "none"] = "median"
    seed: StrictInt = 0
    # the seeds each setting is trained with (its score: the mean validation over them); by
    # default the spec's first seed. Seeds disjoint from the reported ones keep the choice off
    # the numbers reported.
    seeds: list[NonNegativeInt] | None = PydanticField(default=None, min_length=1)
    # a grid whose best value is at its edge gets the next value beyond that edge (the grid's
    # own ratio there), up to `widen` values per side, until the best is inside
    widen: NonNegativeInt = 0
    budget: StrictFloat | StrictInt | StrictStr | None = None

    @model_validator(mode="after")
    def _widen_needs_one_numeric_grid(self):
        if self.widen:
            grids = [d for d in self.params.values() if isinstance(d, _Choices)]
            if len(self.params) != 1 or not grids or len(grids[0].choices) < 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                    for v in grids[0].choices):
                raise ValueError("widen needs exactly one searched setting given as at least two "
                                 "positive numeric choices (e.g. lr: {choices: [1e-4, 1e-3]})")
        return self

    @field_validator("params")
    @classmethod
    def _train_settings(cls, value):
        allowed = sorted(TRAIN_KEYS)
        for name in value:
            if name not in TRAIN_KEYS:
                raise ValueError(f"search param {name!r} is not a train setting ({allowed})")
        return value


Number = StrictFloat | StrictInt | StrictStr  # a budget: 0.005, 120000 or '0.005'


class SpecFile(BaseModel):
    """The schema of a study spec (README "Sweeps"): every key typed, strictly (`seeds: "3"` is
    refused, not read as seed 3), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: StrictStr = PydanticField(min_length=1)
    tasks: StrictStr | list[StrictStr] = PydanticField(min_length=1)
    methods: list[StrictStr] | dict[StrictStr, dict[StrictStr, Any] | None] = PydanticField(min_length=1)
    budgets: Number | list[Number] = ["0.005"]
    seeds: PositiveInt | list[NonNegativeInt] = 1
    model: StrictStr = "default"
    train: dict[StrictStr, Any] = {}
    method_train: dict[StrictStr, dict[StrictStr, Any]] = {}
    limit: PositiveInt | None = None
    device: StrictStr = "auto"
    storage: StrictStr | None = None
    output_dir: StrictStr | None = None
    heartbeat_interval: PositiveInt = 30
    grace_period: PositiveInt = 120
    search: _Search | None = None
    published: dict[StrictStr, dict[StrictStr, StrictStr]] | None = None
    method_notes: dict[StrictStr, StrictStr] = {}
    description: StrictStr = ""
    protocol: StrictStr = ""
    machine: StrictStr = ""

    @field_validator("budgets", "seeds")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _heartbeat(self):
        # Optuna fails a trial whose heartbeat is older than grace_period: a grace shorter than
        # two beats fails live trials of busy workers (seen: a cell trained twice)
        if self.grace_period < 2 * self.heartbeat_interval:
            raise ValueError(f"grace_period {self.grace_period} must be at least twice "
                             f"heartbeat_interval {self.heartbeat_interval}")
        return self


def parse_spec(raw: dict, where: str = "spec") -> StudySpec:
    try:
        spec = SpecFile.model_validate(raw)
    except ValidationError as err:
        raise UsageError(f"{where}: {schema_problem(err, raw, SpecFile)[1]}") from None
    methods = {m: {} for m in spec.methods} if isinstance(spec.methods, list) else \
        {m: dict(p or {}) for m, p in spec.methods.items()}
    if isinstance(spec.methods, list) and len(set(spec.methods)) < len(spec.methods):
        raise UsageError(f"{where}: a method is listed twice in 'methods': {spec.methods}")
    for name, params in methods.items():
        registry.create(name, **params)  # unknown method or bad parameter: a clear error now
    tasks = [spec.tasks] if isinstance(spec.tasks, str) else list(spec.tasks)
    from peftbench.data import load_task

    for task in tasks:
        load_task(task)
    budgets = [str(Budget.parse(b)) for b in (spec.budgets if isinstance(spec.budgets, list) else [spec.budgets])]
    if len(set(budgets)) < len(budgets):
        raise UsageError(f"{where}: budgets {spec.budgets} name the same budget twice "
                         f"(as numbers: {budgets})")
    seeds = list(range(spec.seeds)) if isinstance(spec.seeds, int) else list(spec.seeds)
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"{where}: seeds {seeds} repeat a seed")
    train = train_config(spec.train, f"{where}: train")
    for name, values in spec.method_train.items():
        if name not in methods:
            raise UsageError(f"{where}: method_train.{name}: {name!r} is not in 'methods' "
                             f"({sorted(methods)})")
        train_config(values, f"{where}: method_train.{name}", train)  # names a bad key now
    return StudySpec(
        name=spec.name, tasks=tasks, methods=methods, budgets=budgets, seeds=seeds,
        model=spec.model, train=train, method_train={m: dict(v) for m, v in spec.method_train.items()},
        limit=spec.limit,
        device=spec.device, storage=spec.storage, output_dir=spec.output_dir,
        heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
        search=spec.search.model_dump() if spec.search else None, published=spec.published,
        description=spec.description, protocol=spec.protocol, machine=spec.machine, method_notes=dict(spec.method_notes))


def cells(spec: StudySpec) -> list[Cell]:
    """The grid; methods with a natural count (`uses_budget = False`) run once per seed."""
    out = []
    for task in spec.tasks:
        for method in spec.methods:
            uses = registry.get(method).uses_budget
            for budget in (spec.budgets if uses else [NATURAL]):
                out.extend(Cell(task, method, budget, seed) for seed in spec.seeds)
    return out


STORAGE_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "mysql://",
                   "mysql+pymysql://", "journal:")


def open_storage(spec: StudySpec):
    """An Optuna storage for the spec's URL: RDB (with heartbeat) or `journal:<path>`.

    The journal storage has no heartbeat: a killed worker's trial would stay RUNNING forever.
    Its way out: a worker that finds only RUNNING trials fails those whose worker process is
    gone (same host, PID no longer alive; `reclaim_dead_local_trials`), so one machine resumes
    after kill -9. Across machines use an RDB storage."""
    url = spec.storage_url
    if not url.startswith(STORAGE_SCHEMES):
        raise UsageError(f"storage {url!r} has an unknown scheme: allowed "
                         f"{', '.join(s + '...' for s in STORAGE_SCHEMES)}")
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):])
        _check_journal_end(path, url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise UsageError(f"storage {url!r}: cannot open the journal file: {err.strerror or err}") from None
    if url.startswith("sqlite:///"):
        try:
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"storage {url!r}: cannot create its folder: {err.strerror or err}") from None
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else \
        {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    # two processes creating a fresh SQLite schema at once collide (alembic_version): serialise
    lock = FileLock(url[len("sqlite:///"):] + ".lock") if url.startswith("sqlite:///") else nullcontext()
    try:
        with lock, warnings.catch_warnings():  # heartbeat and its retry callback are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=spec.heartbeat_interval,
                              grace_period=spec.grace_period,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except (ImportError, ModuleNotFoundError) as err:
        raise UsageError(f"storage {url!r} needs a database driver: {err} "
                         "(PostgreSQL: pip install 'peftbench[postgres]')") from None
    except (SQLAlchemyError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot open storage {url!r}: {first[:300]}") from None


def _check_journal_end(path: Path, url: str) -> None:
    """A journal whose last line was cut (a crash mid-write) is refused before any command
    appends to it: the next record would be glued onto the cut one, and Optuna could not read
    the file again. The user decides what to keep; nothing is repaired behind their back."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)
    except FileNotFoundError:
        return
    except OSError as err:
        raise UsageError(f"storage {url!r}: cannot read the journal file: {err.strerror or err}") from None
    if last != b"\n":
        raise UsageError(f"storage {url!r}: the journal's last line is cut (a write was interrupted); "
                         f"remove that partial last line of {path} (or restore a copy) and run again")


def uses_heartbeat(spec: StudySpec) -> bool:
    """Whether the spec's storage has a heartbeat: `open_storage` gives every RDB storage one,
    the journal storage has none (known from the URL, not from Optuna's private helper)."""
    return not spec.storage_url.startswith("journal:")


def reclaim_dead_local_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker ran on this host and whose process is gone (the journal
    storage's stand-in for a heartbeat); returns how many. Their cells are queued again."""
    host, failed = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit() or _alive(int(pid)):
            continue
        # Optuna has no public call to annotate a trial another process owns (optuna/optuna#2987:
        # a Trial object needs the storage's private trial id); the state goes through `tell`
        study._storage.set_trial_user_attr(t._trial_id, "failure", f"worker {worker} is gone")
        study.tell(t.number, state=TrialState.FAIL)
        failed += 1
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_study(spec: StudySpec, storage=None, read_only: bool = False) -> optuna.Study:
    """The spec's study, created if missing; `read_only` (status, reports): loaded, never
    created or written, a UsageError when there is none yet."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if read_only:
        url = spec.storage_url
        local = url[len("sqlite:///"):] if url.startswith("sqlite:///") else \
            url[len("journal:"):] if url.startswith("journal:") else None
        try:
            if storage is None and local is not None and not Path(local).is_file():
                raise KeyError(spec.name)  # opening it would create it
            return optuna.load_study(study_name=spec.name, storage=storage or open_storage(spec))
        except KeyError:
            raise NotStarted(f"study {spec.name!r} has not started in {url}: nothing to show "
                             f"(start it: peftbench sweep SPEC)") from None
    study = optuna.create_study(study_name=spec.name, storage=storage or open_storage(spec),
                                directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["test_metric", "trainable"])
    return study


def method_train(spec: StudySpec, method: str) -> TrainConfig:
    """The spec's train settings for `method`: `train`, with its `method_train` entry over it."""
    return train_config(spec.method_train.get(method, {}), f"method_train.{method}", spec.train)


def cell_run_config(spec: StudySpec, cell: Cell, best: dict) -> RunConfig:
    """The run a cell stands for: the spec's settings (`method_train` over `train` for its
    method), with the search's best values over those if any."""
    tuned = best.get(f"{cell.task}/{cell.method}", {})
    return RunConfig(method=cell.method, task=cell.task,
                     budget="1" if cell.budget == NATURAL else cell.budget, seeds=[cell.seed],
                     model=spec.model, device=spec.device,
                     method_params={**spec.methods[cell.method], **tuned.get("method", {})},
                     train=train_config(tuned.get("train", {}), "search.json", method_train(spec, cell.method)),
                     limit=spec.limit,
                     output_dir=str(spec.out / "runs"))


def cell_config(config: RunConfig) -> dict:
    """Everything that determines a cell's result besides its key (task, method, budget, seed)."""
    from peftbench.data import load_task

    return {"model": model_fingerprint(config.model), "model_name": config.model,
            "task_files": load_task(config.task).digests(),
            "train": asdict(config.train), "method_params": config.method_params,
            "code": code_identity(config.method, strict=False), "limit": config.limit,
            "device": config.device}


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_difference(old: dict, new: dict) -> list[str]:
    """'train.lr: 0.001 -> 0.0001' for every key whose value differs."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Fingerprints:
    """The current spec's cells, and each cell's `cell_config` and its digest (computed once per
    task/method: budget and seed are the cell's key, not part of its configuration)."""

    def __init__(self, spec: StudySpec):
        self.spec, self.best, self._by_pair = spec, best_search_params(spec), {}
        self.cells = {c.key: c for c in cells(spec)}

    def _entry(self, cell: Cell) -> tuple[dict, str]:
        pair = (cell.task, cell.method, cell.budget == NATURAL)
        if pair not in self._by_pair:
            config = cell_config(cell_run_config(self.spec, cell, self.best))
            self._by_pair[pair] = (config, digest(config))
        return self._by_pair[pair]

    def config(self, cell: Cell) -> dict:
        return self._entry(cell)[0]

    def of(self, cell: Cell) -> str:
        return self._entry(cell)[1]

    def current(self, trial) -> bool:
        """Whether a trial belongs to this spec: one of its cells, with its fingerprint."""
        cell = self.cells.get(trial.user_attrs.get("cell"))
        return cell is not None and trial.user_attrs.get("fingerprint") == self.of(cell)


def _settled(trial) -> bool:
    """A trial that holds its cell: queued, running, complete, or failed for good (diverged)."""
    return trial.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE) or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("final_failure"))


def enqueue_missing(study: optuna.Study, spec: StudySpec, restart_changed: bool = False) -> int:
    """Queue every cell of the spec with no settled trial of the current fingerprint; refuse
    (UsageError, the differing keys named) cells whose settled trials were run otherwise,
    unless `restart_changed`. Returns how many cells were queued."""
    lock = FileLock(str(spec.out / ".enqueue.lock")) if spec.storage_url.startswith(("sqlite", "journal")) else None
    spec.out.mkdir(parents=True, exist_ok=True)
    prints = Fingerprints(spec)
    with lock or nullcontext():
        held: dict[str, list] = {}
        for t in study.get_trials(deepcopy=False):
            if _settled(t) and "cell" in t.user_attrs:
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


def tried(study: optuna.Study) -> list[dict]:
    """Every finished search trial: its settings, validation score (a pruned trial's last
    report) and state, so the board shows how each setting was chosen, not only the winner."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        value = t.value if t.state == TrialState.COMPLETE else \
            (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"params": t.params, "validation": value, "state": t.state.name.lower(),
                     "duration_s": (t.datetime_complete - t.datetime_start).total_seconds()})
    return rows


def _add_tried(entry: dict, storage, study_name: str) -> None:
    try:
        entry["tried"] = tried(optuna.load_study(study_name=study_name, storage=storage))
    except KeyError:  # the study is elsewhere (search.json came from the repository)
        pass


def best_search_params(spec: StudySpec) -> dict:
    """search.json's {task/method: settings}; {} before any search; a one-line error when cut."""
    path = spec.out / "search.json"
    if not path.exists():
        return {}
    try:
        best = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}): restore it (a leaderboard's copy is "
                         "committed beside its spec) or remove it to search again") from None
    if not isinstance(best, dict) or not all(isinstance(v, dict) for v in best.values()):
        raise UsageError(f"{path} is not a search record ({{task/method: settings}}): restore or remove it")
    return best


def result_attrs(result: dict, config: RunConfig, run_dir: Path) -> dict:
    """A finished cell's trial attributes: its `RunRecord` whole (`record`), where it ran, and
    the settings it ran with, from its `result.json` and its run config alone, so a cell
    committed to a board reads back exactly as it was written."""
    from peftbench.data import load_task

    return {"run_dir": str(Path(run_dir).resolve()),
            "record": RunRecord.model_validate(result).model_dump(mode="json"),
            "main_metric": load_task(config.task).main_metric, "model": config.model,
            "train_config": asdict(config.train), "method_params": config.method_params}


class NotStarted(UsageError):
    """A read-only command on a study that has no storage or no study yet."""


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
            summary, run_dir = run_experiment(config, progress=self.progress, score_cache=self.cache)
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


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    return out


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


SWEEP_FILES = ("study.db", "scores", "search-runs", ".enqueue.lock")  # names only a sweep writes


def claim_out(spec: StudySpec) -> Path:
    """The sweep's output folder, made and marked as peftbench's (`peftbench.ownership`) before
    anything is written there; a folder holding someone else's files is refused."""
    def looks_like_sweep(folder: Path) -> bool:  # a folder from before markers; never a board's
        return not (folder / "spec.yaml").exists() and any((folder / n).exists() for n in SWEEP_FILES)

    return ownership.claim(spec.out, "sweep", looks_like_sweep, what=f"study {spec.name!r} output folder")


def run_grid(spec: StudySpec, progress: bool = True, log=print, use_cache: bool = True,
             restart_changed: bool = False, on_complete=None) -> optuna.Study:
    """Work on the study until no cell is waiting or running; safe to run in N processes.
    `on_complete(trial)` is called with each cell this process finishes for good (completed,
    or diverged), as it finishes (a leaderboard commits the cell's files there)."""
    claim_out(spec)
    study = open_study(spec)
    added = enqueue_missing(study, spec, restart_changed=restart_changed)
    prints = Fingerprints(spec)
    log(f"study {spec.name!r} in {spec.storage_url}: {len(prints.cells)} cells, {added} queued now")
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
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
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


def run_workers(spec: StudySpec, argv: list[str], workers: int, restart_changed: bool = False,
                log=print, command: tuple[str, ...] = ("sweep",)) -> int:
    """Queue the spec's cells once, then run `workers` local `peftbench sweep` processes on the
    study (`argv`: the spec and the options they share), each with its share of the machine
    (`worker_environments`). Returns the worst exit code; Ctrl-C reaches every worker."""

    added = enqueue_missing(open_study(spec), spec, restart_changed=restart_changed)
    log(f"study {spec.name!r}: {added} cells queued")
    return spawn_workers(argv, workers, log, command)


def spawn_workers(argv: list[str], workers: int, log=print, command: tuple[str, ...] = ("sweep",)) -> int:
    """`workers` local `peftbench COMMAND ARGV` processes, each with its share of the machine
    (`worker_environments`); returns the worst exit code; Ctrl-C reaches every worker."""
    import subprocess

    environments = worker_environments(workers)
    log(f"starting {workers} worker(s) of `peftbench {' '.join(command)}`: "
        + "; ".join(" ".join(f"{k}={v}" for k, v in env.items() if k != "MKL_NUM_THREADS")
                    for env in environments))
    procs = [subprocess.Popen([sys.executable, "-m", "peftbench", *command, *argv],
                              env={**os.environ, **env}) for env in environments]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        codes = [p.wait() for p in procs]  # each worker got the Ctrl-C and saves its state
        raise
    return max(codes)


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


# --- search over training hyper-parameters -------------------------------------------------

def _suggest(trial: optuna.Trial, name: str, spec) -> object:
    """A spec entry {low, high, log?} / {choices: [...]} or an Optuna distribution."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(spec, dict):
        if "choices" in spec:
            return trial.suggest_categorical(name, spec["choices"])
        if isinstance(spec.get("low"), int) and isinstance(spec.get("high"), int) and not spec.get("log"):
            return trial.suggest_int(name, spec["low"], spec["high"])
        return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    if isinstance(spec, FloatDistribution):
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)
    if isinstance(spec, IntDistribution):
        return trial.suggest_int(name, spec.low, spec.high, log=spec.log, step=spec.step)
    if isinstance(spec, CategoricalDistribution):
        return trial.suggest_categorical(name, spec.choices)
    raise UsageError(f"search parameter {name!r}: cannot read {spec!r}")


def _choice_grid(params: dict) -> dict | None:
    """{name: choices} when every searched setting is a list of choices, else None."""
    if params and all("choices" in d for d in params.values()):
        return {name: list(d["choices"]) for name, d in params.items()}
    return None


def run_search(spec: StudySpec, log=print, mirror: Path | None = None) -> dict:
    """For each (task, method): TPE over the search space, or every combination once when each
    setting is a list of choices (a grid, as Chen et al. 2022 tune each method's learning rate),
    median pruning on the validation metric after each epoch. Writes and returns
    {task/method: {train: {...}, method: {...}}}, `search.json`, after every pair (and to
    `mirror` too: a leaderboard's committed copy); a pair already in it is not searched again."""
    if not spec.search:
        raise UsageError(f"study {spec.name!r} has no 'search:' section")
    search = spec.search
    budget = str(Budget.parse(search["budget"])) if search.get("budget") is not None else spec.budgets[0]
    claim_out(spec)
    best = best_search_params(spec)
    cache = ScoreCache(spec.out / "scores")
    storage = open_storage(spec)
    claims = SearchClaims(spec, mirror)
    updated = {}
    for key, entry in best.items():  # resumable across machines: search.json is the record
        log(f"search {key}: tuned already in {mirror or spec.out / 'search.json'} "
            "(remove its entry there to search again)")
        if "tried" not in entry:  # written before "tried" was recorded
            _add_tried(entry, storage, f"{spec.name}/search/{key}")
            updated[key] = entry
    if updated:
        with claims.lock:
            _write_search(spec, {**claims.merged(), **updated}, mirror)
    while (pair := claims.next()) is not None:  # several workers split the pairs between them
        task, method = pair
        cls = registry.get(method)
        space = dict(cls.search_space()) if search.get("method_params") else {}
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
                  if search.get("pruner", "median") == "median" else optuna.pruners.NopPruner())
        grid = _choice_grid(search.get("params", {})) if not space else None
        if grid is not None:  # every setting a list of choices: try each once (a grid)
            sampler = optuna.samplers.GridSampler(grid, seed=int(search.get("seed", 0)))
            n_trials = min(int(search.get("trials", 10)), math.prod(len(v) for v in grid.values()))
        else:
            sampler = optuna.samplers.TPESampler(seed=int(search.get("seed", 0)))
            n_trials = int(search.get("trials", 10))
        study = optuna.create_study(
            study_name=f"{spec.name}/search/{task}/{method}", storage=storage,
            direction="maximize", load_if_exists=True, pruner=pruner, sampler=sampler)
        params_space = search.get("params", {})

        def objective(trial: optuna.Trial) -> float:
            train = {n: _suggest(trial, n, d) for n, d in params_space.items()}
            params = {**spec.methods[method],
                      **{n: _suggest(trial, f"method.{n}", d) for n, d in space.items()}}

            def on_epoch(epoch: int, value: float) -> None:
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {epoch}: validation {value:.4f}")

            config = RunConfig(method=method, task=task,
                               budget="1" if not cls.uses_budget else budget,
                               seeds=list(search.get("seeds") or [spec.seeds[0]]),
                               model=spec.model, device=spec.device,
                               method_params=params, train=train_config(train, "search", method_train(spec, method)),
                               limit=spec.limit, output_dir=str(spec.out / "search-runs"))
            # several tuning seeds: the score is their mean, known only at the end, so no
            # per-epoch report (one seed's epoch is not the setting's value)
            summary, run_dir = run_experiment(config, progress=False, score_cache=cache,
                                              on_epoch=on_epoch if len(config.seeds) == 1 else None)
            trial.set_user_attr("run_dir", str(run_dir.resolve()))
            return summary["validation_main_mean"]

        def guarded(trial: optuna.Trial) -> float:  # a failure's reason kept with its trial
            try:
                return objective(trial)
            except optuna.TrialPruned:
                raise
            except Exception as err:
                trial.set_user_attr("failure", f"{type(err).__name__}: {err}".splitlines()[0][:300])
                raise

        done = (TrialState.COMPLETE, TrialState.PRUNED)
        study.optimize(guarded, n_trials=n_trials, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=done)])
        studies = [study]
        for value in widened(studies, grid, int(search.get("widen", 0))):
            (name, choice), = value.items()
            log(f"search {task}/{method}: best at the grid's edge; trying {name}={choice:g}")
            # a study of its own: Optuna keeps one set of choices per parameter and study
            extra = optuna.create_study(
                study_name=f"{spec.name}/search/{task}/{method}/widen/{name}={choice:g}",
                storage=storage, direction="maximize", load_if_exists=True,
                sampler=optuna.samplers.GridSampler({name: [choice]}))
            params_space = {name: {"choices": [choice]}}
            extra.optimize(guarded, n_trials=1, catch=(Exception,),
                           callbacks=[optuna.study.MaxTrialsCallback(1, states=done)])
            studies.append(extra)
        params_space = search.get("params", {})
        complete = [t for st in studies for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not complete:  # nothing to choose from: never an empty search.json and exit 0
            claims.release(f"{task}/{method}")
            failed = [t for st in studies for t in st.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
            reason = failed[0].user_attrs.get("failure", "") if failed else ""
            raise UsageError(f"search {task}/{method}: none of its {sum(len(st.trials) for st in studies)} "
                             f"trials completed{': ' + reason.splitlines()[0][:300] if reason else ''}; "
                             "fix the search space or the method's settings (search.json keeps the "
                             "pairs tuned so far)")
        winner = max(complete, key=lambda t: t.value)
        params = winner.params
        best = claims.record(f"{task}/{method}", {  # after every pair: an interruption keeps it
            "train": {k: v for k, v in params.items() if not k.startswith("method.")},
            "method": {k[len("method."):]: v for k, v in params.items() if k.startswith("method.")},
            "validation": winner.value, "trials": sum(len(st.trials) for st in studies),
            "tried": [row for st in studies for row in tried(st)],
            "seeds": list(search.get("seeds") or [spec.seeds[0]])})
        log(f"search {task}/{method}: best validation {winner.value:.4f} with {params}")
    return claims.merged()


class SearchClaims:
    """Which (task, method) pairs of a search are tuned, taken or free, shared by every search
    worker on this output folder: under a file lock, a worker takes the first pair that is
    neither in search.json nor claimed by a live worker (`search-claims.json`; a dead local
    worker's claim is taken over), and records its result by merging it into search.json as it
    is on disk then (and into the board's committed copy, `mirror`), so workers never overwrite
    each other's pairs. One worker takes the pairs in the spec's order, as before."""

    def __init__(self, spec: StudySpec, mirror: Path | None):
        self.spec, self.mirror = spec, mirror
        self.path = spec.out / "search-claims.json"
        self.lock = FileLock(str(spec.out / "search.lock"))
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.pairs = [f"{t}/{m}" for t in spec.tasks for m in spec.methods]

    def _claims(self) -> dict[str, str]:
        try:
            claims = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        host = socket.gethostname()
        return {k: v for k, v in claims.items()
                if not (v.rpartition(":")[0] == host and v.rpartition(":")[2].isdigit()
                        and not _alive(int(v.rpartition(":")[2])))}

    def _write_claims(self, claims: dict[str, str]) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(claims, indent=2))
        tmp.replace(self.path)

    def merged(self) -> dict:
        """search.json as on disk, with the board's copy merged in (never an entry lost)."""
        best = {}
        if self.mirror is not None and self.mirror.is_file():
            best.update(json.loads(self.mirror.read_text()))
        best.update(best_search_params(self.spec))
        return best

    def next(self) -> tuple[str, str] | None:
        with self.lock:
            best, claims = self.merged(), self._claims()
            for key in self.pairs:
                if key not in best and claims.get(key, self.me) == self.me:
                    claims[key] = self.me
                    self._write_claims(claims)
                    task, method = key.split("/", 1)
                    return task, method
        return None

    def release(self, key: str) -> None:
        with self.lock:
            claims = self._claims()
            claims.pop(key, None)
            self._write_claims(claims)

    def record(self, key: str, entry: dict) -> dict:
        with self.lock:
            best = {**self.merged(), key: entry}
            _write_search(self.spec, best, self.mirror)
            claims = self._claims()
            claims.pop(key, None)
            self._write_claims(claims)
            return best


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


def _write_search(spec: StudySpec, best: dict, mirror: Path | None = None) -> None:
    spec.out.mkdir(parents=True, exist_ok=True)
    for path in [spec.out / "search.json", *([mirror] if mirror else [])]:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(best, indent=2))
        tmp.replace(path)


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
    """Completed grid trials as the analysis frame (`record.analysis_row`, as `report.load_runs`
    builds it from run folders), one row per (task, method, budget, seed), plus the trial's
    number, fingerprint and duration; with `prints`, only the current spec's cells run with its
    settings."""
    import pandas as pd

    from peftbench.record import analysis_row

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

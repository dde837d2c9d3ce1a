"""The study spec: its schema (one pydantic model per section, checked on load), the `StudySpec` it
becomes, and the grid of cells it stands for, each with the run config and the configuration its
fingerprint is taken of."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
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

from peftbench import registry, yamlio
from peftbench.errors import UsageError, schema_problem
from peftbench.experiment import RunConfig
from peftbench.fingerprint import code_identity, model_fingerprint
from peftbench.record import NATURAL
from peftbench.selector import Budget
from peftbench.trainer import TrainConfig, train_config

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

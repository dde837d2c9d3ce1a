"""The study spec: `StudySpec`, the pydantic model a spec file is validated into and the object
used at run time, and the grid of cells it stands for, each with its run config and the
configuration its fingerprint is taken of."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic import Field as PydanticField

from peftbench.contract import registry
from peftbench.contract.selector import Budget
from peftbench.contract.settings import TrainConfig, fingerprinted, train_config
from peftbench.core import yamlio
from peftbench.core.errors import UsageError, schema_problem
from peftbench.training.experiment import RunConfig
from peftbench.training.identity import code_identity, model_fingerprint
from peftbench.training.record import NATURAL

TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


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
    if path.is_dir():
        raise UsageError(f"study spec {path} is a folder, not a spec YAML (to read run directories: "
                         f"peftbench report --runs {path})")
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


class FrozenSpec(BaseModel):
    """The `frozen:` section of a board whose cells were made by code that has since changed:
    read back from its committed cells as they are, never run again (`leaderboard.frozen_cells`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: StrictStr = PydanticField(min_length=1)  # the peftbench version its cells were made with
    reason: StrictStr = PydanticField(min_length=1)  # what changed since, in a sentence
    see: StrictStr | None = None  # the board that supersedes it


class JoinedMethod(BaseModel):
    """A `joined:` entry: a method added to a built board (`peftbench leaderboard join`), run
    under the board's rules; it is one of `methods` from then on."""

    model_config = ConfigDict(extra="forbid", strict=True)
    method: StrictStr = PydanticField(min_length=1)
    params: dict[StrictStr, Any] = {}
    date: StrictStr
    peftbench: StrictStr


class SearchSpec(BaseModel):
    """The `search:` section: what to tune per (task, method), how, on which seeds."""

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
    # the check that carrying the setting tuned at `budget` to the spec's other budgets costs
    # little: at each of them, on these seeds, the carried value and its two grid neighbours
    # (`carry.json`, `peftbench leaderboard run` after the grid)
    carry_check: list[NonNegativeInt] | None = PydanticField(default=None, min_length=1)
    # each budget other than `budget` tuned on its own, from the carry check: its three values
    # (their `carry_check` seeds read back, the other `seeds` trained), widened by the edge
    # rule, chosen by the mean validation over `seeds` (`per-budget.json`); the grid runs each
    # budget at its own setting
    per_budget: StrictBool = False

    @model_validator(mode="after")
    def _widen_needs_one_numeric_grid(self):
        if self.carry_check and self.budget is None:
            raise ValueError("carry_check needs 'budget': the budget the setting is tuned at and "
                             "carried from")
        if self.per_budget and not (self.carry_check and self.seeds
                                    and set(self.carry_check) <= set(self.seeds)):
            raise ValueError("per_budget starts from the carry check: it needs carry_check seeds "
                             f"that are among the search's seeds (carry_check: {self.carry_check}, "
                             f"seeds: {self.seeds})")
        if self.widen or self.carry_check:
            grids = [d for d in self.params.values() if isinstance(d, _Choices)]
            if len(self.params) != 1 or not grids or len(grids[0].choices) < 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                    for v in grids[0].choices):
                raise ValueError(f"{'widen' if self.widen else 'carry_check'} needs exactly one "
                                 "searched setting given as at least two positive numeric choices "
                                 "(e.g. lr: {choices: [1e-4, 1e-3]})")
        return self

    @field_validator("params")
    @classmethod
    def _train_settings(cls, value):
        allowed = sorted(TRAIN_KEYS)
        for name in value:
            if name not in TRAIN_KEYS:
                raise ValueError(f"search param {name!r} is not a train setting ({allowed})")
        return value


def _as_list(value):
    """A single value where a list is allowed (`tasks: rte`, `budgets: 0.005`) as a list."""
    return value if isinstance(value, list) else [value]


def _methods(value):
    """`methods` as {name: parameters}: a list of names, or a mapping (None: no parameters)."""
    if isinstance(value, list):
        if len(set(map(str, value))) < len(value):
            raise ValueError(f"a method is listed twice in 'methods': {value}")
        return {name: {} for name in value}
    if isinstance(value, dict):
        return {name: {} if params is None else params for name, params in value.items()}
    return value


def _budgets(value):
    """Budgets as their canonical strings (`Budget.parse`), each named once."""
    raw = _as_list(value)
    for b in raw:
        if isinstance(b, bool) or not isinstance(b, (int, float, str)):
            raise ValueError(f"budget {b!r} is not a number: give fractions in (0, 1] or counts")
    parsed = [str(Budget.parse(b)) for b in raw]
    if len(set(parsed)) < len(parsed):
        raise ValueError(f"budgets {raw} name the same budget twice (as numbers: {parsed})")
    return parsed


MAX_SEEDS = 1000  # a board of more seeds per cell is a typo, not a plan (and a list that size)


def _seeds(value):
    """`seeds: N` as seeds 0 .. N-1 (0 < N <= MAX_SEEDS); a list as given, each seed once."""
    if type(value) is int:
        if not 0 < value <= MAX_SEEDS:
            raise ValueError(f"seeds {value}: give a count from 1 to {MAX_SEEDS} or a list of seeds")
        return list(range(value))
    if isinstance(value, list) and len(value) > MAX_SEEDS:
        raise ValueError(f"seeds: {len(value)} seeds; at most {MAX_SEEDS}")
    if isinstance(value, list) and len(set(map(str, value))) < len(value):
        raise ValueError(f"seeds {value} repeat a seed")
    return value


def _train(value):
    """`train:` as a validated TrainConfig (unknown keys and bad values named)."""
    return train_config(value, "train") if isinstance(value, dict) else value


def _not_empty(value):
    if not value:
        raise ValueError("must not be empty")
    return value


class StudySpec(BaseModel):
    """A study spec file (README "Sweeps"), validated on load and used as it is at run time:
    which cells to run, how to train, where to store. Every key typed strictly (`seeds: "3"` is
    refused, not read as seed 3), unknown keys refused; shorthands are normalised on the way in
    (`tasks: rte` -> [rte], `methods: [a, b]` -> {a: {}, b: {}}, `budgets: 0.005` -> ['0.005'],
    `seeds: 3` -> [0, 1, 2], `train: {...}` -> TrainConfig)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: StrictStr = PydanticField(min_length=1)
    tasks: Annotated[list[StrictStr], BeforeValidator(_as_list)] = PydanticField(min_length=1)
    methods: Annotated[dict[StrictStr, dict[StrictStr, Any]], BeforeValidator(_methods)] = PydanticField(min_length=1)
    budgets: Annotated[list[StrictStr], BeforeValidator(_budgets), AfterValidator(_not_empty)] = ["0.005"]
    seeds: Annotated[list[NonNegativeInt], BeforeValidator(_seeds), AfterValidator(_not_empty)] = [0]
    model: StrictStr = "default"
    train: Annotated[TrainConfig, BeforeValidator(_train)] = PydanticField(default_factory=TrainConfig)
    # method -> train settings that replace `train`'s for that method (e.g. its learning rate)
    method_train: dict[StrictStr, dict[StrictStr, Any]] = {}
    limit: PositiveInt | None = None
    device: StrictStr = "auto"
    storage: StrictStr | None = None  # default: sqlite:///<output_dir>/study.db
    output_dir: StrictStr | None = None  # default: sweeps/<name>
    # seconds a cell may run before it is ended as failed for good (a hung score or select would
    # otherwise hold a worker forever: its heartbeat keeps the trial alive); None: no limit
    cell_time_limit: PositiveInt | None = None
    heartbeat_interval: PositiveInt = 30
    grace_period: PositiveInt = 120
    search: SearchSpec | None = None
    published: dict[StrictStr, dict[StrictStr, StrictStr]] | None = None  # {task: {method: "mean[r]±std[r]"}}
    method_notes: dict[StrictStr, StrictStr] = {}  # method -> how it departs from the paper's variant
    description: StrictStr = ""
    protocol: StrictStr = ""  # Markdown: how the protocol was chosen and what was cut (board README)
    machine: StrictStr = ""
    # the pre-declared comparison families (report `comparisons`): each method against each of
    # these at every budget, Holm within (budget, reference); None: not declared in the spec
    compare_against: list[StrictStr] | None = None
    frozen: FrozenSpec | None = None
    # a board whose committed cells.csv this one's means are set beside, cell by cell (the same
    # rows before a change of the code: `before-after.csv`)
    before: StrictStr | None = None
    joined: list[JoinedMethod] = []  # methods added after the board was built, in order
    # frozen boards: cell key -> the committed fingerprint proven to be this spec's (set on load)
    _accepted: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self):
        # Optuna fails a trial whose heartbeat is older than grace_period: a grace shorter than
        # two beats fails live trials of busy workers (seen: a cell trained twice)
        if self.grace_period < 2 * self.heartbeat_interval:
            raise ValueError(f"grace_period {self.grace_period} must be at least twice "
                             f"heartbeat_interval {self.heartbeat_interval}")
        from peftbench.data.tasks import load_task

        for entry in self.joined:
            if entry.method in self.methods:
                raise ValueError(f"joined: {entry.method!r} is already one of the board's methods")
            self.methods[entry.method] = dict(entry.params)
        for name, params in self.methods.items():
            registry.create(name, **params)  # unknown method or bad parameter: a clear error now
        from peftbench.data.spec import SAFE_NAME

        if not SAFE_NAME.fullmatch(self.name):  # it names sweeps/<name> and Optuna's studies
            raise ValueError(f"name {self.name!r} is not file-safe: use letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit")
        names = [load_task(task).name for task in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # one task twice would queue every cell of it twice
            raise ValueError(f"tasks {self.tasks} name the task(s) {repeated} more than once")
        for name in self.compare_against or []:
            if name not in self.methods:
                raise ValueError(f"compare_against: {name!r} is not in 'methods' ({sorted(self.methods)})")
        for name, values in self.method_train.items():
            if name not in self.methods:
                raise ValueError(f"method_train.{name}: {name!r} is not in 'methods' ({sorted(self.methods)})")
            train_config(values, f"method_train.{name}", self.train)  # names a bad key now
        return self

    @property
    def out(self) -> Path:
        return Path(self.output_dir or Path("sweeps") / self.name)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.out / 'study.db'}"


def parse_spec(raw: dict, where: str = "spec") -> StudySpec:
    """The `StudySpec` of a spec file's contents, or one UsageError line naming the key."""
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise UsageError(f"{where}: {schema_problem(err, raw, StudySpec)[1]}") from None


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
    method), with the search's best values over those if any: `best`'s entry for the cell's
    budget (`task/method/budget`, a per-budget search) before its (task, method) one."""
    tuned = best.get(f"{cell.task}/{cell.method}/{cell.budget}") or best.get(f"{cell.task}/{cell.method}", {})
    return RunConfig(method=cell.method, task=cell.task,
                     budget="1" if cell.budget == NATURAL else cell.budget, seeds=[cell.seed],
                     model=spec.model, device=spec.device,
                     method_params={**spec.methods[cell.method], **tuned.get("method", {})},
                     train=train_config(tuned.get("train", {}), "search.json", method_train(spec, cell.method)),
                     limit=spec.limit,
                     output_dir=str(spec.out / "runs"))


def cell_config(config: RunConfig) -> dict:
    """Everything that determines a cell's result besides its key (task, method, budget, seed)."""
    from peftbench.data.tasks import load_task

    return {"model": model_fingerprint(config.model), "model_name": config.model,
            "task_files": load_task(config.task).digests(),
            "train": fingerprinted(asdict(config.train)),
            "method_params": config.method_params,
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

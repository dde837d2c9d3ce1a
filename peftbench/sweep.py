"""Sweeps: a YAML study spec run as an Optuna study, resumable, by one worker or many.

Grid (leaderboards): every cell (task, method, budget, seed) is enqueued once as a WAITING trial
of a two-objective study (maximise the test metric of the best-validation checkpoint, minimise
trainable parameters), so `study.best_trials` is the Pareto front. Workers pop WAITING trials; the
sampler is never consulted. Why not `GridSampler`: with several workers it may hand the same
point out twice (documented by Optuna); a queue of enqueued trials is claimed once each.

Exactly once, resumable:
- a cell is enqueued only if no trial of it is WAITING, RUNNING or COMPLETE, so running the same
  command again resumes: completed cells are kept, failed or interrupted (Ctrl-C) cells are
  queued again;
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

import json
from contextlib import nullcontext
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import optuna
import yaml
from filelock import FileLock
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from peftbench import registry
from peftbench.cache import ScoreCache
from peftbench.errors import UsageError
from peftbench.experiment import RunConfig, run_experiment
from peftbench.selector import Budget
from peftbench.trainer import TrainConfig

NATURAL = "natural"  # the budget label of methods with a natural count (`uses_budget = False`)
SPEC_KEYS = {"name", "description", "model", "tasks", "methods", "budgets", "seeds", "train",
             "limit", "device", "storage", "output_dir", "heartbeat_interval", "grace_period",
             "search", "published", "machine"}
SEARCH_KEYS = {"trials", "params", "method_params", "pruner", "seed", "budget"}
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
    limit: int | None = None
    device: str = "auto"
    storage: str | None = None  # default: sqlite:///<output_dir>/study.db
    output_dir: str | None = None  # default: sweeps/<name>
    heartbeat_interval: int = 30
    grace_period: int = 120
    search: dict | None = None
    published: dict | None = None  # leaderboards: {task: {method: [mean, std]}}
    description: str = ""
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
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"study spec {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"study spec {path}: the top level must be a mapping")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_spec(raw, str(path))


def parse_spec(raw: dict, where: str = "spec") -> StudySpec:
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    for key in ("name", "tasks", "methods"):
        if not raw.get(key):
            raise UsageError(f"{where}: '{key}' is required")
    methods = raw["methods"]
    if isinstance(methods, list):
        methods = {m: {} for m in methods}
    if not isinstance(methods, dict):
        raise UsageError(f"{where}: 'methods' must be a list of names or a mapping name -> params")
    methods = {str(m): dict(p or {}) for m, p in methods.items()}
    for name, params in methods.items():
        registry.create(name, **params)  # unknown method or bad parameter: a clear error now
    tasks = [raw["tasks"]] if isinstance(raw["tasks"], str) else list(raw["tasks"])
    from peftbench.data import load_task

    for task in tasks:
        load_task(task)
    budgets = raw.get("budgets", ["0.005"])
    budgets = [str(b) for b in (budgets if isinstance(budgets, list) else [budgets])]
    for b in budgets:
        Budget.parse(b)
    seeds = raw.get("seeds", 1)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    train = raw.get("train") or {}
    bad = set(train) - TRAIN_KEYS
    if bad:
        raise UsageError(f"{where}: unknown train settings {sorted(bad)}; allowed: {sorted(TRAIN_KEYS)}")
    search = raw.get("search")
    if search is not None:
        bad = set(search) - SEARCH_KEYS
        if bad:
            raise UsageError(f"{where}: unknown search keys {sorted(bad)}; allowed: {sorted(SEARCH_KEYS)}")
        for name in search.get("params", {}):
            if name not in TRAIN_KEYS:
                raise UsageError(f"{where}: search param {name!r} is not a train setting "
                                 f"({sorted(TRAIN_KEYS)})")
    return StudySpec(
        name=str(raw["name"]), tasks=tasks, methods=methods, budgets=budgets, seeds=seeds,
        model=raw.get("model", "default"), train=TrainConfig(**train), limit=raw.get("limit"),
        device=raw.get("device", "auto"), storage=raw.get("storage"), output_dir=raw.get("output_dir"),
        heartbeat_interval=int(raw.get("heartbeat_interval", 30)),
        grace_period=int(raw.get("grace_period", 120)), search=search,
        published=raw.get("published"), description=raw.get("description", ""),
        machine=raw.get("machine", ""))


def cells(spec: StudySpec) -> list[Cell]:
    """The grid; methods with a natural count (`uses_budget = False`) run once per seed."""
    out = []
    for task in spec.tasks:
        for method in spec.methods:
            uses = registry.get(method).uses_budget
            for budget in (spec.budgets if uses else [NATURAL]):
                out.extend(Cell(task, method, budget, seed) for seed in spec.seeds)
    return out


def open_storage(spec: StudySpec):
    """An Optuna storage for the spec's URL: RDB (with heartbeat) or `journal:<path>`."""
    url = spec.storage_url
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
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


def open_study(spec: StudySpec, storage=None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.name, storage=storage or open_storage(spec),
                                directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["test_metric", "trainable"])
    return study


def enqueue_missing(study: optuna.Study, spec: StudySpec) -> int:
    """Queue every cell with no WAITING, RUNNING or COMPLETE trial; returns how many."""
    lock = FileLock(str(spec.out / ".enqueue.lock")) if spec.storage_url.startswith(("sqlite", "journal")) else None
    spec.out.mkdir(parents=True, exist_ok=True)
    with lock or nullcontext():
        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        present = {t.user_attrs.get("cell") for t in study.get_trials(deepcopy=False, states=live)}
        missing = [c for c in cells(spec) if c.key not in present]
        for cell in missing:
            study.enqueue_trial({}, user_attrs=cell.attrs())
    return len(missing)


def best_search_params(spec: StudySpec) -> dict:
    path = spec.out / "search.json"
    return json.loads(path.read_text()) if path.exists() else {}


class GridObjective:
    """Runs one queued cell; returns (test main metric, trainable count)."""

    def __init__(self, spec: StudySpec, cache: ScoreCache, progress: bool = False):
        self.spec, self.cache, self.progress = spec, cache, progress
        self.best = best_search_params(spec)

    def __call__(self, trial: optuna.Trial):
        attrs = trial.user_attrs
        if "cell" not in attrs:  # the queue emptied between our check and Optuna's pop
            raise optuna.TrialPruned("no queued cell left")
        twin = self._twin(trial, attrs["cell"])
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"cell {attrs['cell']} is run by trial {twin}")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        tuned = self.best.get(f"{attrs['task']}/{attrs['method']}", {})
        train = replace(self.spec.train, **tuned.get("train", {}))
        params = {**self.spec.methods[attrs["method"]], **tuned.get("method", {})}
        config = RunConfig(method=attrs["method"], task=attrs["task"],
                           budget="1" if attrs["budget"] == NATURAL else attrs["budget"],
                           seeds=[attrs["seed"]], model=self.spec.model, device=self.spec.device,
                           method_params=params, train=train, limit=self.spec.limit,
                           output_dir=str(self.spec.out / "runs"))
        summary, run_dir = run_experiment(config, progress=self.progress, score_cache=self.cache)
        result = json.loads((run_dir / f"seed-{attrs['seed']}" / "result.json").read_text())
        for key, value in {
            "run_dir": str(run_dir.resolve()), "test": result["test"], "validation": result["validation"],
            "trainable": result["trainable"]["trainable"], "head": result["trainable"]["head"],
            "pretrained_entries": result["pretrained_entries"], "main_metric": summary["main_metric"],
            "scoring_time_s": result["scoring_time_s"], "scores_from_cache": result["scores_from_cache"],
            "train_time_s": result["train_time_s"], "spend": result["trainable_by_tensor"], "train_config": asdict(train),
            "method_params": params,
        }.items():
            trial.set_user_attr(key, value)
        return result["test"]["main"], result["trainable"]["trainable"]

    @staticmethod
    def _twin(trial: optuna.Trial, cell: str) -> int | None:
        """A trial of the same cell that completed, or is running with a lower number."""
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.user_attrs.get("cell") == cell and t.number != trial.number and (
                    t.state == TrialState.COMPLETE or t.number < trial.number):
                return t.number
        return None


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    return out


def progress_line(study: optuna.Study, total_cells: int) -> str:
    """'12/36 cells done, 1 running, 0 failed, 23 waiting; ETA 25 min' for the live view."""
    trials = study.get_trials(deepcopy=False)
    done = {t.user_attrs.get("cell") for t in trials if t.state == TrialState.COMPLETE}
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    times = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
             if t.state == TrialState.COMPLETE and "run_dir" in t.user_attrs]
    left = total_cells - len(done)
    eta = ""
    if times and left:
        seconds = sum(times) / len(times) * left / max(running, 1)
        eta = f"; ETA {seconds / 60:.0f} min" if seconds >= 60 else f"; ETA {seconds:.0f} s"
    return (f"{len(done)}/{total_cells} cells done, {running} running, {failed} failed, "
            f"{waiting} waiting{eta}")


def run_grid(spec: StudySpec, progress: bool = True, log=print) -> optuna.Study:
    """Work on the study until no cell is waiting or running; safe to run in N processes."""
    study = open_study(spec)
    added = enqueue_missing(study, spec)
    total = len(cells(spec))
    log(f"study {spec.name!r} in {spec.storage_url}: {total} cells, {added} queued now")
    cache = ScoreCache(spec.out / "scores")
    objective = GridObjective(spec, cache, progress=False)
    heartbeat = is_heartbeat_enabled(study._storage)
    told_waiting = False
    while True:
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        state = counts(study)
        if state["waiting"]:
            told_waiting = False
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            if progress:
                log(_trial_line(study, total))
        elif state["running"]:
            if not told_waiting:
                log(f"waiting for {state['running']} running trial(s): other workers, or lost ones "
                    f"that turn stale {spec.grace_period} s after their last heartbeat")
                told_waiting = True
            time.sleep(min(spec.heartbeat_interval, 5))
        else:
            break
    log(progress_line(study, total))
    return study


def _trial_line(study: optuna.Study, total: int) -> str:
    mine = [t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("worker") == f"{socket.gethostname()}:{os.getpid()}"
            and t.state.is_finished()]
    if not mine:
        return progress_line(study, total)
    t = max(mine, key=lambda t: t.datetime_complete)
    what = (f"{'+'.join(t.user_attrs['main_metric'])}={t.values[0]:.4f}, trainable {int(t.values[1]):,}"
            if t.state == TrialState.COMPLETE else t.state.name.lower())
    return f"[{progress_line(study, total)}] {t.user_attrs['cell']}: {what}"


# --- search over training hyper-parameters -------------------------------------------------

def _suggest(trial: optuna.Trial, name: str, spec) -> object:
    """A spec entry {low, high, log?} / {choices: [...]} or an Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

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


def run_search(spec: StudySpec, log=print) -> dict:
    """For each (task, method): TPE over the search space, median pruning on the validation
    metric after each epoch. Writes and returns {task/method: {train: {...}, method: {...}}}."""
    if not spec.search:
        raise UsageError(f"study {spec.name!r} has no 'search:' section")
    search = spec.search
    n_trials = int(search.get("trials", 10))
    budget = str(search.get("budget", spec.budgets[0]))
    best = best_search_params(spec)
    cache = ScoreCache(spec.out / "scores")
    storage = open_storage(spec)
    for task in spec.tasks:
        for method in spec.methods:
            cls = registry.get(method)
            space = dict(cls.search_space()) if search.get("method_params") else {}
            pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
                      if search.get("pruner", "median") == "median" else optuna.pruners.NopPruner())
            study = optuna.create_study(
                study_name=f"{spec.name}/search/{task}/{method}", storage=storage,
                direction="maximize", load_if_exists=True, pruner=pruner,
                sampler=optuna.samplers.TPESampler(seed=int(search.get("seed", 0))))

            def objective(trial: optuna.Trial) -> float:
                train = {n: _suggest(trial, n, d) for n, d in search.get("params", {}).items()}
                params = {**spec.methods[method],
                          **{n: _suggest(trial, f"method.{n}", d) for n, d in space.items()}}

                def on_epoch(epoch: int, value: float) -> None:
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"epoch {epoch}: validation {value:.4f}")

                config = RunConfig(method=method, task=task,
                                   budget="1" if not cls.uses_budget else budget,
                                   seeds=[spec.seeds[0]], model=spec.model, device=spec.device,
                                   method_params=params, train=replace(spec.train, **train),
                                   limit=spec.limit, output_dir=str(spec.out / "search-runs"))
                summary, run_dir = run_experiment(config, progress=False, score_cache=cache,
                                                  on_epoch=on_epoch)
                trial.set_user_attr("run_dir", str(run_dir.resolve()))
                return summary["validation_main_mean"]

            done = (TrialState.COMPLETE, TrialState.PRUNED)
            study.optimize(objective, n_trials=n_trials, catch=(Exception,),
                           callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=done)])
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not complete:
                log(f"search {task}/{method}: no trial completed")
                continue
            params = study.best_trial.params
            best[f"{task}/{method}"] = {
                "train": {k: v for k, v in params.items() if not k.startswith("method.")},
                "method": {k[len("method."):]: v for k, v in params.items() if k.startswith("method.")},
                "validation": study.best_value, "trials": len(study.trials)}
            log(f"search {task}/{method}: best validation {study.best_value:.4f} with {params}")
    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "search.json").write_text(json.dumps(best, indent=2))
    return best


def watch(spec: StudySpec, every: float = 10.0, once: bool = False, stream=None) -> None:
    """The live view: one refreshed line per `every` seconds until nothing is waiting or running."""
    stream = stream or sys.stdout
    study = open_study(spec)
    total = len(cells(spec))
    while True:
        line = progress_line(study, total)
        state = counts(study)
        if once or not (state["waiting"] or state["running"]):
            print(line, file=stream)
            return
        print("\r" + line.ljust(100), end="", file=stream, flush=True)
        time.sleep(every)


def _spend(attrs: dict) -> dict[str, int]:
    """Trainable entries per tensor: from the run directory when it is on this machine."""
    result = Path(attrs["run_dir"]) / f"seed-{attrs['seed']}" / "result.json"
    if result.is_file():
        return json.loads(result.read_text()).get("trainable_by_tensor", {})
    return attrs.get("spend", {})


def trials_frame(study: optuna.Study):
    """Completed grid trials as a DataFrame: one row per (task, method, budget, seed)."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if "run_dir" not in a:
            continue
        rows.append({"task": a["task"], "method": a["method"], "budget": a["budget"],
                     "seed": a["seed"], "metric": a["test"]["main"],
                     "validation": a["validation"]["main"], "trainable": a["trainable"],
                     "pretrained_entries": a["pretrained_entries"], "scoring_time_s": a["scoring_time_s"],
                     "train_time_s": a["train_time_s"], "run_dir": a["run_dir"],
                     "spend": _spend(a), "trial": t.number,
                     "duration_s": (t.datetime_complete - t.datetime_start).total_seconds()})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.drop_duplicates(["task", "method", "budget", "seed"], keep="first")
    return frame



def finished_frame(spec: StudySpec):
    """`trials_frame` of the spec's study; a clear error when nothing has finished yet."""
    frame = trials_frame(open_study(spec))
    if frame.empty:
        raise UsageError(f"study {spec.name!r} in {spec.storage_url} has no finished trial yet")
    return frame

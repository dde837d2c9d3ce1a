"""The search over training hyper-parameters, per (task, method): a grid of choices or TPE, median
pruning, edge widening, pairs split between workers; its best settings in `search.json`."""
from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from peftbench import __version__, experiment, registry
from peftbench.cache import ScoreCache
from peftbench.errors import UsageError
from peftbench.experiment import RunConfig
from peftbench.selector import Budget
from peftbench.sweep.spec import StudySpec, method_train
from peftbench.sweep.storage import _alive, claim_out, open_storage
from peftbench.trainer import train_config


def tried(study: optuna.Study) -> list[dict]:
    """Every finished search trial: its settings, validation score (a pruned trial's last
    report) and state, so the board shows how each setting was chosen, not only the winner."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        value = t.value if t.state == TrialState.COMPLETE else \
            (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"params": t.params, "validation": value, "state": t.state.name.lower(),
                     "duration_s": t.user_attrs.get("duration_s",  # a replayed trial: its first run's
                                                    (t.datetime_complete - t.datetime_start).total_seconds())})
    return rows


def method_study(name: str, method: str) -> str:
    """The Optuna study of a search key, named by its method's source as well (`@` and the
    digest's first 12 characters): trials a changed method made stay in their own study, so a
    resumed search never counts them as this code's (its trial log checks the same digest)."""
    return f"{name}@{method_code(method)[:12]}"


def _add_tried(entry: dict, storage, study_name: str, method: str) -> None:
    for name in (method_study(study_name, method), study_name):  # named by the code, or from before
        try:
            entry["tried"] = tried(optuna.load_study(study_name=name, storage=storage))
            return
        except KeyError:  # the study is elsewhere (search.json came from the repository)
            pass


def best_search_params(spec: StudySpec) -> dict:
    """search.json's {task/method: settings}; {} before any search; a one-line error when cut."""
    return read_record(spec.out / "search.json")


PER_BUDGET = "per-budget.json"


def tuned_settings(spec: StudySpec) -> dict:
    """Every tuned setting the grid runs at: search.json's {task/method: entry}, and with
    `search.per_budget` the per-budget search's {task/method/budget: entry} (per-budget.json),
    which `cell_run_config` takes before the (task, method) one."""
    best = best_search_params(spec)
    if spec.search and spec.search.per_budget:
        best.update(read_record(spec.out / PER_BUDGET))
    return best


def untuned(spec: StudySpec, best: dict) -> list[str]:
    """The search keys the grid waits for: (task, method) pairs not in search.json and, with
    `search.per_budget`, (task, method, budget) keys not in per-budget.json yet."""
    if not spec.search:
        return []
    pairs = [f"{t}/{m}" for t in spec.tasks for m in spec.methods]
    return [k for k in pairs + (carry_keys(spec) if spec.search.per_budget else []) if k not in best]


def read_record(path: Path) -> dict:
    """A search record (search.json, carry.json, per-budget.json): {key: entry}; {} when absent.
    Only the entries the method's code as it is now made (`current_entries`)."""
    return current_entries(_read_keyed(path, dict, "a search record ({key: settings})", "search again"))


def method_code(method: str) -> str:
    """The source digest of `method`: what keys its cells, its search entries and its trial-log
    rows (a search key `task/method[/budget]` names its method second)."""
    from peftbench.fingerprint import code_identity

    return code_identity(method, strict=False)["source"]


def current_entries(record: dict) -> dict:
    """`record` without the entries another source of their method made (their `code` differs):
    such a key is searched again, as its cells run again. An entry without `code` (recorded
    before entries carried it) is kept; so is one of a method not installed here."""
    out = {}
    for key, entry in record.items():
        code = entry.get("code") if isinstance(entry, dict) else None
        try:
            if code is not None and code != method_code(key.split("/")[1]):
                continue
        except (UsageError, KeyError):
            pass
        out[key] = entry
    return out


def read_trial_log(path: Path) -> dict[str, list[dict]]:
    """A trial log ({key: [row, ...]}, `TrialLog`); {} when absent."""
    return _read_keyed(path, list, "a trial log ({key: [trial, ...]})", "train its trials again")


def _read_keyed(path: Path, value_type: type, shape: str, remedy: str) -> dict:
    """{key: value} JSON beside a board; {} when absent; a one-line error when cut or not `shape`."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}): restore it (a leaderboard's copy is "
                         f"committed beside its spec) or remove it to {remedy}") from None
    if not isinstance(record, dict) or not all(isinstance(v, value_type) for v in record.values()):
        raise UsageError(f"{path} is not {shape}: restore or remove it")
    return record


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
    spec_space = {name: d.model_dump() for name, d in search.params.items()}  # {low, high, log} / {choices}
    claim_out(spec)
    best = best_search_params(spec)
    cache = ScoreCache(spec.out / "scores")
    storage = open_storage(spec)
    claims = SearchClaims(spec, mirror)
    updated = {}
    if best:  # resumable across machines: search.json is the record
        log(f"search: {len(best)} of {len(claims.pairs)} (task, method) pairs tuned already in "
            f"{mirror or spec.out / 'search.json'} (remove an entry there to search it again): "
            + ", ".join(best))
    for key, entry in best.items():
        if "tried" not in entry:  # written before "tried" was recorded
            _add_tried(entry, storage, f"{spec.name}/search/{key}", key.split("/")[1])
            updated[key] = entry
    if updated:
        with claims.lock:
            _write_search(spec, {**claims.merged(), **updated}, mirror)
    while (key := claims.next()) is not None:  # several workers split the pairs between them
        task, method = key.split("/", 1)
        log(f"search {key}: started; {len(claims.merged())} of {len(claims.pairs)} pairs tuned so far")
        try:
            entry = _tune(spec, task, method, search_budget(spec), spec_space, list(search.seeds or [spec.seeds[0]]),
                          f"{spec.name}/search/{task}/{method}", search.widen, storage, cache, log,
                          label=f"search {key}", trials=claims.trials(key))
        except UsageError:
            claims.release(f"{task}/{method}")
            raise
        claims.record(f"{task}/{method}", entry)  # after every pair: an interruption keeps it
        log(f"search {task}/{method}: best validation {entry['validation']:.4f} with "
            f"{ {**entry['train'], **{'method.' + k: v for k, v in entry['method'].items()}} }")
    return claims.merged()


def search_budget(spec: StudySpec) -> str:
    """The budget the search tunes at: `search.budget`, else the spec's first budget."""
    budget = spec.search.budget
    return str(Budget.parse(budget)) if budget is not None else spec.budgets[0]


def _tune(spec: StudySpec, task: str, method: str, budget: str, spec_space: dict, seeds: list[int],
          study_name: str, widen: int, storage, cache: ScoreCache, log,
          known: dict | None = None, *, label: str, trials: TrialLog | None = None) -> dict:
    """One (task, method)'s search at `budget` over `spec_space` on `seeds` (the settings'
    score: their mean validation), in the Optuna study `study_name` (resumed when it exists),
    with the edge rule's extra values (`widened`); returns its search.json entry, or a
    UsageError when no trial completed. `known`: {value of the one searched setting: (seeds,
    their mean validation)} measured before (the carry check's): those seeds are not trained
    again at that value, and the score is the mean over all of `seeds`. `label` names the
    phase and key in the log ("per-budget search sst2/sam/0.02"). `trials`: the key's committed
    trial log (`TrialLog`): a setting finished in an earlier sitting, on any machine, is read
    back from it instead of trained again, and each one finished here is added to it."""
    search = spec.search
    cls = registry.get(method)
    space = dict(cls.search_space()) if search.method_params else {}
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
              if search.pruner == "median" else optuna.pruners.NopPruner())
    grid = _choice_grid(spec_space) if not space else None
    if grid is not None:  # every setting a list of choices: try each once (a grid)
        sampler = optuna.samplers.GridSampler(grid, seed=search.seed)
        n_trials = min(search.trials, math.prod(len(v) for v in grid.values()))
    else:
        sampler = optuna.samplers.TPESampler(seed=search.seed)
        n_trials = search.trials
    study_name = method_study(study_name, method)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                load_if_exists=True, pruner=pruner, sampler=sampler)
    params_space = dict(spec_space)

    def objective(trial: optuna.Trial) -> float:
        started = time.monotonic()
        train = {n: _suggest(trial, n, d) for n, d in params_space.items()}
        params = {**spec.methods[method],
                  **{n: _suggest(trial, f"method.{n}", d) for n, d in space.items()}}

        def on_epoch(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: validation {value:.4f}")

        earlier = trials.finished(trial.params, seeds) if trials else None
        if earlier is not None:  # finished in an earlier sitting: read back, not trained again
            trial.set_user_attr("duration_s", earlier["duration_s"])
            return earlier["validation"]
        before = _known_at(known, train)
        to_run = [s for s in seeds if s not in before[0]]
        if not to_run:
            return before[1]
        config = RunConfig(method=method, task=task, budget="1" if not cls.uses_budget else budget,
                           seeds=to_run, model=spec.model, device=spec.device, method_params=params,
                           train=train_config(train, "search", method_train(spec, method)),
                           limit=spec.limit, output_dir=str(spec.out / "search-runs"))
        # several tuning seeds: the score is their mean, known only at the end, so no
        # per-epoch report (one seed's epoch is not the setting's value)
        summary, run_dir = experiment.run_experiment(config, progress=False, score_cache=cache,
                                                     on_epoch=on_epoch if len(seeds) == 1 else None)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        n_known = len(before[0])
        value = (summary["validation_main_mean"] * len(to_run) + before[1] * n_known) / (len(to_run) + n_known)
        if trials:
            trials.add(trial.params, seeds, value, time.monotonic() - started)
        return value

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
    if grid is not None:
        measure_cut_off_points(study, grid, guarded, f"{task}/{method}")
    studies = [study]
    for value in widened(studies, grid, widen):
        (name, choice), = value.items()
        log(f"{label}: best at the grid's edge; trying {name}={choice:g}")
        # a study of its own: Optuna keeps one set of choices per parameter and study
        extra = optuna.create_study(
            study_name=f"{study_name}/widen/{name}={choice:g}",
            storage=storage, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.GridSampler({name: [choice]}))
        params_space = {name: {"choices": [choice]}}
        extra.optimize(guarded, n_trials=1, catch=(Exception,),
                       callbacks=[optuna.study.MaxTrialsCallback(1, states=done)])
        measure_cut_off_points(extra, {name: [choice]}, guarded, f"{task}/{method}")
        studies.append(extra)
    complete = [t for st in studies for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:  # nothing to choose from: never an empty search.json and exit 0
        failed = [t for st in studies for t in st.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
        reason = failed[0].user_attrs.get("failure", "") if failed else ""
        raise UsageError(f"search {task}/{method}: none of its {sum(len(st.trials) for st in studies)} "
                         f"trials completed{': ' + reason.splitlines()[0][:300] if reason else ''}; "
                         "fix the search space or the method's settings (search.json keeps the "
                         "pairs tuned so far)")
    winner = max(complete, key=lambda t: t.value)
    params = winner.params
    return {"train": {k: v for k, v in params.items() if not k.startswith("method.")},
            "method": {k[len("method."):]: v for k, v in params.items() if k.startswith("method.")},
            "validation": winner.value, "trials": sum(len(st.trials) for st in studies),
            "tried": [row for st in studies for row in tried(st)], "seeds": seeds}


def _known_at(known: dict | None, train: dict) -> tuple[list[int], float]:
    """The seeds measured before at this trial's value of the one searched setting, and their
    mean validation; ([], 0.0) when none."""
    if known and len(train) == 1:
        (value,) = train.values()
        for at, measured in known.items():
            if isinstance(value, (int, float)) and math.isclose(at, value, rel_tol=1e-9):
                return measured
    return [], 0.0


def carry_keys(spec: StudySpec) -> list[str]:
    """The carry check's keys, `task/method/budget`: every budget-parameterised method at every
    budget of the spec other than the one the search tunes at."""
    tuned_at = search_budget(spec)
    return [f"{t}/{m}/{b}" for t in spec.tasks for m in spec.methods if registry.get(m).uses_budget
            for b in spec.budgets if b != tuned_at]


def neighbours(choices: list[float], value: float) -> list[float]:
    """`value` and the nearest values on either side of it: the grid's (`choices`), or past the
    grid's end (a value the edge rule added) the grid's ratio at that end, as the edge rule
    steps."""
    ordered = sorted(choices)
    low_ratio, high_ratio = ordered[1] / ordered[0], ordered[-1] / ordered[-2]
    lower = [c for c in ordered if c < value and not math.isclose(c, value, rel_tol=1e-9)]
    higher = [c for c in ordered if c > value and not math.isclose(c, value, rel_tol=1e-9)]
    return [lower[-1] if lower else value / low_ratio, value, higher[0] if higher else value * high_ratio]


def run_carry_check(spec: StudySpec, log=print, mirror: Path | None = None,
                    search_mirror: Path | None = None) -> dict:
    """Whether carrying the searched setting from the search's budget to the others costs a
    method more than its seed spread (issue #21): for every `carry_keys` entry, the carried
    value and its two grid neighbours trained on `search.carry_check` seeds at that budget
    (validation, as the search). Writes and returns {task/method/budget: entry}, `carry.json`
    (and `mirror`), after every key; workers split the keys as the search's do. Each entry:
    the search's fields, plus `carried` (the value carried) and `carried_validation`."""
    search = spec.search
    if not search or not search.carry_check:
        raise UsageError(f"study {spec.name!r} has no 'search: carry_check:' seeds")
    (name, choice_spec), = search.params.items()
    best = SearchClaims(spec, search_mirror).merged()
    missing = sorted({k.rsplit("/", 1)[0] for k in carry_keys(spec)} - set(best))
    if missing:
        raise UsageError(f"the carry check needs the search's setting of {', '.join(missing)}: "
                         "run the search first (peftbench leaderboard run)")
    claim_out(spec)
    cache, storage = ScoreCache(spec.out / "scores"), open_storage(spec)
    claims = SearchClaims(spec, mirror, record="carry.json", keys=carry_keys(spec))
    while (key := claims.next()) is not None:
        task, method, budget = key.split("/")
        carried = best[f"{task}/{method}"]["train"][name]
        grid = {name: {"choices": neighbours(choice_spec.choices, carried)}}
        try:
            entry = _tune(spec, task, method, budget, grid, list(search.carry_check),
                          f"{spec.name}/carry/{key}", 0, storage, cache, log, label=f"carry check {key}",
                          trials=claims.trials(key))
        except UsageError:
            claims.release(key)
            raise
        at_carried = [t["validation"] for t in entry["tried"]
                      if t["state"] == "complete" and math.isclose(t["params"][name], carried, rel_tol=1e-9)]
        entry.update(carried={name: carried}, carried_validation=at_carried[0] if at_carried else None)
        claims.record(key, entry)
        log(f"carry check {key}: carried {name}={carried:g} validation "
            f"{entry['carried_validation']}; best {entry['train']} {entry['validation']:.4f}")
    return claims.merged()


def run_per_budget_search(spec: StudySpec, log=print, mirror: Path | None = None,
                          carry_mirror: Path | None = None, search_mirror: Path | None = None) -> dict:
    """Each budget other than the search's gets its own setting (`search.per_budget`; issue
    #21's board, where carrying the rate tuned at 0.5% cost several methods more than their
    seed spread): for every `carry_keys` entry, the carry check's three values around the
    carried one, widened by the edge rule (`search.widen`), chosen by the mean validation over
    `search.seeds`. The carry check's seeds are read back from carry.json, not trained again.
    Writes and returns {task/method/budget: entry}, `per-budget.json` (and `mirror`), after
    every key; workers split the keys as the search's do."""
    search = spec.search
    if not search or not search.per_budget:
        raise UsageError(f"study {spec.name!r} has no 'search: per_budget: true'")
    (name, _), = search.params.items()
    best = SearchClaims(spec, search_mirror).merged()
    carry = SearchClaims(spec, carry_mirror, record="carry.json").merged()
    missing = [k for k in carry_keys(spec) if k not in carry]
    if missing:
        raise UsageError(f"the per-budget search starts from the carry check, and {len(missing)} of its "
                         f"keys are not checked yet ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): "
                         "run the carry check first (peftbench leaderboard run)")
    claim_out(spec)
    cache, storage = ScoreCache(spec.out / "scores"), open_storage(spec)
    claims = SearchClaims(spec, mirror, record=PER_BUDGET, keys=carry_keys(spec))
    while (key := claims.next()) is not None:
        task, method, budget = key.split("/")
        checked = carry[key]
        carried = best[f"{task}/{method}"]["train"][name]
        values = sorted(t["params"][name] for t in checked["tried"])
        known = {t["params"][name]: (list(checked["seeds"]), t["validation"])
                 for t in checked["tried"] if t["state"] == "complete" and t["validation"] is not None}
        log(f"per-budget search {key}: {len(claims.merged())} of {len(claims.pairs)} keys tuned so far")
        try:
            entry = _tune(spec, task, method, budget, {name: {"choices": values}}, list(search.seeds),
                          f"{spec.name}/per-budget/{key}", search.widen, storage, cache, log, known=known,
                          label=f"per-budget search {key}", trials=claims.trials(key))
        except UsageError:
            claims.release(key)
            raise
        entry.update(carried={name: carried}, read_back={"carry.json": list(checked["seeds"])})
        claims.record(key, entry)
        log(f"per-budget search {key}: carried {name}={carried:g}; chosen {entry['train']} "
            f"validation {entry['validation']:.4f}")
    return claims.merged()


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
            _write_json(path, log)

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
                    self._write_claims(claims)
                    return key
        return None

    def release(self, key: str) -> None:
        with self.lock:
            claims = self._claims()
            claims.pop(key, None)
            self._write_claims(claims)

    def record(self, key: str, entry: dict) -> dict:
        entry = {**entry, "code": method_code(key.split("/")[1])}
        with self.lock:
            best = {**self.merged(), key: entry}
            _write_search(self.spec, best, self.mirror, self.record_name)
            log = self.read_trials()
            if log.pop(key, None) is not None:  # its rows are in the entry's `tried` now
                self.write_trials(log)
            claims = self._claims()
            claims.pop(key, None)
            self._write_claims(claims)
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


def _write_search(spec: StudySpec, best: dict, mirror: Path | None = None, record: str = "search.json") -> None:
    spec.out.mkdir(parents=True, exist_ok=True)
    for path in [spec.out / record, *([mirror] if mirror else [])]:
        _write_json(path, best)


def _write_json(path: Path, obj) -> None:
    """Write `obj` as JSON atomically (a temporary file, then a rename): a reader never sees half."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)

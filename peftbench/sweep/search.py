"""The search over training hyper-parameters, per (task, method): a grid of choices or TPE, median
pruning, edge widening, pairs split between workers; its best settings in `search.json`."""

from __future__ import annotations

import math
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from peftbench.contract import registry
from peftbench.contract.settings import train_config
from peftbench.core.errors import UsageError
from peftbench.sweep.claims import SearchClaims, TrialLog, measure_cut_off_points, widened
from peftbench.sweep.records import (
    add_tried,
    best_search_params,
    method_study,
    search_budget,
    tried,
    write_search,
)
from peftbench.sweep.spec import StudySpec, method_train
from peftbench.sweep.storage import claim_out, open_storage
from peftbench.training import experiment
from peftbench.training.cache import ScoreCache
from peftbench.training.experiment import RunConfig


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
            add_tried(entry, storage, f"{spec.name}/search/{key}", key.split("/")[1])
            updated[key] = entry
    if updated:
        with claims.lock:
            write_search(spec, {**claims.merged(), **updated}, mirror)
    while (key := claims.next()) is not None:  # several workers split the pairs between them
        task, method = key.split("/", 1)
        log(f"search {key}: started; {len(claims.merged())} of {len(claims.pairs)} pairs tuned so far")
        try:
            entry = tune(spec, task, method, search_budget(spec), spec_space, list(search.seeds or [spec.seeds[0]]),
                          f"{spec.name}/search/{task}/{method}", search.widen, storage, cache, log,
                          label=f"search {key}", trials=claims.trials(key))
        except UsageError:
            claims.release(f"{task}/{method}")
            raise
        claims.record(f"{task}/{method}", entry)  # after every pair: an interruption keeps it
        log(f"search {task}/{method}: best validation {entry['validation']:.4f} with "
            f"{ {**entry['train'], **{'method.' + k: v for k, v in entry['method'].items()}} }")
    return claims.merged()


def tune(spec: StudySpec, task: str, method: str, budget: str, spec_space: dict, seeds: list[int],
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

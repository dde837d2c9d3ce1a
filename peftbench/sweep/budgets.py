"""Other budgets than the search's: the carry check (is the tuned rate still best?) and the per-budget search."""

from __future__ import annotations

import math
from pathlib import Path

from peftbench.core.errors import UsageError
from peftbench.sweep.claims import SearchClaims
from peftbench.sweep.records import PER_BUDGET, carry_keys
from peftbench.sweep.search import tune
from peftbench.sweep.spec import StudySpec
from peftbench.sweep.storage import claim_out, open_storage
from peftbench.training.cache import ScoreCache


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
    method more than its seed spread: for every `carry_keys` entry, the carried
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
            entry = tune(spec, task, method, budget, grid, list(search.carry_check),
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
    """Each budget other than the search's gets its own setting (`search.per_budget`: carrying
    the rate tuned at 0.5% can cost a method more than its seed spread): for every `carry_keys` entry, the carry check's three values around the
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
            entry = tune(spec, task, method, budget, {name: {"choices": values}}, list(search.seeds),
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

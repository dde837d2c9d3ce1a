"""Search records on disk: search.json, carry.json, per-budget.json and the trial log, keyed by
the method's code so that an edited method is searched again."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from peftbench.contract import registry
from peftbench.contract.selector import Budget
from peftbench.core.errors import UsageError
from peftbench.core.files import write_json
from peftbench.sweep.spec import StudySpec


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


def add_tried(entry: dict, storage, study_name: str, method: str) -> None:
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
    from peftbench.training.identity import code_identity

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


def search_budget(spec: StudySpec) -> str:
    """The budget the search tunes at: `search.budget`, else the spec's first budget."""
    budget = spec.search.budget
    return str(Budget.parse(budget)) if budget is not None else spec.budgets[0]


def write_search(spec: StudySpec, best: dict, mirror: Path | None = None, record: str = "search.json") -> None:
    spec.out.mkdir(parents=True, exist_ok=True)
    for path in [spec.out / record, *([mirror] if mirror else [])]:
        write_json(path, best)


def carry_keys(spec: StudySpec) -> list[str]:
    """The carry check's keys, `task/method/budget`: every budget-parameterised method at every
    budget of the spec other than the one the search tunes at."""
    tuned_at = search_budget(spec)
    return [f"{t}/{m}/{b}" for t in spec.tasks for m in spec.methods if registry.get(m).uses_budget
            for b in spec.budgets if b != tuned_at]

"""The conformance suite a method author runs: the `Selector` contract as checks.

As scikit-learn's `parametrize_with_checks` (and Optuna's `optuna.testing` suites), it runs
from the author's own pytest:

    from peftbench.testing import parametrize_with_checks

    @parametrize_with_checks([("my-method", {"burnin": 2})])
    def test_my_method(check):
        check()

or from the command line on any installed method: `peftbench check-method NAME`. Every check
runs on a tiny randomly initialised BERT (2 layers, hidden 32) with real RTE rows, on the CPU,
in seconds. A method may declare checks it is known to fail, with the reason, in
`expected_failures={check name: reason}`; such a check is reported as an expected failure
(and fails if it passes, so the declaration is kept honest).

The checks:
- `init_stores_params`: default-constructible, every `__init__` argument stored unchanged under
  its own name, `get_params` round-trips (scikit-learn's rules: the run's record and the score
  cache key are the validated arguments, so a parameter kept under another name is a bug);
- `score_leaves_model_unchanged`: every parameter and buffer is bit-identical after `score`;
- `scores_have_parameter_shapes`: entry-shaped scores (keys that name parameters) have those
  parameters' shapes;
- `select_within_budget`: the runner's own checks (`contract.selector.check_scores`,
  `contract.selector.validate_selection`): no NaN score; names of encoder parameters, 1-D integer,
  in-range, unrepeated indices; a count at most the budget (for `uses_budget` methods whose
  budget is not `budget_in_expectation`), exactly the budget where `budget_exact = True`;
- `select_is_deterministic`: two selections under the same seed are equal;
- `cache_round_trip`: scores saved to disk and loaded back, handed to a fresh instance, give
  the same selection (a sweep's score cache does exactly this);
- `training_keeps_frozen_entries`: after `apply` and a few AdamW steps with weight decay, no
  pre-trained entry outside the counted ones moved, in any tensor, and the count measured after
  training is what `count_trainable` reports (hooks keep the count honest).
"""

from __future__ import annotations

import copy
import io
import math
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from peftbench.contract.selector import Selector

BUDGET_FRACTION = 0.01  # of a tiny model whose embeddings hold most entries: 1% fits its Linear layers
# light hyper-parameters for the built-ins, so each check runs in seconds (as scikit-learn's
# checks shrink max_iter): scoring over a few batches, a projection within 4 steps
BUILTIN_CHECK_PARAMS = {
    "sam": {"burnin": 2}, "fish": {"num_samples": 4}, "childtuning-d": {"batches": 2},
    "diffpruning": {"burnin": 2}, "ggm": {"rank": 2, "batches": 4, "important": 3, "max_iter": 10},
    "adapeft": {"probe_steps": 4, "fit_batches": 1},
    "peft-sized": {"options": {"num_subspaces": 2, "subspace_rank": 1}}, "spectral": {"batches": 3, "neighbours": 3}, "lora": {"r": 2}, "shira": {"r": 2},
    "snip": {"batches": 2}, "grasp": {"batches": 2},
}


@dataclass
class Outcome:
    check: str
    passed: bool
    detail: str = ""
    expected_failure: str | None = None  # the declared reason, if any

    @property
    def ok(self) -> bool:
        """Passed, or failed as declared."""
        return self.passed != bool(self.expected_failure)


@lru_cache(maxsize=1)
def tiny_model_dir() -> str:
    """A tiny random BERT saved once per process, with the default model's real tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftbench.modeling.models import resolve_model_path

    folder = Path(tempfile.mkdtemp(prefix="peftbench-tiny-bert-"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    BertForSequenceClassification(config).bert.save_pretrained(folder)
    torch.random.set_rng_state(generator_state)
    tokenizer.save_pretrained(folder)
    return str(folder)


_LOADED: dict[str, tuple] = {}  # model folder -> (task, model as loaded, tokenizer, data)


class _Setup:
    """A fresh tiny model, its data and the method's scores: what every check starts from."""

    def __init__(self, method, params: dict, model_dir: str | None):
        from peftbench.contract.scoring import ScoringData
        from peftbench.data.encode import tokenize
        from peftbench.data.tasks import load_task
        from peftbench.modeling.models import head_parameters, load_model, pretrained_parameters
        from peftbench.training.trainer import make_loader, pick_device

        self.method, self.cls, self.params, self.resolved = method_spec(method, params)
        where = model_dir or tiny_model_dir()
        if where not in _LOADED:  # loading and tokenising once per model: most of a check's cost
            task = load_task("rte")
            model, tokenizer = load_model(where, 2)
            _LOADED[where] = (task, model, tokenizer,
                              tokenize(task, tokenizer, task.load_splits(limit=16), 48))
        self.task, model, self.tokenizer, self.data = _LOADED[where]
        self.model = copy.deepcopy(model)  # every check starts from the same untouched model
        self.pretrained = pretrained_parameters(self.model)
        self.head_names = set(head_parameters(self.model))
        self.numels = {n: p.numel() for n, p in self.pretrained.items()}
        self.budget = max(1, math.floor(BUDGET_FRACTION * sum(self.numels.values())))
        self.selector = method if isinstance(method, Selector) else self.fresh()
        self.scoring = ScoringData(make_loader(self.data["train"], self.tokenizer, self.task, 4, True, 0),
                                   self.task, pick_device("cpu")) if self.selector.needs_data else None

    def fresh(self):
        """A new instance with the same parameters."""
        from peftbench.contract.selector import validate_params

        return self.cls(**validate_params(self.cls, self.method, self.params))

    def score(self):
        """The runner's own `checked_score`: no weight moved, no hook left, scores well-formed."""
        from peftbench.core.errors import UsageError
        from peftbench.training.checks import checked_score

        try:
            return checked_score(self.selector, self.method, self.model, self.scoring)
        except UsageError as err:
            raise AssertionError(str(err)) from None

    def select(self, selector, scores, seed: int = 0):
        """The runner's own `checked_select` (no weight moved, no hook left)."""
        from peftbench.core.errors import UsageError
        from peftbench.training.checks import checked_select, state_digests

        try:
            return checked_select(selector, self.method, self.model, scores, self.budget,
                                  torch.Generator().manual_seed(seed), state_digests(self.model))
        except UsageError as err:
            raise AssertionError(str(err)) from None


def method_spec(method, params: dict | None = None) -> tuple[str, type, dict, dict]:
    """(name, class, given parameters, resolved parameters) of a method given as an installed
    name, a `Selector` subclass or an instance (whose `get_params` are its parameters), so an
    author checks a class before registering it."""
    from peftbench.contract import registry
    from peftbench.contract.selector import resolve_params

    params = dict(params or {})
    if isinstance(method, str):
        cls = registry.get(method)
        name = method.lower()
    elif isinstance(method, Selector):
        cls, name = type(method), type(method).__name__
        params = {**method.get_params(), **params}
    elif isinstance(method, type) and issubclass(method, Selector):
        cls, name = method, method.__name__
    else:
        raise TypeError(f"a method name, a Selector subclass or an instance, not {method!r}")
    return name, cls, params, resolve_params(cls, name, params)


def _same_selection(a, b) -> bool:
    return a.full == b.full and set(a.partial) == set(b.partial) and all(
        torch.equal(a.partial[n].cpu(), b.partial[n].cpu()) for n in a.partial)


def check_init_stores_params(s: _Setup) -> str:
    """scikit-learn's estimator rules: default-constructible, every `__init__` argument stored
    under its own name (what `get_params` reads back), unchanged."""
    import inspect

    cls = s.cls
    try:
        cls()
    except TypeError as err:
        raise AssertionError(f"{cls.__name__}() fails ({err}): every parameter needs a default") from None
    expected = s.resolved
    names = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for name in names:
        assert hasattr(s.selector, name), (f"__init__ argument {name!r} is not stored as self.{name} "
                                           "(get_params cannot read it back)")
        value = getattr(s.selector, name)
        plain = (lambda v: list(v) if isinstance(v, tuple) else v)  # a tuple stored as a list is the same
        assert plain(value) == plain(expected[name]), \
            f"self.{name} = {value!r}, but {name}={expected[name]!r} was given (store arguments unchanged)"
    got = s.selector.get_params()
    assert {k: plain(v) for k, v in got.items()} == {k: plain(v) for k, v in expected.items()}, \
        "get_params() does not round-trip the arguments"
    return f"{len(names)} parameters stored under their own names"


def check_score_leaves_model_unchanged(s: _Setup) -> str:
    s.score()  # the runner's checks: every parameter and buffer as it was, no hook left
    return "all parameters and buffers bit-identical, no hook left"


def check_scores_have_parameter_shapes(s: _Setup) -> str:
    scores = s.score()
    if scores is None:
        return "no scores (the method needs none)"
    assert isinstance(scores, dict), f"scores must be a dict or None, got {type(scores).__name__}"
    shaped = [n for n in scores if n in s.pretrained]
    for name in shaped:
        assert tuple(scores[name].shape) == tuple(s.pretrained[name].shape), \
            f"scores[{name!r}] has shape {tuple(scores[name].shape)}, the parameter {tuple(s.pretrained[name].shape)}"
    return f"{len(shaped)} entry-shaped score tensors"


def check_select_within_budget(s: _Setup) -> str:
    from peftbench.contract.selector import check_scores, validate_selection
    from peftbench.core.errors import UsageError

    scores = s.score()
    try:  # the runner's own checks, so a method passing here is not refused by `run`
        check_scores(s.method, scores)
        count = validate_selection(s.method, s.select(s.selector, scores), s.numels,
                                   s.selector.budget_bound(s.budget))
    except UsageError as err:
        raise AssertionError(str(err)) from None
    if not s.selector.uses_budget:
        return f"natural count {count} (budget not used)"
    if s.selector.budget_in_expectation:
        return f"{count} selected; the budget {s.budget} holds per step in expectation"
    if getattr(s.selector, "budget_exact", False):
        assert count == s.budget, f"budget_exact: selected {count}, budget {s.budget}"
    return f"{count} of budget {s.budget}"


def check_select_is_deterministic(s: _Setup) -> str:
    scores = s.score()
    a, b = s.select(s.fresh(), scores, 3), s.select(s.fresh(), scores, 3)
    assert _same_selection(a, b), "two selections under seed 3 differ"
    return "same selection under the same seed"


def check_cache_round_trip(s: _Setup) -> str:
    from peftbench.core.safeload import load_pt

    scores = s.score()
    buffer = io.BytesIO()
    torch.save(scores, buffer)
    buffer.seek(0)
    loaded = load_pt(buffer)  # as the score cache reads it: plain tensors only
    assert _same_selection(s.select(s.selector, scores), s.select(s.fresh(), loaded)), \
        "a fresh instance given the saved-and-loaded scores selects differently"
    return "same selection from the scores saved and loaded by a fresh instance"


def check_training_keeps_frozen_entries(s: _Setup) -> str:
    from peftbench.contract.settings import TrainConfig
    from peftbench.modeling.sparse import count_trainable, effective_weight, trainable_entries
    from peftbench.training.trainer import pick_device, train

    before = {n: p.detach().clone() for n, p in s.pretrained.items()}
    selection = s.select(s.selector, s.score())
    model = s.selector.apply(s.model, selection)
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, s.selector, s.task, s.data, s.tokenizer,
              TrainConfig(epochs=1, batch_size=4, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0,
                          max_steps=4), seed=0, device=pick_device("cpu"), run_dir=Path(run_dir),
              progress=False)
    from peftbench.core.errors import UsageError
    from peftbench.training.checks import check_count

    try:  # the runner's count after training: what can differ from theta0, within the budget
        check_count(s.method, model, set(s.pretrained), s.head_names, s.selector.budget_bound(s.budget))
    except UsageError as err:
        raise AssertionError(str(err)) from None
    counts = count_trainable(model, set(s.pretrained), s.head_names)
    spend = {}
    for name, kind, count in trainable_entries(model, set(s.pretrained), s.head_names):
        if kind == "encoder":
            spend[name] = spend.get(name, 0) + count
    moved = {n: int((effective_weight(model, n) != before[n]).sum()) for n in s.pretrained}
    assert counts["encoder"] == sum(spend.values())
    if counts["new"]:  # a re-parametrisation moves pre-trained tensors through new parameters
        untouched = [n for n in moved if moved[n] and not spend.get(n) and not _reparametrised(model, n)]
        assert not untouched, f"{untouched[0]}: {moved[untouched[0]]} entries moved, none counted"
        return (f"{sum(moved.values())} entries moved through {counts['new']} new parameters "
                f"(+{counts['encoder']} counted pre-trained entries)")
    over = [n for n in moved if moved[n] > spend.get(n, 0)]
    assert not over, (f"{over[0]}: {moved[over[0]]} entries moved, {spend.get(over[0], 0)} counted "
                      "(frozen entries must stay bit-identical)")
    return f"{sum(moved.values())} entries moved, {counts['encoder']} counted"


def _reparametrised(model, name: str) -> bool:
    """Whether parameter `name` is computed by a parametrisation with trainable parameters."""
    from torch.nn.utils import parametrize

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    return parametrize.is_parametrized(module, attr) and any(
        p.requires_grad for p in module.parametrizations[attr].parameters())


CHECKS: dict[str, Callable[[_Setup], str]] = {
    "init_stores_params": check_init_stores_params,
    "score_leaves_model_unchanged": check_score_leaves_model_unchanged,
    "scores_have_parameter_shapes": check_scores_have_parameter_shapes,
    "select_within_budget": check_select_within_budget,
    "select_is_deterministic": check_select_is_deterministic,
    "cache_round_trip": check_cache_round_trip,
    "training_keeps_frozen_entries": check_training_keeps_frozen_entries,
}


def run_check(method, check: str, params: dict | None = None, model_dir: str | None = None,
              expected_failures: dict[str, str] | None = None) -> Outcome:
    """Run one check on a fresh setup (a fresh model, so no check sees another's effects).
    `method`: an installed name, a Selector subclass or an instance."""
    reason = (expected_failures or {}).get(check)
    try:
        detail = CHECKS[check](_Setup(method, params or {}, model_dir))
    except AssertionError as err:
        return Outcome(check, False, str(err), reason)
    except Exception as err:  # a crash is a failure too, reported by name
        return Outcome(check, False, f"{type(err).__name__}: {err}", reason)
    return Outcome(check, True, detail, reason)


def check_method(method, params: dict | None = None, model_dir: str | None = None,
                 expected_failures: dict[str, str] | None = None) -> list[Outcome]:
    """Every check of `CHECKS` on one method (an installed name, a Selector subclass or an
    instance; a built-in by name with its light `BUILTIN_CHECK_PARAMS` unless given). Expected
    failures: the class's `expected_check_failures`, then `expected_failures` over them."""
    if params is None and isinstance(method, str):
        params = BUILTIN_CHECK_PARAMS.get(method.lower(), {})
    _, cls, _, _ = method_spec(method, params)
    expected = {**cls.expected_check_failures, **(expected_failures or {})}
    return [run_check(method, name, params, model_dir, expected) for name in CHECKS]


def parametrize_with_checks(methods: list, expected_failures: dict[str, dict[str, str]] | None = None):
    """A pytest parametrization over (method, check): the test receives `check`, a callable
    that runs the check and fails the test if the contract is broken. `methods` holds installed
    names, Selector subclasses or instances, or (any of those, params) pairs;
    `expected_failures` = {method name: {check: reason}} over the classes' own
    `expected_check_failures`."""
    import pytest

    cases = []
    for entry in methods:
        method, params = entry if isinstance(entry, tuple) else (entry, {})
        name, cls, _, _ = method_spec(method, params)
        declared = {**cls.expected_check_failures, **(expected_failures or {}).get(name, {})}
        for check in CHECKS:
            reason = declared.get(check)

            def run(method=method, name=name, params=params, check=check, reason=reason):
                outcome = run_check(method, check, params, expected_failures={check: reason} if reason else None)
                if reason and not outcome.passed:
                    pytest.xfail(reason)
                assert outcome.ok, f"{name}: {check}: {outcome.detail}" + (
                    f" (declared an expected failure: {reason}, but it passed)" if reason else "")

            cases.append(pytest.param(run, id=f"{name}-{check}"))
    return pytest.mark.parametrize("check", cases)

"""The `Selector` contract: every method in peftbench is one subclass of `Selector`.

A method answers one question: *which entries of the pre-trained model train?* It does so in
up to four phases, each optional except `select`:

1. `score(model, data)`   -> importance per entry (dict name -> tensor shaped like the parameter),
                              or None for methods that need no scores (BitFit, FullTuning).
                              `model` is the very model trained next: `score` must leave every
                              parameter and buffer exactly as it found them (restore what a
                              scoring fine-tune moved); the runner checks this and refuses a
                              method that does not.
                              Scoring is separated from thresholding so that a sweep over budgets
                              scores once and thresholds many times.
2. `select(model, scores, budget)` -> a `Selection` of pre-trained entries, at `budget` entries.
3. `apply(model, selection)` -> the model to train. The default freezes every pre-trained entry
                              outside the selection *by construction* (see `peftbench.modeling.sparse`),
                              so frozen entries stay bit-identical and hold no optimizer state.
                              Re-parametrisations (LoRA, adapters, principal components) override
                              it and add new parameters.
4. Training-time hooks, for methods whose behaviour changes during training (DiffPruning's L0
   term and projection, ChildTuning-F's per-step gradient mask, spectral gradient filtering).
   No-ops by default. Per step the trainer runs: forward, loss (+ `loss_term`), backward,
   `after_backward`, global gradient clipping, `before_step`, optimizer step, `after_step`.
   `begin_training(model, total_steps)` runs once before the first step (refuse a schedule the
   method cannot honour there); `checkpoint_ready(step)` says whether the model after `step`
   steps is the method's final form (False: that epoch's validation cannot pick the checkpoint
   that is tested, e.g. DiffPruning before its projection). `phases(total_steps)` names the
   steps after which the method changes form: the learning-rate schedule (warm-up, then linear
   decay) restarts there and validation is measured on both sides (the run's `phases`);
   `learning_rates(model, lr, phase)` gives parameters a rate other than the run's in a phase
   (DiffPruning's gates and its dense phase); `training_record()` returns what the method reports about its own run (its health).

Caching: `score`'s return value is cached on disk by a sweep and handed to `select` in later
runs without `score` being called again, so everything `select`, `apply` and the hooks need
from the scoring pass must be *in the returned scores*, not left on `self`.

Hyper-parameters are keyword arguments of `__init__`, stored under the same names, as in
scikit-learn: `get_params()` reads them back, so a run's config records them all. Their
annotations are the constraints (as scikit-learn's `_parameter_constraints`): the registry
validates every user-given value against them with pydantic, strictly, before `__init__` runs
(`validate_params`), so `r=0`, `clip=big` or `burnin=abc` are refused by name. Use the aliases
below (`PositiveInt`, `Batches`, `Fraction`, ...) or any pydantic-understood annotation.

Budget: the number of *pre-trained* entries (the encoder, i.e. `model.base_model`) that may
differ from their pre-trained values. The task head is new, trained by every method, and is
counted separately (see `peftbench.modeling.sparse.count_trainable`); it is not part of the budget.
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, Union

import torch
from pydantic import (
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    ValidationError,
)

from peftbench.core.errors import UsageError, check_choice
from peftbench.modeling.selection import Selection

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from peftbench.contract.scoring import ScoringData

Scope = Literal["tensor", "global"]
SCOPES = ("tensor", "global")

# Parameter constraints for method signatures (see the module docstring).
Batches = Union[PositiveInt, Literal["epoch"]]  # scoring batches: a count, or one pass
Fraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1]
Decay = Annotated[float, Field(ge=0, lt=1)]  # [0, 1): dropout-like probabilities, EMA factors
__all__ = ["Batches", "Fraction", "Decay", "NonNegativeFloat", "PositiveFloat", "PositiveInt"]


def validate_params(cls: type, method: str, params: dict) -> dict:
    """`params` checked against `cls.__init__`'s signature and annotations (strict: no string
    is read as a number, no bool as an int); a UsageError naming the parameter, what was wrong
    and the accepted parameters otherwise."""
    signature = inspect.signature(cls.__init__)
    accepted = [n for n, p in signature.parameters.items() if n != "self" and p.kind not in
                (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    required = [n for n in accepted if signature.parameters[n].default is inspect.Parameter.empty]
    if required:
        raise UsageError(f"method {method!r}: __init__ argument {required[0]!r} has no default; give "
                         "every argument a default (a method is built by name with keyword "
                         "overrides, as a scikit-learn estimator)")
    listing = ", ".join(f"{n}={signature.parameters[n].default!r}" for n in accepted) or "none"
    out = {}
    for name, value in params.items():
        if name not in accepted:
            raise UsageError(f"method {method!r} has no parameter {name!r}: accepted {listing}")
        if name not in hints:
            out[name] = value
            continue
        try:
            out[name] = TypeAdapter(hints[name], config=ConfigDict(strict=True)).validate_python(value)
        except ValidationError as err:
            problem = err.errors()[0]
            message = problem["msg"]
            if hints[name] == Batches:
                message = "give a positive integer (scoring batches) or 'epoch' (one pass over the training set)"
            elif problem["type"] == "literal_error":
                allowed = problem["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
                message = f"{name} {value!r} is unknown: allowed {allowed}"
            raise UsageError(f"method {method!r} parameter {name}={value!r}: {message} "
                             f"(accepted parameters: {listing})") from None
    return out


def resolve_params(cls: type, method: str, params: dict) -> dict:
    """Every hyper-parameter as a run uses it: `params` validated (`validate_params`) over
    `__init__`'s defaults. What a score-cache key and a run's record are built from, never
    attributes read back from an instance (a method may store an argument under another name)."""
    signature = inspect.signature(cls.__init__)
    defaults = {n: p.default for n, p in signature.parameters.items()
                if n != "self" and p.default is not inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return {**defaults, **validate_params(cls, method, params)}


@dataclass(frozen=True)
class Budget:
    """A budget given as a fraction p in (0, 1] of the N pre-trained entries, or as a count."""

    fraction: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, text: str | float | int) -> "Budget":
        """'0.005' -> fraction 0.005; '120000' (an integer above 1) -> that many entries."""
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise UsageError(f"budget {text!r} is not a number: give a fraction in (0, 1] "
                             "or an integer count of entries") from None
        if not math.isfinite(value):
            raise UsageError(f"budget {text!r} is not finite: give a fraction in (0, 1] "
                             "or an integer count of entries")
        if 0 < value <= 1:
            return cls(fraction=value)
        if value > 1 and value == int(value):
            return cls(count=int(value))
        raise UsageError(f"budget {text!r} is out of range: give a fraction in (0, 1] "
                         "or an integer count of entries above 1")

    def entries(self, total: int) -> int:
        """Entries allowed out of `total`: floor(p * N) for a fraction, the count otherwise."""
        if self.count is not None:
            if self.count > total:
                raise UsageError(f"budget of {self.count} entries is above the model size: "
                                 f"the pre-trained model has {total} entries")
            return self.count
        k = math.floor(self.fraction * total)
        if k == 0:
            raise UsageError(f"budget {self} selects 0 of the {total} pre-trained entries: give at "
                             f"least {1 / total:.2g} (one entry) or an integer count")
        return k

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else str(self.count)


def validate_selection(method: str, selection: "Selection", numels: dict[str, int],
                       budget: int | None) -> int:
    """The runner's and the conformance suite's one check of a `Selection` (returns its count).

    Refused, with one line naming the method and the rule: something that is not a Selection;
    a name that is not a pre-trained encoder parameter (the task head is not selectable: it
    trains for every method); a name both in `full` and `partial`; partial indices that are
    not a 1-D integer tensor of flat positions (a boolean mask, floats, a shaped tensor),
    negative, past the tensor's end or repeated; and, when `budget` is given, a count above it.
    `budget` None: a method with a natural count, or one whose budget holds in expectation
    (`budget_in_expectation`), whose count is recorded but not bounded."""
    def refuse(rule: str):
        raise UsageError(f"method {method!r} returned an invalid selection: {rule} "
                         "(the Selector contract, see `peftbench check-method`)")

    if not isinstance(selection, Selection):
        refuse(f"select() must return a peftbench.modeling.selection.Selection, not {type(selection).__name__}")
    outside = sorted(n for n in [*selection.full, *selection.partial] if n not in numels)
    if outside:
        refuse(f"{len(outside)} name(s) are not pre-trained encoder parameters, e.g. {outside[0]!r}")
    both = sorted(set(selection.full) & set(selection.partial))
    if both:
        refuse(f"{both[0]!r} is both in full and in partial")
    for name, idx in selection.partial.items():
        if not isinstance(idx, torch.Tensor) or idx.dtype == torch.bool or idx.is_floating_point() \
                or idx.is_complex() or idx.dim() != 1:
            what = (f"a {idx.dim()}-D {idx.dtype} tensor" if isinstance(idx, torch.Tensor)
                    else type(idx).__name__)
            refuse(f"partial[{name!r}] is {what}: give a 1-D integer tensor of flat indices")
        if len(idx) == 0:
            continue
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= numels[name]:
            refuse(f"partial[{name!r}] has index {low if low < 0 else high} outside "
                   f"0..{numels[name] - 1} (the tensor's {numels[name]} entries)")
        if len(torch.unique(idx)) != len(idx):
            refuse(f"partial[{name!r}] repeats indices ({len(idx) - len(torch.unique(idx))} "
                   "repeated): each entry counts once")
    count = Selection.count(selection, numels)  # counted here, not by an override of count()
    if budget is not None and count > budget:
        refuse(f"{count} entries selected, over the budget of {budget}")
    return count


def check_scores(method: str, scores) -> None:
    """Scores may hold +inf / -inf (ranked above / below every finite score: GGM marks its
    important nodes +inf) but never NaN, which no ranking orders."""
    if scores is None:
        return
    if not isinstance(scores, dict):
        raise UsageError(f"method {method!r}: score() must return a dict of tensors or None, "
                         f"not {type(scores).__name__}")
    for name, value in scores.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and bool(torch.isnan(value).any()):
            raise UsageError(f"method {method!r}: scores[{name!r}] holds {int(torch.isnan(value).sum())} "
                             "NaN value(s): scores must be numbers (+/-inf allowed: above/below all others)")


def apportion(k: int, numels: dict[str, int]) -> dict[str, int]:
    """Split k entries over tensors in proportion to their sizes, summing to exactly k.

    Each tensor gets floor(k * n_t / N); the few entries left go to the tensors with the largest
    fractional remainders (ties by name). Fu et al. use int(p * n_t) per tensor, which spends a
    little less than floor(p * N) in total; this keeps their per-tensor proportion and makes the
    count exact.
    """
    total = sum(numels.values())
    quotas = {n: k * m / total for n, m in numels.items()}
    alloc = {n: math.floor(q) for n, q in quotas.items()}
    left = k - sum(alloc.values())
    for name in sorted(quotas, key=lambda n: (alloc[n] - quotas[n], n))[:left]:
        alloc[name] += 1
    return alloc


def check_scope(scope: str) -> str:
    return check_choice("scope", scope, SCOPES)


def top_k(scores: dict[str, torch.Tensor], k: int, scope: Scope,
          generator: torch.Generator) -> Selection:
    """The k highest-scoring entries, per tensor (`apportion`) or over all tensors at once.

    Ties are broken by a seeded random permutation, so equal scores (BitFit-like constant
    scores, zero gradients) give a deterministic but unbiased choice.
    """
    check_scope(scope)
    numels = {n: s.numel() for n, s in scores.items()}
    if scope == "tensor":
        quotas = apportion(k, numels)
        chosen = {n: _top_indices(s.reshape(-1), quotas[n], generator) for n, s in scores.items()}
    else:
        flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
        best = _top_indices(flat, k, generator)
        chosen, start = {}, 0
        for name, n in numels.items():
            inside = best[(best >= start) & (best < start + n)] - start
            chosen[name] = inside
            start += n
    selection = Selection()
    for name, idx in chosen.items():
        if len(idx) == numels[name]:
            selection.full.add(name)
        elif len(idx):
            selection.partial[name] = idx
    return selection


def _top_indices(values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    perm = torch.randperm(len(values), generator=generator)
    order = torch.topk(values.float()[perm], k, sorted=False).indices
    return torch.sort(perm[order]).values


class Selector:
    """Base class of every method; see the module docstring for the contract.

    Subclasses set `description` (one line, shown by `peftbench methods`), take their
    hyper-parameters as keyword arguments of `__init__`, and override `select` (and the other
    phases they need). `needs_data` tells the runner that `score` reads training batches;
    `uses_budget = False` marks methods whose count does not depend on the budget.
    """

    description: str = ""
    needs_data: bool = False
    uses_budget: bool = True  # False: a natural count (BitFit, LoRA, ...); a sweep runs it once
    budget_exact: bool = False  # True: select() returns exactly the budget (checked by peftbench.testing)
    # True: the budget holds per step in expectation, not in the selection (ChildTuning-F);
    # the selection's count is then not bounded by the budget (`validate_selection`)
    budget_in_expectation: bool = False
    # conformance checks this method fails by design: {check name: reason} (peftbench.testing
    # reports them as expected failures, and fails if one passes)
    expected_check_failures: dict[str, str] = {}

    def budget_bound(self, budget: int) -> int | None:
        """The count `select` must stay within: the budget, or None (natural count, or a
        budget that holds in expectation)."""
        return budget if self.uses_budget and not self.budget_in_expectation else None

    def get_params(self) -> dict:
        """Hyper-parameters, read back from the attributes named like `__init__`'s arguments."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def score(self, model: "nn.Module", data: "ScoringData | None") -> dict[str, torch.Tensor] | None:
        """Importance of every pre-trained entry, higher = more worth training; None if unused."""
        return None

    def select(self, model: "nn.Module", scores: dict[str, torch.Tensor] | None, budget: int,
               generator: torch.Generator) -> Selection:
        """The entries to train, at most `budget` of them unless the method has a natural count."""
        raise NotImplementedError

    def apply(self, model: "nn.Module", selection: Selection) -> "nn.Module":
        """Make exactly the selection (plus the task head) trainable; frozen = bit-identical."""
        from peftbench.modeling.sparse import apply_selection

        return apply_selection(model, selection)

    @classmethod
    def search_space(cls) -> dict:
        """Hyper-parameters a sweep may tune: {name: optuna.distributions.BaseDistribution}.
        Empty by default; a sweep samples these and passes them to `__init__`."""
        return {}

    # Training-time hooks (see the module docstring for their order); no-ops unless overridden.
    def begin_training(self, model: "nn.Module", total_steps: int) -> None:
        return None

    def checkpoint_ready(self, step: int) -> bool:
        return True

    def before_step(self, model: "nn.Module", step: int) -> None:
        return None

    def loss_term(self, model: "nn.Module", step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, model: "nn.Module", step: int) -> None:
        return None

    def after_step(self, model: "nn.Module", step: int) -> None:
        return None

    def phases(self, total_steps: int) -> list[int]:
        return []

    def learning_rates(self, model: "nn.Module", lr: float, phase: int) -> dict[str, float]:
        return {}

    def training_record(self) -> dict | None:
        return None

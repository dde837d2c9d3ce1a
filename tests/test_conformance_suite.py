"""The conformance suite catches what it says it catches: each check fails on a method broken
in exactly that way (a class given directly, no install), and passes on a good one."""
from __future__ import annotations

import pytest
import torch

from peftbench.contract.selector import Selector, top_k
from peftbench.modeling.models import pretrained_parameters
from peftbench.modeling.selection import Selection
from peftbench.testing import CHECKS, check_method, run_check


class Good(Selector):
    """LayerNorm weights only."""

    def select(self, model, scores, budget, generator):
        return Selection(full={n for n in pretrained_parameters(model) if "LayerNorm.weight" in n})


class StoresUnderAnotherName(Good):
    def __init__(self, steps: int = 3):
        self.n_steps = steps


class MovesWeightsInScore(Good):
    def score(self, model, data):
        with torch.no_grad():
            next(iter(pretrained_parameters(model).values())).add_(1.0)
        return None


class WrongScoreShape(Good):
    def score(self, model, data):
        name, param = next(iter(pretrained_parameters(model).items()))
        return {name: torch.zeros(param.numel() + 1)}


class OverBudget(Selector):
    def select(self, model, scores, budget, generator):
        return Selection(full=set(pretrained_parameters(model)))


class IgnoresTheGenerator(Selector):
    def select(self, model, scores, budget, generator):
        values = {n: torch.rand(p.shape) for n, p in pretrained_parameters(model).items()}  # global RNG
        return top_k(values, budget, "global", torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()))))


class KeepsScoresOnSelf(Selector):
    def score(self, model, data):
        self._chosen = next(iter(pretrained_parameters(model)))
        return {"dummy": torch.zeros(1)}

    def select(self, model, scores, budget, generator):
        return Selection(full={self._chosen})  # a fresh instance given cached scores has none


class MovesFrozenEntriesInAHook(Good):
    def after_step(self, model, step):
        with torch.no_grad():  # writes to a frozen tensor: moved, never counted
            pretrained_parameters(model)["bert.embeddings.word_embeddings.weight"].add_(0.01)


BROKEN = {
    "init_stores_params": StoresUnderAnotherName,
    "score_leaves_model_unchanged": MovesWeightsInScore,
    "scores_have_parameter_shapes": WrongScoreShape,
    "select_within_budget": OverBudget,
    "select_is_deterministic": IgnoresTheGenerator,
    "cache_round_trip": KeepsScoresOnSelf,
    "training_keeps_frozen_entries": MovesFrozenEntriesInAHook,
}


def test_every_check_has_a_broken_method_here():
    assert set(BROKEN) == set(CHECKS)


@pytest.mark.parametrize("check", sorted(BROKEN))
def test_each_check_fails_on_a_method_broken_that_way(check):
    outcome = run_check(BROKEN[check], check)
    assert not outcome.passed and outcome.detail, outcome


def test_a_good_class_passes_every_check_and_an_instance_is_checked_as_given():
    assert all(o.passed for o in check_method(Good)), [o for o in check_method(Good) if not o.passed]
    outcome = run_check(StoresUnderAnotherName(steps=5), "init_stores_params")
    assert not outcome.passed and "'steps' is not stored as self.steps" in outcome.detail


def test_expected_failures_are_read_from_the_class():
    class Declared(OverBudget):
        expected_check_failures = {"select_within_budget": "trains everything on purpose"}

    outcome = next(o for o in check_method(Declared) if o.check == "select_within_budget")
    assert not outcome.passed and outcome.ok and outcome.expected_failure == "trains everything on purpose"

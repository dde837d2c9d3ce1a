"""What a method author's mistakes print: each message names the fix, not only what broke."""
from __future__ import annotations

import pytest
import torch

from peftbench.contract.selector import Batches, Selector, top_k
from peftbench.core.errors import UsageError
from peftbench.testing import run_check


class ForgetsToRestore(Selector):
    needs_data = True

    def score(self, model, data):
        with torch.no_grad():
            next(iter(model.parameters())).add_(1.0)  # a fine-tuning phase left in place
        return None

    def select(self, model, scores, budget, generator):
        return top_k({n: p.detach().abs() for n, p in model.named_parameters()
                      if n.startswith(model.base_model_prefix + ".") and "pooler" not in n}, budget, "global", generator)


class ForgetsNeedsData(ForgetsToRestore):
    needs_data = False

    def score(self, model, data):
        return {n: torch.ones_like(p) for n, p in model.named_parameters()} if data.train else None


class NoDefault(ForgetsToRestore):
    def __init__(self, steps: int):
        self.steps = steps


class TakesBatches(ForgetsToRestore):
    def __init__(self, steps: Batches = 5):
        self.steps = steps


def test_a_score_that_moves_weights_is_told_to_use_scoring_session(tiny_model_dir):
    outcome = run_check(ForgetsToRestore, "score_leaves_model_unchanged", {}, tiny_model_dir)
    assert not outcome.passed and "scoring_session" in outcome.detail


def test_a_score_that_reads_data_without_needs_data_is_told_to_set_it(tiny_model_dir):
    outcome = run_check(ForgetsNeedsData, "scores_have_parameter_shapes", {}, tiny_model_dir)
    assert not outcome.passed and "set needs_data = True" in outcome.detail


def test_an_argument_without_a_default_is_told_to_give_one():
    from peftbench.testing import method_spec

    with pytest.raises(UsageError, match="'steps' has no default; give every argument a default"):
        method_spec(NoDefault)


def test_a_bad_batches_value_names_epoch():
    from peftbench.contract.selector import validate_params

    with pytest.raises(UsageError, match="give a positive integer .* or 'epoch'"):
        validate_params(TakesBatches, "takes-batches", {"steps": "abc"})
    assert validate_params(TakesBatches, "takes-batches", {"steps": "epoch"}) == {"steps": "epoch"}


def test_the_author_guides_scoring_phase_example_passes_the_conformance_suite(tiny_model_dir):
    """The LT-SFT block of the author guide (docs/guides/add-a-method.md), run as written."""
    import re
    import textwrap
    from pathlib import Path

    from peftbench.testing import check_method

    readme = (Path(__file__).parents[1] / "docs" / "guides" / "add-a-method.md").read_text()
    block = re.search(r"```python\n(   # lt_sft\.py\n.*?)   ```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(textwrap.dedent(block), "lt_sft.py", "exec"), namespace)
    outcomes = check_method(namespace["LTSFT"], {"steps": 2}, tiny_model_dir)
    assert all(o.ok for o in outcomes), [(o.check, o.detail) for o in outcomes if not o.ok]

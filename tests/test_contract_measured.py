"""The Selector contract measured by the runner, not taken from the method: each class below
breaks it one way that the method's own account (count(), a selection within budget) hides;
each run is refused by name, whatever the method says of itself."""
from __future__ import annotations

import re
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from peftbench.contract import registry
from peftbench.core.errors import UsageError

PLUGIN = textwrap.dedent('''
    import torch
    from peftbench.api import Selection, Selector, pretrained_parameters, top_k

    class Every(Selection):
        def count(self, numels):
            return 0  # says nothing is selected

    class CountsZero(Selector):
        def select(self, model, scores, budget, generator):
            return Every(full=set(pretrained_parameters(model)))

    class UnfreezesAll(Selector):
        def select(self, model, scores, budget, generator):
            return Selection()

        def apply(self, model, selection):
            for p in model.parameters():
                p.requires_grad_(True)
            return model

    class ZeroesInSelect(Selector):
        def select(self, model, scores, budget, generator):
            with torch.no_grad():
                model.get_input_embeddings().weight.zero_()
            return Selection()

    class MovesFrozenAfterStep(Selector):
        def select(self, model, scores, budget, generator):
            name = next(n for n in pretrained_parameters(model) if n.endswith("LayerNorm.bias"))
            return Selection(full={name})

        def after_step(self, model, step):
            with torch.no_grad():
                model.get_input_embeddings().weight.add_(1e-3)

    class HookInScore(Selector):
        def score(self, model, data):
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * -1)
            return None

        def select(self, model, scores, budget, generator):
            return Selection()
''')
CASES = {
    "count() that says 0 for a selection of everything": ("counts-zero", "over the budget"),
    "apply() that unfreezes everything": ("unfreezes-all", "entries trainable after training"),
    "select() that zeroes the word embeddings": ("zeroes-in-select", "changed the model in select()"),
    "after_step() that moves a frozen weight": ("moves-frozen", "moved 1 frozen pre-trained tensor"),
    "score() that leaves a forward hook": ("hook-in-score", "left 1 hook(s) on the model in score()"),
}


@pytest.fixture()
def broken(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry.entry_points
    extra = [EntryPoint(name, f"broken_plugin:{cls}", registry.GROUP) for name, cls in (
        ("counts-zero", "CountsZero"), ("unfreezes-all", "UnfreezesAll"), ("zeroes-in-select", "ZeroesInSelect"),
        ("moves-frozen", "MovesFrozenAfterStep"), ("hook-in-score", "HookInScore"))]
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), *extra])
    yield
    sys.modules.pop("broken_plugin", None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_that_breaks_the_contract_is_refused_by_the_runner(broken, tmp_path, tiny_model_dir, case):
    from peftbench.contract.settings import TrainConfig
    from peftbench.training.experiment import RunConfig, run_experiment

    method, expected = CASES[case]
    config = RunConfig(method=method, task="rte", budget="0.01", model=tiny_model_dir, limit=16,
                       train=TrainConfig(epochs=1, batch_size=8, max_length=32, lr=1e-2, max_steps=2),
                       output_dir=str(tmp_path / "runs"))
    with pytest.raises(UsageError, match=f"method {method!r}.*{re.escape(expected)}"):
        run_experiment(config, progress=False)

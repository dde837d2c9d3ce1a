"""A score is reused only for the settings its scoring read (`training.cache.ScoreCache.get_or_compute`
with `contract.scoring.RecordedSettings`), and a plugin is loaded only when named, failing alone."""
from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from peftbench.contract import registry

PLUGIN = textwrap.dedent('''
    import torch
    from peftbench.api import Selector, pretrained_parameters, scoring_session, top_k

    class ReadsLr(Selector):
        """Scores with a short fine-tuning phase at the run's rate (reads data.train.lr)."""
        needs_data = True

        def score(self, model, data):
            with scoring_session(model, data, steps=1) as (optimizer, scheduler):
                pass
            scale = data.train.lr
            return {n: p.detach().abs() * scale for n, p in pretrained_parameters(model).items()}

        def select(self, model, scores, budget, generator):
            return top_k(scores, budget, "global", generator)

    class OwnRate(ReadsLr):
        """The same phase at its own rate (a method parameter), never the run's."""

        def __init__(self, score_lr: float = 1e-4):
            self.score_lr = score_lr

        def score(self, model, data):
            with scoring_session(model, data, steps=1, lr=self.score_lr):
                pass
            return {n: p.detach().abs() for n, p in pretrained_parameters(model).items()}

    class Plain(ReadsLr):
        """Reads no training setting."""

        def score(self, model, data):
            return {n: p.detach().abs() for n, p in pretrained_parameters(model).items()}
''')


@pytest.fixture()
def plugins(tmp_path, monkeypatch):
    (tmp_path / "lr_plugin.py").write_text(PLUGIN)
    (tmp_path / "exits_plugin.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "interrupts_plugin.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = registry.entry_points
    extra = [EntryPoint(name, value, registry.GROUP) for name, value in (
        ("reads-lr", "lr_plugin:ReadsLr"), ("own-rate", "lr_plugin:OwnRate"), ("plain", "lr_plugin:Plain"),
        ("exits", "exits_plugin:Nothing"), ("interrupts", "interrupts_plugin:Nothing"))]
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), *extra])
    yield
    for name in ("lr_plugin", "exits_plugin", "interrupts_plugin"):
        sys.modules.pop(name, None)


def _run(method, lr, tmp_path, model):
    from peftbench.contract.settings import TrainConfig
    from peftbench.training.cache import ScoreCache
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(method=method, task="rte", budget="0.01", model=model, limit=16,
                       train=TrainConfig(epochs=1, batch_size=8, max_length=32, lr=lr, max_steps=2),
                       output_dir=str(tmp_path / "runs"))
    _, run_dir = run_experiment(config, progress=False, score_cache=ScoreCache(tmp_path / "scores"))
    return json.loads((run_dir / "seed-0" / "selection.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method, rescored", [("reads-lr", True), ("plain", False), ("own-rate", False)])
def test_a_score_is_reused_only_at_the_settings_its_scoring_read(plugins, tmp_path, tiny_model_dir, method, rescored):
    """The stale-score reproduction: a scoring phase at the run's rate, two rates. Reading the
    rate re-scores; a score that reads none (or its own rate, a method parameter) is shared."""
    first = _run(method, 3e-2, tmp_path, tiny_model_dir)
    second = _run(method, 1e-4, tmp_path, tiny_model_dir)
    assert not first["scores_from_cache"]
    assert second["scores_from_cache"] is not rescored
    assert (first["score_cache_key"] != second["score_cache_key"]) is rescored
    again = _run(method, 3e-2, tmp_path, tiny_model_dir)  # back at the first rate: its own entry
    assert again["scores_from_cache"] and again["score_cache_key"] == first["score_cache_key"]


def test_a_plugin_that_exits_or_interrupts_at_import_fails_alone(plugins):
    from peftbench.core.errors import UsageError

    assert registry.get("random").__name__ == "RandomMask"  # the others do not load
    listed = registry.methods()
    assert "SystemExit at import" in listed["exits"].error
    assert "KeyboardInterrupt at import" in listed["interrupts"].error
    assert listed["random"].selector_class is not None
    with pytest.raises(UsageError, match="method 'exits' from package .* failed to load: SystemExit at import"):
        registry.get("exits")

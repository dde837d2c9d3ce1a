"""Each baseline's mask: exact count, the right entries, determinism under a seed."""
import math

import pytest
import torch

from peftbench.contract import registry
from peftbench.modeling.models import pretrained_parameters

P = 0.01


def _select(model, method, seed=0, budget_fraction=P, **params):
    selector = registry.create(method, **params)
    numels = {n: p.numel() for n, p in pretrained_parameters(model).items()}
    k = math.floor(budget_fraction * sum(numels.values()))
    scores = selector.score(model, None)
    return selector.select(model, scores, k, torch.Generator().manual_seed(seed)), numels, k


@pytest.mark.parametrize("method, params", [("random", {}), ("random", {"scope": "tensor"}),
                                            ("magpruning", {}), ("magpruning", {"scope": "global"})])
def test_exact_budget_count(tiny_model, method, params):
    model, _ = tiny_model
    sel, numels, k = _select(model, method, **params)
    assert sel.count(numels) == k == math.floor(P * sum(numels.values()))


@pytest.mark.parametrize("method", ["random", "magpruning"])
def test_same_seed_same_mask(tiny_model, method):
    model, _ = tiny_model
    a, _, _ = _select(model, method, seed=5)
    b, _, _ = _select(model, method, seed=5)
    assert a.full == b.full and a.partial.keys() == b.partial.keys()
    assert all(torch.equal(a.partial[n], b.partial[n]) for n in a.partial)


def test_random_differs_across_seeds_and_is_spread(tiny_model):
    model, _ = tiny_model
    a, numels, k = _select(model, "random", seed=0)
    b, _, _ = _select(model, "random", seed=1)
    name = max(a.partial, key=lambda n: len(a.partial[n]))
    assert not torch.equal(a.partial[name], b.partial[name])
    # uniform over all entries: each tensor's share is close to its size share
    emb = "bert.embeddings.word_embeddings.weight"
    share = len(a.partial[emb]) / k
    assert abs(share - numels[emb] / sum(numels.values())) < 0.05


def test_magpruning_picks_largest_magnitudes(tiny_model):
    model, _ = tiny_model
    sel, _, _ = _select(model, "magpruning", scope="global")
    params = pretrained_parameters(model)
    chosen = torch.cat([p.detach().abs()[sel.mask(n, p.shape)] for n, p in params.items()])
    rest = torch.cat([p.detach().abs()[~sel.mask(n, p.shape)] for n, p in params.items()])
    assert chosen.min() >= rest.max()


def test_bitfit_selects_exactly_the_biases(tiny_model):
    model, _ = tiny_model
    sel, numels, _ = _select(model, "bitfit")
    biases = {n for n in numels if n.endswith(".bias")}
    assert sel.full == biases and not sel.partial
    assert "bert.embeddings.LayerNorm.bias" in sel.full
    assert "bert.embeddings.LayerNorm.weight" not in sel.full


def test_fulltuning_selects_everything(tiny_model):
    model, _ = tiny_model
    sel, numels, _ = _select(model, "fulltuning")
    assert sel.count(numels) == sum(numels.values())


def test_bad_method_parameter_is_a_usage_error():
    from peftbench.core.errors import UsageError

    with pytest.raises(UsageError, match="allowed tensor, global"):
        registry.create("random", scope="row")
    with pytest.raises(UsageError, match="method 'bitfit' has no parameter 'nonsense'"):
        registry.create("bitfit", nonsense=1)


@pytest.mark.parametrize("method", ["ggm", "adapeft", "spectral"])
def test_search_space_builds_valid_selectors(method):
    import optuna

    space = registry.get(method).search_space()
    assert space
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(space)
    selector = registry.create(method, **trial.params)
    assert {k: selector.get_params()[k] for k in space} == trial.params

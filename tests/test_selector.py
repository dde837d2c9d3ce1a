"""The maths of budgets and thresholding, independent of any model."""
import math

import pytest
import torch

from peftbench.contract.selector import Budget, apportion, top_k
from peftbench.core.errors import UsageError
from peftbench.modeling.selection import Selection


@pytest.mark.parametrize("text, fraction, count", [("0.005", 0.005, None), ("1", 1.0, None),
                                                   ("1e-3", 0.001, None), ("1200", None, 1200)])
def test_budget_parse(text, fraction, count):
    assert Budget.parse(text) == Budget(fraction=fraction, count=count)


@pytest.mark.parametrize("text", ["0", "-0.1", "1.5", "abc", "", "nan"])
def test_budget_parse_rejects(text):
    with pytest.raises(UsageError, match="budget"):
        Budget.parse(text)


def test_budget_entries_floor_and_count_above_size():
    assert Budget(fraction=0.005).entries(22_713_216) == math.floor(0.005 * 22_713_216)
    assert Budget(count=10).entries(100) == 10
    with pytest.raises(UsageError, match="above the model size: the pre-trained model has 100"):
        Budget(count=101).entries(100)


@pytest.mark.parametrize("k", [0, 1, 7, 113, 999, 1000])
def test_apportion_is_exact_and_proportional(k):
    numels = {"a": 384, "b": 147_456, "c": 3, "d": 1_536, "e": 12}
    alloc = apportion(k, numels)
    assert sum(alloc.values()) == k
    total = sum(numels.values())
    for name, n in numels.items():
        assert abs(alloc[name] - k * n / total) < 1  # within one of its exact share
        assert alloc[name] <= n


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(20, 30, generator=g), "b": torch.randn(30, generator=g),
            "e": torch.randn(50, 8, generator=g)}


def test_global_top_k_matches_brute_force():
    scores = _scores()
    k = 97
    sel = top_k(scores, k, "global", torch.Generator().manual_seed(0))
    flat = torch.cat([s.flatten() for s in scores.values()])
    threshold = flat.sort(descending=True).values[k - 1]
    assert sel.count({n: s.numel() for n, s in scores.items()}) == k
    for name, s in scores.items():
        chosen = sel.mask(name, s.shape)
        assert torch.equal(chosen, s >= threshold)


def test_tensor_top_k_takes_each_tensors_best():
    scores = _scores(1)
    numels = {n: s.numel() for n, s in scores.items()}
    sel = top_k(scores, 50, "tensor", torch.Generator().manual_seed(0))
    quotas = apportion(50, numels)
    for name, s in scores.items():
        chosen = sel.mask(name, s.shape)
        assert int(chosen.sum()) == quotas[name]
        if quotas[name]:
            assert s[chosen].min() >= s[~chosen].max()


def test_ties_are_broken_by_the_seed_deterministically():
    scores = {"w": torch.ones(1000)}
    a = top_k(scores, 10, "global", torch.Generator().manual_seed(3))
    b = top_k(scores, 10, "global", torch.Generator().manual_seed(3))
    c = top_k(scores, 10, "global", torch.Generator().manual_seed(4))
    assert torch.equal(a.partial["w"], b.partial["w"])
    assert not torch.equal(a.partial["w"], c.partial["w"])


def test_whole_tensor_selected_becomes_full():
    sel = top_k({"b": torch.ones(3), "w": torch.zeros(100)}, 3, "global", torch.Generator())
    assert sel.full == {"b"} and sel.partial == {}


def test_unknown_scope():
    with pytest.raises(UsageError, match="allowed tensor, global"):
        top_k(_scores(), 5, "layer", torch.Generator())


def test_selection_mask_and_count():
    sel = Selection(full={"a"}, partial={"b": torch.tensor([0, 5])})
    assert sel.count({"a": 4, "b": 10, "c": 7}) == 6
    assert sel.per_tensor({"a": 4, "b": 10, "c": 7}) == {"a": 4, "b": 2, "c": 0}
    assert sel.mask("b", torch.Size([2, 5])).nonzero().tolist() == [[0, 0], [1, 0]]

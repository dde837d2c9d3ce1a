"""AdaPEFT maths: exact knapsack front vs brute force, front properties, Hutchinson estimate."""
import random

import pytest
import torch

from peftbench import registry
from peftbench.methods.adapeft import (best_under, brute_force_knapsack, greedy_front,
                                       hutchinson_diagonal, pareto_front)


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_front_equals_brute_force(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 10)
    values = [rng.uniform(0, 10) for _ in range(k)]
    weights = [rng.randint(1, 50) for _ in range(k)]
    front, exact = pareto_front(values, weights)
    assert exact
    for capacity in (0, 10, 37, 100, 500):
        assert best_under(front, capacity).value == pytest.approx(
            brute_force_knapsack(values, weights, capacity))


def test_front_is_non_dominated_and_monotone():
    rng = random.Random(1)
    values = [rng.uniform(0, 5) for _ in range(12)]
    weights = [rng.randint(1, 30) for _ in range(12)]
    front, _ = pareto_front(values, weights)
    for a, b in zip(front, front[1:]):
        assert b.weight > a.weight and b.value > a.value
    for p in front:  # each point is a real subset with its stated weight and value
        assert p.weight == sum(weights[i] for i in p.items)
        assert p.value == pytest.approx(sum(values[i] for i in p.items))


def test_greedy_fallback_when_front_too_large():
    values = [float(i + 1) for i in range(16)]
    weights = [i + 1 for i in range(16)]
    front, exact = pareto_front(values, weights, max_front=5)
    assert not exact and front == greedy_front(values, weights)
    for a, b in zip(front, front[1:]):
        assert b.weight > a.weight and b.value >= a.value


def test_hutchinson_matches_exact_diagonal_on_a_quadratic():
    torch.manual_seed(0)
    a = torch.randn(6, 6)
    hessian = a @ a.T + torch.eye(6)
    x = torch.randn(6, requires_grad=True)
    loss = 0.5 * x @ hessian @ x
    grads, diag = hutchinson_diagonal(loss, [x], 4000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(grads[0], hessian @ x.detach())
    torch.testing.assert_close(diag[0], torch.diagonal(hessian), atol=0.25, rtol=0.05)
    # exact in one draw for a diagonal Hessian
    y = torch.randn(5, requires_grad=True)
    d = torch.rand(5) + 0.1
    _, diag = hutchinson_diagonal(0.5 * (d * y * y).sum(), [y], 1, torch.Generator())
    torch.testing.assert_close(diag[0], d)


def test_adapeft_selects_whole_groups_within_budget(tiny_model_dir):
    from peftbench.data import load_task, tokenize
    from peftbench.models import load_model, pretrained_parameters
    from peftbench.scoring import ScoringData
    from peftbench.trainer import make_loader, pick_device

    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir, 2)
    data = tokenize(task, tokenizer, task.load_splits(limit=16), 64)
    scoring = ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task, pick_device("cpu"))
    method = registry.create("adapeft", groups="module", batches=2)
    scores = method.score(model, scoring)
    numels = {n: p.numel() for n, p in pretrained_parameters(model).items()}
    for budget in (1000, 20000):
        sel = method.select(model, scores, budget, torch.Generator())
        assert not sel.partial and sel.count(numels) <= budget
        assert sel.notes["front_exact"]
        values = [sel.notes["front"][i][1] for i in range(len(sel.notes["front"]))]
        assert values == sorted(values)


def test_group_curvature_is_exact_g_h_g_per_group():
    from peftbench.methods.adapeft import group_curvature

    torch.manual_seed(0)
    a = torch.randn(7, 7)
    hessian = a @ a.T - 2 * torch.eye(7)  # indefinite: the exact value may be negative
    x = torch.randn(7, requires_grad=True)
    parts = list(torch.split(x, [3, 2, 2]))
    loss = 0.5 * torch.cat(parts) @ hessian @ torch.cat(parts)
    direction = [torch.randn(3), torch.randn(2), torch.randn(2)]
    group_of = [0, 1, 0]  # groups {part 0, part 2} and {part 1}
    out = group_curvature(loss, parts, direction, group_of, 2)
    d0 = torch.cat([direction[0], torch.zeros(2), direction[2]])
    d1 = torch.cat([torch.zeros(3), direction[1], torch.zeros(2)])
    assert out == pytest.approx([float(d0 @ hessian @ d0), float(d1 @ hessian @ d1)], rel=1e-5)


def test_exact_curvature_values_every_module_group_on_a_tiny_model(tiny_model_dir):
    """The issue's measurement: one-z Hutchinson zeroes groups whose exact g^T H g is positive."""
    from peftbench.data import load_task, tokenize
    from peftbench.models import load_model
    from peftbench.scoring import ScoringData
    from peftbench.trainer import make_loader, pick_device

    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir, 2)
    data = tokenize(task, tokenizer, task.load_splits(limit=16), 64)
    scoring = ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task, pick_device("cpu"))
    values = {}
    for hessian in ("exact", "hutchinson"):
        scores = registry.create("adapeft", groups="module", batches=2, hessian=hessian).score(model, scoring)
        values[hessian] = {n: float(s.sum()) for n, s in scores.items()}
    exact_zero = sum(v == 0 for v in values["exact"].values())
    hutch_zero = sum(v == 0 for v in values["hutchinson"].values())
    assert exact_zero < hutch_zero


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_module_groups_span_the_blocks_of_each_architecture(kind):
    """"module" grouping collapses the block index with the architecture's own block pattern
    (GPT-2's `h.N`, Llama's `layers.N`; it was BERT's `layer.N` only, so decoders got one group
    per tensor)."""
    import re

    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    from peftbench.methods.adapeft import AdaPEFT, group_key

    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=8, n_layer=3, n_head=2, n_positions=16)) if kind == "gpt2" \
        else LlamaModel(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                    num_attention_heads=2, num_key_value_heads=1))
    block = AdaPEFT(groups="module")._block(model)
    names = [n for n, _ in model.named_parameters()]
    groups = {group_key(n, "module", block) for n in names}
    per_block = {re.sub(r"\.\d+\.", ".*.", n) for n in names}
    assert groups == per_block and len(groups) < len(names)

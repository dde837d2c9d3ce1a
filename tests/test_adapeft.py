"""AdaPEFT: the multiple-choice knapsack against brute force, the GeN-style fit's gates, the
PEFT families and their costs, and a probe-valued selection that spends its budget."""
import random

import numpy as np
import pytest
import torch

from peftbench.contract import registry
from peftbench.methods.adapeft import (
    SCALES,
    best_under,
    brute_force_knapsack,
    families,
    greedy_front,
    pareto_front,
    quadratic_value,
)


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_front_equals_brute_force(seed):
    """At most one option per class (a LoRA kind's ranks), exact at every capacity."""
    rng = random.Random(seed)
    k = rng.randint(1, 9)
    values = [rng.uniform(-1, 10) for _ in range(k)]
    weights = [rng.randint(1, 50) for _ in range(k)]
    classes = [rng.choice("abcd") for _ in range(k)]
    front, exact = pareto_front(values, weights, classes)
    assert exact
    for capacity in (0, 10, 37, 100, 500):
        point = best_under(front, capacity)
        assert point.value == pytest.approx(brute_force_knapsack(values, weights, capacity, classes))
        assert len({classes[i] for i in point.items}) == len(point.items)


def test_front_is_non_dominated_and_monotone():
    rng = random.Random(1)
    values = [rng.uniform(0, 5) for _ in range(12)]
    weights = [rng.randint(1, 30) for _ in range(12)]
    front, _ = pareto_front(values, weights)
    for a, b in zip(front, front[1:]):
        assert b.weight > a.weight and b.value > a.value
    for p in front:  # each point is a real choice with its stated weight and value
        assert p.weight == sum(weights[i] for i in p.items)
        assert p.value == pytest.approx(sum(values[i] for i in p.items))


def test_greedy_fallback_when_front_too_large_keeps_one_option_per_class():
    values = [float(i + 1) for i in range(16)]
    weights = [i + 1 for i in range(16)]
    classes = [str(i // 2) for i in range(16)]
    front, exact = pareto_front(values, weights, classes, max_front=5)
    assert not exact and front == greedy_front(values, weights, classes)
    for p in front:
        assert len({classes[i] for i in p.items}) == len(p.items)


def test_quadratic_fit_value_and_its_gates():
    etas = np.array(SCALES)
    loss = 2.0 - 1.5 * etas + 2.0 * etas ** 2 / 2  # b = 1.5, a = 2: value b^2 / 2a
    value, r2 = quadratic_value(etas, loss, 0.9)
    assert value == pytest.approx(1.5 ** 2 / 4) and r2 == pytest.approx(1.0)
    falls = 2.0 - 1.5 * etas - 0.3 * etas ** 2  # no positive curvature, the loss still falls
    top = etas.max()
    assert quadratic_value(etas, falls, 0.9)[0] == pytest.approx(1.5 * top + 0.3 * top ** 2)  # what the range gave
    assert quadratic_value(etas, 2.0 + 1.5 * etas + etas ** 2, 0.9)[0] == 0.0  # the loss rises
    far = 2.0 - 1.5 * etas + 0.2 * etas ** 2 / 2  # its best step (7.5) beyond the range: held at its end
    assert quadratic_value(etas, far, 0.9)[0] == pytest.approx(1.5 * top - 0.2 * top ** 2 / 2)
    noisy = loss + 3.0 * (-1.0) ** np.arange(len(etas))  # a zigzag no quadratic follows
    value, r2 = quadratic_value(etas, noisy, 0.9)
    assert r2 < 0.9 and value == 0.0  # a poor fit is discarded
    assert quadratic_value(etas, noisy, 0.0)[0] > 0


def test_gen_scales_go_both_ways_and_only_the_step_direction_counts():
    """GeN fits around the current point with "minus learning rates": scales on both sides of 0,
    4 per candidate plus the shared 0 (the reviews' 4k+1 passes). A loss that falls only against
    the step (concave, lower at rho = -2) is worth nothing: the family would not take that step."""
    assert sorted(SCALES) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    rho = np.array(SCALES)
    backwards = 1.0 + 0.1 * rho - 0.05 * rho ** 2
    assert backwards[0] < backwards[2] and quadratic_value(rho, backwards, 0.9)[0] == 0.0


def _scoring(tiny_model_dir, lr=1e-2):
    from peftbench.contract.scoring import ScoringData
    from peftbench.contract.settings import TrainConfig
    from peftbench.data.encode import tokenize
    from peftbench.data.tasks import load_task
    from peftbench.modeling.models import load_model
    from peftbench.training.trainer import make_loader, pick_device

    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir, 2)
    data = tokenize(task, tokenizer, task.load_splits(limit=32), 64)
    return model, ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task,
                              pick_device("cpu"), TrainConfig(lr=lr))


@pytest.mark.slow
def test_families_are_peft_families_with_their_costs(tiny_model_dir):
    model, _ = _scoring(tiny_model_dir)
    found = {f.name: f for f in families(model, (1, 4))}
    # tiny BERT: hidden 32, intermediate 64, 2 layers
    assert found["lora:attention.self.query:r1"].cost == 2 * (32 + 32)
    assert found["lora:intermediate.dense:r4"].cost == 4 * 2 * (32 + 64)
    assert found["bitfit"].cost == 2 * (4 * 32 + 64 + 32)
    assert found["layernorm"].cost == 2 * 32 + 2 * 2 * (2 * 32)  # embeddings + 2 per block
    assert {f.klass for f in found.values() if f.kind == "lora"} == {
        "lora:attention.self.query", "lora:attention.self.key", "lora:attention.self.value",
        "lora:attention.output.dense", "lora:intermediate.dense", "lora:output.dense"}
    assert not any("pooler" in n for f in found.values() for n in f.targets)


def test_probe_values_select_within_budget_and_the_count_is_the_plan(tiny_model_dir):
    from peftbench.modeling.models import head_parameters, pretrained_parameters
    from peftbench.modeling.sparse import count_trainable

    model, scoring = _scoring(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = registry.create("adapeft", probe_steps=6, checkpoints=2, fit_batches=2, min_r2=0.5)
    scores = method.score(model, scoring)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # scoring moves nothing
    values = scores["family.value"]
    assert (values >= 0).all() and (values > 0).any()
    pre, head = set(pretrained_parameters(model)), set(head_parameters(model))
    budget = 1500
    sel = method.select(model, scores, budget, torch.Generator())
    assert sel.notes["spent"] <= budget and sel.notes["front_exact"]
    trained = method.apply(model, sel)
    counts = count_trainable(trained, pre, head)
    assert counts["trainable"] == sel.notes["spent"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_families_on_decoders(kind):
    """LoRA kinds from each architecture's layout (GPT-2's Conv1D `c_attn`: cost from its
    weight's shape); Llama has no biases, so no BitFit family, and RMSNorm is its norm family."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=8, n_layer=3, n_head=2, n_positions=16)) \
        if kind == "gpt2" else LlamaForSequenceClassification(LlamaConfig(
            vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1))
    found = {f.name: f for f in families(model, (2,))}
    if kind == "gpt2":
        assert found["lora:attn.c_attn:r2"].cost == 3 * 2 * (8 + 24) and "bitfit" in found
    else:
        assert found["lora:self_attn.k_proj:r2"].cost == 3 * 2 * (8 + 4) and "bitfit" not in found
    assert found["layernorm"].cost > 0


def test_a_lora_rank_is_worth_the_bands_of_its_kind_up_to_it():
    """A rank reaches everything a smaller rank of its kind reaches: its value sums the bands
    below it, so it is never valued below the smaller rank (a band of value 0 adds nothing)."""
    from peftbench.methods.adapeft import Family, nested_values

    cands = [Family(f"lora:q:r{r}", "lora:q", "lora", r, ("q",), r) for r in (1, 4, 16)] + [
        Family("bitfit", "bitfit", "bitfit", 0, ("b",), 3)] + [
        Family(f"lora:v:r{r}", "lora:v", "lora", r, ("v",), r) for r in (1, 4, 16)]
    values = nested_values(cands, [0.5, 0.2, 0.0, 0.3, 0.1, 0.0, 0.4])
    assert values == pytest.approx([0.5, 0.7, 0.7, 0.3, 0.1, 0.1, 0.5])
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = nested_values(cands, rng.uniform(0, 1, len(cands)))
        assert values[0] <= values[1] <= values[2] and values[4] <= values[5] <= values[6]


def test_lora_bands_are_orthogonal_parts_of_the_step_that_add_up_to_the_rank_r_approximation(tiny_model):
    """`_directions` gives LoRA of rank r the step's singular components from the next smaller
    rank up to r: the bands up to r sum to the best rank-r approximation of the step's change of
    B A, and two bands of one module are orthogonal (so their fits are separate parts of it)."""
    import copy

    from peft import inject_adapter_in_model

    from peftbench.api import canonical_name, layout
    from peftbench.methods.adapeft import AdaPEFT, _lora_config

    model, _ = tiny_model
    ranks = (1, 2, 4)
    cands = [f for f in families(model, ranks) if f.klass == "lora:attention.self.query"]
    probe = inject_adapter_in_model(_lora_config({"attention.self.query": 4}, layout(model).block), copy.deepcopy(model))
    params = [p for n, p in probe.named_parameters() if "lora_" in n]
    torch.manual_seed(0)
    before = [p.detach().clone() + 0.1 * torch.randn_like(p) for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    after = [b + 0.05 * torch.randn_like(b) for b in before]
    bands = AdaPEFT._directions(cands, probe, before, params, after)
    module = cands[0].targets[0]
    key = f"{module}.base_layer.weight"
    now = {canonical_name(n): p for n, p in probe.named_parameters()}
    a_name, b_name = (canonical_name(f"{module}.lora_{x}.default.weight") for x in "AB")
    index = {id(p): i for i, p in enumerate(params)}
    a0, b0 = now[a_name], now[b_name]
    a1, b1 = after[index[id(a0)]], after[index[id(b0)]]
    change = (b1 @ a1 - b0 @ a0) * probe.get_submodule(module).scaling["default"]
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    for i, r in enumerate(ranks):
        summed = sum(bands[j][key] for j in range(i + 1))
        assert torch.allclose(summed, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5)
    assert abs(float((bands[1][key] * bands[2][key]).sum())) < 1e-6
    assert float(bands[2][key].norm()) > 0

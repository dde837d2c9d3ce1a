"""SPEFT's salience selectors (SNIP, SynFlow, GraSP), each against an independent computation
or its defining property, on a tiny BERT and real RTE rows."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.func import functional_call

from peftbench.contract import registry
from peftbench.contract.scoring import ScoringData
from peftbench.contract.selector import top_k
from peftbench.data.encode import tokenize
from peftbench.data.tasks import load_task
from peftbench.methods.snip import block_linear_weights
from peftbench.modeling.compute import forward, loss_fn
from peftbench.modeling.models import load_model
from peftbench.training.trainer import make_loader, pick_device

CPU = pick_device("cpu")


@pytest.fixture(scope="module")
def rte():
    task = load_task("rte")
    return task, task.load_splits(limit=24)


def _setup(model_dir, rte):
    task, splits = rte
    model, tokenizer = load_model(model_dir, 2)
    data = ScoringData(make_loader(tokenize(task, tokenizer, splits, 64)["train"], tokenizer, task, 4, False, 0),
                       task, CPU)
    return model, data


def _unchanged(model, before):
    return all(torch.equal(before[n], t) and before[n].dtype == t.dtype for n, t in model.state_dict().items())


def test_candidates_are_the_block_linear_weights(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, 2)
    names = block_linear_weights(model)
    assert names and all(".encoder.layer." in n and n.endswith(".weight") for n in names)
    assert not any("pooler" in n or "embeddings" in n or "LayerNorm" in n for n in names)
    assert len(names) == 2 * 6  # query, key, value, attention output, intermediate, output per layer


def test_snip_is_theta_times_the_summed_gradient_and_taylor_fo_is_the_same_mask(tiny_model_dir, rte):
    model, data = _setup(tiny_model_dir, rte)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    scores = registry.create("snip", batches=3).score(model, data)
    assert _unchanged(model, before)
    model.eval()
    params = dict(model.named_parameters())
    names = sorted(block_linear_weights(model))
    summed = {n: torch.zeros_like(params[n]) for n in names}
    for batch in itertools.islice(data.batches(), 3):  # by hand: autograd.grad per batch
        grads = torch.autograd.grad(loss_fn(forward(model, batch, data.task), batch["labels"], data.task),
                                    [params[n] for n in names])
        for n, g in zip(names, grads):
            summed[n] += g
    for n in names:
        torch.testing.assert_close(scores[n], (params[n].detach() * summed[n]).abs(), rtol=1e-5, atol=1e-9)
    taylor = {n: s.square() for n, s in scores.items()}  # SPEFT's Taylor-FO: (w * g)^2
    for k in (10, 100, 1000):
        for scope in ("global", "tensor"):
            a = top_k(scores, k, scope, torch.Generator().manual_seed(0))
            b = top_k(taylor, k, scope, torch.Generator().manual_seed(0))
            assert a.full == b.full and {n: i.tolist() for n, i in a.partial.items()} == \
                {n: i.tolist() for n, i in b.partial.items()}


def test_synflow_is_data_free_sign_blind_and_leaves_the_model_as_it_was(tiny_model_dir, rte):
    model, data = _setup(tiny_model_dir, rte)
    attention = model.config._attn_implementation
    before = {n: t.clone() for n, t in model.state_dict().items()}
    scores = registry.create("synflow").score(model, data)
    assert _unchanged(model, before) and model.config._attn_implementation == attention
    values = torch.cat([s.flatten() for s in scores.values()])
    assert torch.isfinite(values).all() and (values >= 0).all() and (values > 0).float().mean() > 0.5
    flipped = copy.deepcopy(model)  # the |theta| network: a weight's sign changes nothing
    with torch.no_grad():
        for n in list(scores)[:4]:
            dict(flipped.named_parameters())[n].neg_()
    again = registry.create("synflow").score(flipped, data)
    for n in scores:
        torch.testing.assert_close(again[n], scores[n], rtol=1e-5, atol=0)


def test_grasp_is_theta_times_an_independent_hessian_gradient_product(tiny_model_dir, rte):
    model, data = _setup(tiny_model_dir, rte)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    grasp = registry.create("grasp", batches=1, temperature=200.0)
    scores = grasp.score(model, data)
    assert _unchanged(model, before) and model.config._attn_implementation == "sdpa"
    model.eval()
    model.set_attn_implementation("eager")  # forward-mode AD below, as GraSP's double backward
    names = sorted(block_linear_weights(model))
    params = {n: p.detach() for n, p in model.named_parameters()}
    first, second = list(itertools.islice(data.batches(), 2))

    def loss(candidates, batch):
        logits = functional_call(model, {**params, **candidates}, kwargs={
            k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.nn.functional.cross_entropy(logits / 200.0, batch["labels"])

    theta = {n: params[n] for n in names}
    g = torch.func.grad(loss)(theta, first)  # the fixed gradient, batch 1
    _, hg = torch.func.jvp(lambda c: torch.func.grad(loss)(c, second), (theta,), (g,))  # H g, batch 2
    for n in names:
        torch.testing.assert_close(scores[n], params[n] * hg[n], rtol=1e-4, atol=1e-10)


def test_skeletonization_is_minus_theta_times_the_summed_gradient_and_chooses_otherwise(tiny_model_dir, rte):
    """Skeletonization scores -theta * g, g summed by hand as for SNIP: its magnitude is SNIP's
    score, its sign puts entries whose removal would lower the loss last, so at a small budget
    the two masks differ."""
    model, data = _setup(tiny_model_dir, rte)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    skeleton = registry.create("skeletonization", batches=3).score(model, data)
    assert _unchanged(model, before)
    snip = registry.create("snip", batches=3).score(model, data)
    model.eval()
    params = dict(model.named_parameters())
    names = sorted(block_linear_weights(model))
    summed = {n: torch.zeros_like(params[n]) for n in names}
    for batch in itertools.islice(data.batches(), 3):
        grads = torch.autograd.grad(loss_fn(forward(model, batch, data.task), batch["labels"], data.task),
                                    [params[n] for n in names])
        for n, g in zip(names, grads):
            summed[n] += g
    assert sorted(skeleton) == names
    for n in names:
        torch.testing.assert_close(skeleton[n], -(params[n].detach() * summed[n]), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(skeleton[n].abs(), snip[n], rtol=1e-6, atol=0)
    assert any((s < 0).any() for s in skeleton.values())  # entries whose removal lowers the loss
    a = top_k(skeleton, 100, "global", torch.Generator().manual_seed(0))
    b = top_k(snip, 100, "global", torch.Generator().manual_seed(0))
    assert {n: i.tolist() for n, i in a.partial.items()} != {n: i.tolist() for n, i in b.partial.items()}

"""The sparse step (peftbench.modeling.sparse): the k trained entries' gradients equal the dense gradient
at those entries, frozen entries stay bit-identical, and the fast path is really taken."""
from __future__ import annotations

import copy

import pytest
import torch

from peftbench.contract import registry
from peftbench.modeling.models import pretrained_parameters
from peftbench.modeling.sparse import (
    SparseDelta,
    SparseEmbeddingFunction,
    SparseLinearFunction,
    apply_selection,
    sampled_gradient,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA path needs a GPU (none here)"))]


def _dense_reference(model):
    """The same model with the fast forwards removed: every weight goes through the
    parametrisation, whose autograd computes the dense gradient and gathers it."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        module.__dict__.pop("forward", None)
    return reference


def _grads(model, ids, labels):
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_gradients(fast, dense, ids, labels):
    """The same loss, and the same gradient for every trainable parameter, on both models."""
    loss_fast, g_fast = _grads(fast, ids, labels)
    loss_dense, g_dense = _grads(dense, ids, labels)
    torch.testing.assert_close(loss_fast, loss_dense)
    assert g_fast.keys() == g_dense.keys()
    for name, grad in g_fast.items():
        torch.testing.assert_close(grad, g_dense[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_trained_entries_get_the_dense_gradient(tiny_model, scope, device):
    model, _ = tiny_model
    model.eval()  # no dropout: both passes see the same function
    numel = sum(p.numel() for p in pretrained_parameters(model).values())
    selection = registry.create("random", scope=scope).select(
        model, None, numel // 50, torch.Generator().manual_seed(0))
    fast = apply_selection(model, selection).to(device)
    dense = _dense_reference(fast)
    assert sum("forward" in m.__dict__ for m in fast.modules()) >= 10  # Linears + embeddings
    ids = torch.randint(1000, 20000, (4, 24), generator=torch.Generator().manual_seed(1))
    ids[:, -4:] = 0  # padding rows: no gradient for the padding index, as F.embedding
    ids, labels = ids.to(device), torch.tensor([0, 1, 1, 0], device=device)
    _assert_same_gradients(fast, dense, ids, labels)


def test_linear_function_matches_autograd_with_a_bias_and_leading_dims():
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    delta = SparseDelta(torch.tensor([29, 3, 0, 17]), weight)
    delta.values.data = torch.randn(4)
    bias = torch.randn(6, requires_grad=True)
    x = torch.randn(2, 3, 5, requires_grad=True)
    out = SparseLinearFunction.apply(x, weight, bias, delta.values, delta)
    grad_out = torch.randn_like(out)
    gx, gb, gv = torch.autograd.grad(out, (x, bias, delta.values), grad_out)
    values = delta.values.detach().clone().requires_grad_()
    w = weight.reshape(-1).index_add(0, delta.indices, values).view_as(weight)
    x2 = x.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x2, w, bias2)
    torch.testing.assert_close(out, ref)
    rx, rb, rv = torch.autograd.grad(ref, (x2, bias2, values), grad_out)
    for a, b in ((gx, rx), (gb, rb), (gv, rv)):
        torch.testing.assert_close(a, b)


def test_sampled_gradient_in_chunks_equals_the_dense_product():
    """Many tokens (several CPU chunks) and unsorted indices."""
    torch.manual_seed(0)
    m, n, tokens = 40, 30, 5000
    indices = torch.randperm(m * n)[:97]
    delta = SparseDelta(indices, torch.zeros(m, n))
    g, x = torch.randn(tokens, m, dtype=torch.float64), torch.randn(tokens, n, dtype=torch.float64)
    dense = (g.t() @ x).reshape(-1)[indices].float()
    torch.testing.assert_close(sampled_gradient(g.float(), x.float(), delta, torch.Size([m, n])),
                               dense, rtol=1e-4, atol=1e-3)


def test_embedding_function_ids_hitting_no_trained_row_get_no_delta():
    weight = torch.randn(10, 4)
    delta = SparseDelta(torch.tensor([5, 6, 33]), weight)  # rows 1 and 8
    delta.values.data = torch.tensor([1.0, 2.0, 3.0])
    ids = torch.tensor([[0, 1, 2, 8, 1]])
    out = SparseEmbeddingFunction.apply(ids, weight, delta.values, delta, 0)
    w = weight.clone().reshape(-1)
    w[[5, 6, 33]] += torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(out, w.view(10, 4)[ids])
    (grad,) = torch.autograd.grad(out.sum(), delta.values)
    torch.testing.assert_close(grad, torch.tensor([2.0, 2.0, 1.0]))  # row 1 looked up twice


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_step_keeps_frozen_entries_bit_identical(tiny_model, device):
    model, _ = tiny_model
    before = {n: p.detach().clone() for n, p in pretrained_parameters(model).items()}
    numel = sum(p.numel() for p in before.values())
    selection = registry.create("random", scope="global").select(
        model, None, numel // 100, torch.Generator().manual_seed(0))
    model = apply_selection(model, selection).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1000, 20000, (4, 16), device=device)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(input_ids=ids).logits,
                                          torch.tensor([0, 1, 0, 1], device=device)).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed, expected = 0, 0
    for name, original in before.items():
        module_name, _, attr = name.rpartition(".")
        now = getattr(model.get_submodule(module_name), attr).detach().cpu()
        mask = selection.mask(name, original.shape) if name in selection.partial else \
            torch.full(original.shape, name in selection.full)
        assert torch.equal(now[~mask], original[~mask]), name
        if "_embeddings" not in name:  # rows the batch does not look up get no gradient
            changed += int((now[mask] != original[mask]).sum())
            expected += int(mask.sum())
    assert changed > 0.9 * expected > 0


def _tiny_decoder(kind: str):
    """A tiny random decoder classifier built from its config (no download)."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2ForSequenceClassification(GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=64, pad_token_id=0))
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=1, pad_token_id=0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_trained_entries_get_the_dense_gradient_on_decoder_layers(kind, device):
    """GPT-2's Conv1D projections (W stored [in, out]) and Llama's Linear projections take the
    fast sparse step, and its gradients equal the dense ones at the trained entries."""
    from transformers.pytorch_utils import Conv1D

    model = _tiny_decoder(kind).eval()
    numel = sum(p.numel() for p in pretrained_parameters(model).values())
    selection = registry.create("random", scope="tensor").select(
        model, None, numel // 20, torch.Generator().manual_seed(0))
    fast = apply_selection(model, selection).to(device)
    dense = _dense_reference(fast)
    layer_kind = Conv1D if kind == "gpt2" else torch.nn.Linear
    fast_layers = [m for m in fast.modules() if isinstance(m, layer_kind) and "forward" in m.__dict__]
    assert len(fast_layers) >= 8  # 4 projections (GPT-2) / 7 (Llama) per block take the fast path
    ids = torch.randint(1, 500, (4, 12), generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.tensor([0, 1, 1, 0], device=device)
    _assert_same_gradients(fast, dense, ids, labels)

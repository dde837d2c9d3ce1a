"""SynFlow (Tanaka et al., NeurIPS 2020), data-free, as SPEFT scores sparse fine-tuning."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from peftbench.api import Scope, Selection, Selector, check_scope, top_k
from peftbench.methods.snip import block_linear_weights, eager_attention

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "log_softmax", "elu", "selu",
               "leaky_relu", "mish", "hardtanh", "softplus", "glu")


@contextlib.contextmanager
def _linearised(model):
    """|theta| in place of theta and the nonlinearities as the identity, undone on exit (the
    model is bit-identical afterwards: |x| * sign(x) == x)."""
    state = {n: t for n, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    with torch.no_grad():
        signs = {n: torch.sign(t) for n, t in state.items()}
        zeros = {n: t == 0 for n, t in state.items()}  # sign(0) = 0: keep -0.0 and 0.0 apart
        originals = {n: t.detach().clone() for n, t in state.items() if zeros[n].any()}
        for t in state.values():
            t.abs_()
    saved = {name: getattr(F, name) for name in ACTIVATIONS if hasattr(F, name)}
    hooks = []
    for module in model.modules():  # activation modules bind F.* at construction (HF ACT2FN)
        kind = type(module).__name__.lower()
        if any(a in kind for a in ("gelu", "relu", "silu", "tanh", "sigmoid", "activation", "mish")):
            hooks.append(module.register_forward_hook(lambda m, inputs, output: inputs[0]))
    try:
        for name in saved:
            setattr(F, name, lambda x, *args, **kwargs: x)
        yield
    finally:
        for name, function in saved.items():
            setattr(F, name, function)
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for n, t in state.items():
                t.mul_(signs[n])
                if n in originals:
                    t.copy_(originals[n])


class SynFlow(Selector):
    """Data-free: with every parameter replaced by its magnitude and the nonlinearities by the
    identity, R = sum of the logits for an input of ones; score |theta * dR/dtheta| over the
    weights of the linear layers inside the transformer blocks; global top-k (or per tensor).

    Reference: 0-ml/speft `model/sparse_peft.py`, `compute_synflow_scores`: one pass (not
    Tanaka's iterative pruning), `inputs_embeds` of ones of shape [1, 1, hidden], the logits
    summed. Departures, each because the reference's mechanism does not reach its aim on a
    Hugging Face encoder: activation *modules* (transformers' `GELUActivation` binds
    `F.gelu` when built) are bypassed by forward hooks as well as the `torch.nn.functional`
    names patched as SPEFT does; the pass runs in eval mode (no dropout) in float64 so the
    product of magnitudes does not overflow (Tanaka et al. use double precision), with eager
    attention (SPEFT swaps its models' SDPA attention for the eager one, whose softmax the patch
    reaches). LayerNorm stays, as in the reference.
    """

    description = "data-free |theta * dR/dtheta| of the linearised |theta| network (SynFlow; SPEFT)"
    needs_data = True  # for the model's device and input width only: no training example is read

    def __init__(self, scope: Scope = "global"):
        self.scope = check_scope(scope)

    def score(self, model, data) -> dict[str, torch.Tensor]:
        candidates = sorted(block_linear_weights(model))
        params = dict(model.named_parameters())
        was_training, dtype = model.training, next(model.parameters()).dtype
        requires = {n: p.requires_grad for n, p in params.items()}
        model.eval()
        model.double()
        try:
            for n, p in params.items():
                p.requires_grad_(n in candidates)
            with eager_attention(model), _linearised(model):
                embed = model.get_input_embeddings()
                ones = torch.ones(1, 1, embed.embedding_dim, dtype=torch.float64, device=data.device)
                model(inputs_embeds=ones).logits.sum().backward()
                scores = {n: (params[n].grad * params[n]).detach().abs().float().cpu() for n in candidates}
        finally:
            model.zero_grad(set_to_none=True)
            model.to(dtype)
            model.train(was_training)
            for n, p in params.items():
                p.requires_grad_(requires[n])
        return scores

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        pool = sum(s.numel() for s in scores.values())  # a budget past the pool takes all of it
        return top_k(scores, min(budget, pool), self.scope, generator)

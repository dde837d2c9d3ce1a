"""GraSP, gradient signal preservation (Wang, Zhang & Grosse, ICLR 2020), as SPEFT scores it."""
from __future__ import annotations

import contextlib
import itertools

import torch

from peftbench.api import (
    Batches, PositiveFloat, Scope, Selection, Selector, check_scope, count_batches, forward,
    loss_fn, top_k)
from peftbench.methods.snip import block_linear_weights, eager_attention


class GraSP(Selector):
    """Score theta * (H g) over the weights of the linear layers inside the transformer blocks,
    g the training loss's gradient summed over `batches` batches (held fixed), H g the
    Hessian-gradient product summed over the next `batches` batches, the logits divided by
    `temperature` in the cross-entropy; train the largest scores (signed), global top-k (or per
    tensor). Dropout off.

    Reference: 0-ml/speft `model/sparse_peft.py`, `compute_grasp_scores` (temperature 200, the
    two passes over consecutive batches, score = weight.grad * weight after backpropagating
    (g_fixed . g); the top-k of the signed score). Wang et al. prune at initialisation by
    removing the largest -theta * Hg; SPEFT keeps the largest theta * Hg for fine-tuning, which
    is the same order. A regression task has no logits to temper (MSE): temperature is unused
    there. The passes run with transformers' eager attention (SPEFT swaps SDPA out too): a fused
    kernel has no double backward on CPU. Our choice where the launcher sets it: `batches` = 64.
    """

    description = "largest theta * (Hessian-gradient product) over block linear weights (GraSP; SPEFT)"
    needs_data = True

    def __init__(self, batches: Batches = 64, temperature: PositiveFloat = 200.0, scope: Scope = "global"):
        self.batches = batches
        self.temperature = temperature
        self.scope = check_scope(scope)

    def _loss(self, model, data, batch) -> torch.Tensor:
        logits = forward(model, batch, data.task)
        if data.task.kind == "regression":
            return loss_fn(logits, batch["labels"], data.task)
        return loss_fn(logits / self.temperature, batch["labels"], data.task)

    def score(self, model, data) -> dict[str, torch.Tensor]:
        names = sorted(block_linear_weights(model))
        all_params = dict(model.named_parameters())
        params = [all_params[n] for n in names]
        requires = {n: p.requires_grad for n, p in all_params.items()}
        was_training = model.training
        steps = count_batches(data, self.batches)
        batches = itertools.cycle(data.batches()) if 2 * steps > len(data.loader) else data.batches()
        model.eval()
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(eager_attention(model))  # the double backward needs plain operations
            for n, p in all_params.items():
                p.requires_grad_(n in names)
            fixed = [torch.zeros_like(p) for p in params]
            for batch in itertools.islice(batches, steps):
                grads = torch.autograd.grad(self._loss(model, data, batch) / steps, params)
                for f, g in zip(fixed, grads):
                    f += g.detach()
            model.zero_grad(set_to_none=True)
            for batch in itertools.islice(batches, steps):
                grads = torch.autograd.grad(self._loss(model, data, batch) / steps, params, create_graph=True)
                sum((f * g).sum() for f, g in zip(fixed, grads)).backward()
            scores = {n: (p.grad * p).detach().float().cpu() for n, p in zip(names, params)}
        finally:
            stack.close()
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            for n, p in all_params.items():
                p.requires_grad_(requires[n])
        return scores

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        pool = sum(s.numel() for s in scores.values())  # a budget past the pool takes all of it
        return top_k(scores, min(budget, pool), self.scope, generator)

"""Skeletonization relevance (Mozer & Smolensky, NIPS 1988), as SPEFT scores sparse fine-tuning."""
from __future__ import annotations

import torch

from peftbench.api import accumulate_gradients, count_batches
from peftbench.methods.snip import SNIP, block_linear_weights


class Skeletonization(SNIP):
    """Train the entries of largest -theta * g: the first-order estimate of how much the training
    loss rises when the entry is removed (set to 0), L(theta with theta_i = 0) - L(theta) ~
    -theta_i g_i, Mozer & Smolensky's relevance linearised. Signed, unlike SNIP's |theta * g|: an
    entry whose removal would lower the loss scores below zero and is chosen last, so the two
    masks differ wherever theta * g is positive. The gradient, the candidates (the weights of the
    linear layers inside the transformer blocks), dropout off, the parameters and the budget rule
    are SNIP's (a subclass).

    Reference: 0-ml/speft `model/sparse_peft.py`, `compute_gradient_based_scores` with
    `skeletonization` = -w * s (s the gradient averaged over the scoring batches; the average
    and our sum differ by a positive factor, the same order).
    """

    description = "largest -theta * grad at theta0 over block linear weights (skeletonization, as SPEFT)"

    def score(self, model, data) -> dict[str, torch.Tensor]:
        summed = accumulate_gradients(model, data, count_batches(data, self.batches),
                                      transform=lambda g: g, train_mode=False)
        params = dict(model.named_parameters())
        return {n: (-params[n].detach().float() * summed[n]).cpu() for n in sorted(block_linear_weights(model))}

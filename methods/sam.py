"""SAM: Second-order Approximation Method (Fu et al., AAAI 2023)."""
from __future__ import annotations

import torch

from peftbench.api import (
    Batches, PositiveFloat, Scope, Selection, Selector, accumulate_gradients, check_scope,
    count_batches, top_k)


class SAM(Selector):
    """Train the entries with the largest accumulated gradient |sum_b g_b| at theta0.

    Theorem 3 of Fu et al.: the top floor(m p) entries by grad_i^2 / h_i; bounding the Hessian
    diagonal by a constant leaves grad_i^2, i.e. |grad_i|. As in the reference code
    (`bsearch=0.005,burnin=600`):

    - the gradient is summed, signed, over `burnin` training batches at theta0 with dropout on
      and the global gradient norm clipped to `clip` (1.0) before summing; no parameter,
      optimizer or schedule update happens meanwhile (the batches cycle over the training set
      when `burnin` exceeds one pass, as jiant's infinite loader does). `burnin="epoch"` is one
      pass. (The reference accumulates burnin - 1 = 599 batches; we accumulate `burnin`.)
    - selection per tensor (`scope="tensor"`, the reference) or over all entries
      (`scope="global"`, the paper's formula); per-tensor counts are apportioned so the total
      is exactly floor(p N) (see `peftbench.selector.apportion`).

    Deviation: the reference freezes by zeroing gradients while AdamW's weight decay still moves
    frozen entries; here frozen entries are bit-identical. The scores are returned by `score`,
    so a budget sweep thresholds them again without re-scoring.
    """

    description = "largest |accumulated gradient| at theta0 over burn-in batches (Fu et al. 2023)"
    needs_data = True

    def __init__(self, burnin: Batches = 600, clip: PositiveFloat | None = 1.0, scope: Scope = "tensor"):
        self.burnin = burnin
        self.clip = clip
        self.scope = check_scope(scope)

    def score(self, model, data) -> dict[str, torch.Tensor]:
        summed = accumulate_gradients(model, data, count_batches(data, self.burnin),
                                      transform=lambda g: g, clip=self.clip)
        return {n: s.abs().cpu() for n, s in summed.items()}

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return top_k(scores, budget, self.scope, generator)

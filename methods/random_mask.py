"""Random: a uniformly random subset of exactly `budget` pre-trained entries."""
from __future__ import annotations

import torch

from peftbench.api import Scope, Selection, Selector, check_scope, pretrained_parameters, top_k


class RandomMask(Selector):
    """Uniform over all entries at budget p.

    Scores are i.i.d. uniform draws from the seeded generator and the top `budget` are kept,
    which is a uniform k-subset. `scope="global"` (default) draws over all encoder entries at
    once; `scope="tensor"` draws int-apportioned counts per tensor, like Fu et al.'s `sctmask`
    (exactly int(p * numel) per tensor without replacement; our apportionment makes the total
    exactly floor(p * N)). Fu's `randmask` (a Bernoulli(p) mask, inexact count) is not offered:
    an inexact count makes budgets incomparable.
    """

    description = "uniformly random entries, exactly floor(p*N) of them (Fu et al.'s Random)"

    def __init__(self, scope: Scope = "global"):
        self.scope = check_scope(scope)

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        scores = {n: torch.rand(p.shape, generator=generator)
                  for n, p in pretrained_parameters(model).items()}
        return top_k(scores, budget, self.scope, generator)

"""MagPruning (Fu et al. 2023 baseline): train the entries of largest magnitude |theta|."""
from __future__ import annotations

import torch

from peftbench.api import Scope, Selection, Selector, check_scope, pretrained_parameters, top_k


class MagPruning(Selector):
    """Keep the `budget` entries with the largest |theta0| (pre-trained weights).

    `scope="tensor"` (default, as Fu et al.'s `magprun`): per-tensor counts proportional to the
    tensor size (apportioned so the total is exactly floor(p * N)); `scope="global"`: one
    ranking over all entries.

    Choice where we differ from the reference code: Fu et al. first run `burnin` (500) steps of
    *full* fine-tuning and rank the moved weights, leaving every entry moved during burn-in in
    the final model, which is then not p-sparse (pitfall P7 in methods-research.md). We rank the
    pre-trained weights, so the trainable count is exactly the budget. Ties are broken by a
    seeded permutation.
    """

    description = "largest |theta| of the pre-trained weights, per tensor (Fu et al.)"

    def __init__(self, scope: Scope = "tensor"):
        self.scope = check_scope(scope)

    def score(self, model, data) -> dict[str, torch.Tensor]:
        return {n: p.detach().abs().cpu() for n, p in pretrained_parameters(model).items()}

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return top_k(scores, budget, self.scope, generator)

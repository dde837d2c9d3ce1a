"""ChildTuning-D (Xu et al., EMNLP 2021): the child network chosen once by Fisher information."""
from __future__ import annotations

import torch

from peftbench.api import (
    Batches, PositiveFloat, Scope, Selection, Selector, accumulate_gradients, check_scope,
    count_batches, top_k)


class ChildTuningD(Selector):
    """Fisher information F = (1/B) sum_b clip_tensor(g_b)^2 over one pass of the training set
    (dropout on, each tensor's gradient clipped to `clip` separately, as the reference
    `calculate_fisher`), then the global top-`budget` entries (the reference's percentile).

    Choices: the reference scores only `encoder.layer.*` and leaves embeddings and pooler fully
    trainable, so its model is not p-sparse; we score every encoder entry and keep exactly the
    budget. Its optimizer applies weight decay to masked entries; ours keeps them bit-identical.
    Fu et al.'s "ChildPruning" cites this method; this is the paper's D variant.
    """

    description = "Fisher information over one training pass, global top-k (ChildTuning-D)"
    needs_data = True

    def __init__(self, batches: Batches = "epoch", clip: PositiveFloat | None = 1.0,
                 scope: Scope = "global"):
        self.batches = batches
        self.clip = clip
        self.scope = check_scope(scope)

    def score(self, model, data) -> dict[str, torch.Tensor]:
        n = count_batches(data, self.batches)
        fisher = accumulate_gradients(model, data, n, transform=torch.square, clip=self.clip,
                                      clip_per_tensor=True)
        return {name: (f / n).cpu() for name, f in fisher.items()}

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return top_k(scores, budget, self.scope, generator)

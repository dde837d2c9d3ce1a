"""FullTuning: every pre-trained entry trains (Fu et al.'s empty `user_mode`)."""
from __future__ import annotations

import torch

from peftbench.api import Selection, Selector, pretrained_parameters


class FullTuning(Selector):
    """Train every entry of the encoder; the budget is ignored (natural count = N)."""

    description = "all pre-trained entries train (the upper-bound baseline); budget ignored"
    uses_budget = False

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return Selection(full=set(pretrained_parameters(model)))

"""BitFit (Ben Zaken et al. 2022): only bias terms train."""
from __future__ import annotations

import torch

from peftbench.api import Selection, Selector, pretrained_parameters


class BitFit(Selector):
    """Every encoder parameter whose name ends in `.bias` trains, LayerNorm biases included and
    LayerNorm weights excluded, as Fu et al.'s code (`bitfit` mode). The budget is ignored: the
    run reports BitFit's natural count (about 0.1% of a BERT encoder)."""

    description = "bias terms only (natural count, budget ignored)"
    uses_budget = False

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return Selection(full={n for n in pretrained_parameters(model) if n.endswith(".bias")})

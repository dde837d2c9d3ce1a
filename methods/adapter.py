"""Adapter (Houlsby et al., ICML 2019): bottleneck modules after attention and feed-forward.

The maintained library (`adapters` 1.3.0, successor of adapter-transformers) pins
transformers ~= 4.57 and cannot install beside transformers 5, and `peft` has no bottleneck
adapter, so this is a small module of our own.
"""
from __future__ import annotations

import torch
from torch import nn

from peftbench.errors import check_choice
from peftbench.models import head_parameters, pretrained_parameters
from peftbench.selector import PositiveInt, Selection, Selector

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


class AdapterLinear(nn.Module):
    """y = L(x) + up(act(down(L(x)))): a bottleneck on the output of a frozen Linear L, placed
    before the block's residual + LayerNorm, as Houlsby et al. `up` starts at zero, so the model
    starts at the pre-trained function."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, activation: str):
        super().__init__()
        self.base_layer = base_layer
        width = base_layer.out_features
        self.down = nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.up(self.act(self.down(h)))


class Adapter(Selector):
    """Houlsby adapters after the attention output projection and after the feed-forward output
    projection of every encoder layer (`attention.output.dense`, `output.dense`), bottleneck
    width = hidden / `reduction_factor` (16, as adapter-transformers' default); only adapters
    and the task head train. `train_layernorm=True` also trains the encoder's LayerNorms, as
    Houlsby et al. did. Fu et al. used adapter-transformers' default (Pfeiffer: after the
    feed-forward only); `placement="pfeiffer"` gives that. The budget is not used: adapters
    report their natural count.
    """

    description = "Houlsby bottleneck adapters after attention and feed-forward (reduction 16)"
    uses_budget = False

    def __init__(self, reduction_factor: PositiveInt = 16, activation: str = "swish",
                 placement: str = "houlsby", train_layernorm: bool = False):
        self.reduction_factor = reduction_factor
        self.activation = check_choice("activation", activation, list(ACTIVATIONS))
        self.placement = check_choice("placement", placement, ("houlsby", "pfeiffer"))
        self.train_layernorm = train_layernorm

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        names = pretrained_parameters(model)
        return Selection(full={n for n in names if "LayerNorm" in n} if self.train_layernorm else set())

    def apply(self, model, selection: Selection):
        model = super().apply(model, selection)
        suffixes = ("output.dense",) if self.placement == "pfeiffer" else ("attention.output.dense", "output.dense")
        base = model.get_submodule(model.base_model_prefix)
        targets = [name for name, m in base.named_modules()
                   if isinstance(m, nn.Linear) and ".layer." in f".{name}"
                   and name.endswith(suffixes)
                   and (self.placement == "houlsby" or "attention" not in name)]
        for name in targets:
            old = base.get_submodule(name)
            bottleneck = max(1, old.out_features // self.reduction_factor)
            base.set_submodule(name, AdapterLinear(old, bottleneck, self.activation).to(old.weight.device))
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

"""Adapter (Houlsby et al., ICML 2019): bottleneck modules after attention and feed-forward.

The maintained library (`adapters` 1.3.0, successor of adapter-transformers) pins
transformers ~= 4.57 and cannot install beside transformers 5, and `peft` has no bottleneck
adapter, so this is a small module of our own.
"""
from __future__ import annotations

import torch
from torch import nn

from peftbench.api import (
    PositiveInt, Selection, Selector, check_choice, head_parameters, pretrained_parameters)

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def _width(module: nn.Module) -> int:
    """Output width of a Linear, or of GPT-2's Conv1D (weight stored in x out); 0 otherwise."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.nf
    return 0


class AdapterLinear(nn.Module):
    """y = L(x) + up(act(down(L(x)))): a bottleneck on the output of a frozen Linear L, placed
    before the block's residual + LayerNorm, as Houlsby et al. `up` starts at zero, so the model
    starts at the pre-trained function."""

    def __init__(self, base_layer: nn.Module, bottleneck: int, activation: str):
        super().__init__()
        self.base_layer = base_layer
        width = _width(base_layer)
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
    projection of every block (BERT's `attention.output.dense`, `output.dense`; each
    architecture's names from `peftbench.architectures`), bottleneck
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
        import re

        from peftbench.api import layout
        from peftbench.api import UsageError

        names = layout(model)  # the architecture's module names (refused if unknown)
        model = super().apply(model, selection)
        wanted = [names.ffn_out] if self.placement == "pfeiffer" else [names.attention_out, names.ffn_out]
        pattern = re.compile(rf"(^|.*\.){names.block}\.({'|'.join(re.escape(w) for w in wanted)})$")
        base = model.get_submodule(model.base_model_prefix)
        targets = [name for name, m in base.named_modules() if pattern.match(name) and _width(m)]
        if not targets:
            raise UsageError(f"adapter: no {' or '.join(wanted)} module in the model's blocks")
        for name in targets:
            old = base.get_submodule(name)
            bottleneck = max(1, _width(old) // self.reduction_factor)
            base.set_submodule(name, AdapterLinear(old, bottleneck, self.activation).to(old.weight.device))
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

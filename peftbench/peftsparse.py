"""peft's sparse tuners read by peftbench's one counting and decay rule.

peft's SHiRA and Super-Tuning layers hold a vector of trainable values at fixed entries of a
frozen weight (`shira_weight` at `shira_indices` [2, k]; `supertuning_values` at flat
`supertuning_indices`). `sparse_layers` reads them so that a peft-built method is counted by the
one rule (its k entries are pre-trained entries that change, counted under the weight's name,
not "new" parameters) and decayed by it (W0[i] + v towards 0, as `peftbench.sparse`). The
other direction, a selection written as a peft adapter, is `peftbench.export`.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """(module name, trainable values, flat indices into the module's weight) of every peft
    SHiRA or Super-Tuning layer's active adapters in `model`."""
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None:
            continue
        if hasattr(module, "shira_weight") and hasattr(module, "shira_indices"):
            for adapter in module.active_adapters:
                if adapter in module.shira_weight and adapter in module.shira_indices:
                    rows, cols = module.shira_indices[adapter].long()
                    yield name, module.shira_weight[adapter], rows * base.weight.shape[1] + cols
        elif hasattr(module, "supertuning_values") and hasattr(module, "supertuning_indices"):
            for adapter in module.active_adapters:
                if adapter in module.supertuning_values:
                    yield (name, module.supertuning_values[adapter],
                           module.supertuning_indices[adapter].long())


class EntryDecay:
    """Decoupled weight decay of a peft layer's entries' values W0[i] + v towards 0 (the one
    rule of `peftbench.sparse`; AdamW's own decay would pull v towards 0, i.e. W0)."""

    def __init__(self, values: nn.Parameter, base_values: torch.Tensor):
        self.values, self.base_values = values, base_values

    @torch.no_grad()
    def decay_(self, amount: float) -> None:
        self.values.sub_(amount * (self.base_values + self.values))


def decays(model: nn.Module) -> dict[int, EntryDecay]:
    """id(values) -> its EntryDecay, for every peft sparse layer."""
    out = {}
    for name, values, flat in sparse_layers(model):
        base = model.get_submodule(name).base_layer.weight
        out[id(values)] = EntryDecay(values, base.detach().reshape(-1)[flat].float())
    return out


def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """W0 + the active adapters' delta of a peft sparse layer (None for any other module)."""
    if not (hasattr(module, "shira_indices") or hasattr(module, "supertuning_indices")):
        return None
    weight = module.base_layer.weight.detach().clone()
    for adapter in module.active_adapters:
        weight = weight + module.get_delta_weight(adapter).to_dense().to(weight.dtype)
    return weight

"""peft's sparse tuners read by peftbench's one counting and decay rule.

peft's SHiRA and Super-Tuning layers hold a vector of trainable values at fixed entries of a
frozen weight (`shira_weight` at `shira_indices` [2, k]; `supertuning_values` at flat
`supertuning_indices`). `sparse_layers` reads them so that a peft-built method is counted by the
one rule (its k entries are pre-trained entries that change, counted under the weight's name,
not "new" parameters) and decayed by it (W0[i] + v towards 0, as `peftbench.modeling.sparse`);
`linear_targets` and `inject` are what the methods built on them (`shira`, `supertuning`)
share. The other direction, a selection written as a peft adapter, is `peftbench.training.export`.
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
    rule of `peftbench.modeling.sparse`; AdamW's own decay would pull v towards 0, i.e. W0)."""

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


def linear_targets(model: nn.Module, suffixes: list[str], tuner: str) -> list[str]:
    """Full names of the `suffixes` modules of every block (`modeling.architectures.block_modules`), or
    a UsageError when one is not an nn.Linear (the only layer peft's sparse tuners wrap)."""
    from peftbench.core.errors import UsageError
    from peftbench.modeling.architectures import block_modules

    names = block_modules(model, list(suffixes))
    other = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if other:
        raise UsageError(f"peft's {tuner} wraps nn.Linear layers only; {other[0]} is a "
                         f"{type(model.get_submodule(other[0])).__name__} ({len(other)} such targets)")
    return names


def inject(model: nn.Module, config, prefix: str) -> nn.Module:
    """`config`'s peft tuner injected in place (the model keeps its class and names); only its
    parameters (names containing `prefix`) and the task head train."""
    from peft import inject_adapter_in_model

    from peftbench.modeling.models import head_parameters, pretrained_parameters

    for p in pretrained_parameters(model).values():
        p.requires_grad_(False)
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(prefix in name)
    for p in head_parameters(model).values():
        p.requires_grad_(True)
    return model

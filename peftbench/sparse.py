"""Training a subset of entries, with the rest frozen by construction.

A parameter trained in part becomes W = W0 + scatter(indices, values) through
`torch.nn.utils.parametrize`: W0 (the pre-trained tensor) never requires grad, and only the
k-vector `values` is an optimizer parameter. So

- frozen entries are bit-identical to the pre-trained ones (no weight-decay drift, unlike
  gradient-zeroing implementations such as Fu et al.'s reference code);
- optimizer state grows with the trainable count, not with the model size.

A parameter trained whole just keeps `requires_grad=True`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftbench.models import head_parameters, pretrained_parameters
from peftbench.selector import Selection


class SparseDelta(nn.Module):
    """W = W0 + delta, where delta is zero outside `indices` and `values` on them."""

    def __init__(self, indices: torch.Tensor):
        super().__init__()
        self.register_buffer("indices", indices.to(torch.long))
        self.values = nn.Parameter(torch.zeros(len(indices)))

    def entries_changed(self) -> int:
        """Entries of W0 this parametrisation can change (see `count_trainable`)."""
        return len(self.indices)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base.reshape(-1).index_add(0, self.indices, self.values.to(base.dtype)).view_as(base)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def apply_selection(model: nn.Module, selection: Selection) -> nn.Module:
    """Freeze all pre-trained entries but the selection; the task head stays trainable."""
    params = pretrained_parameters(model)
    unknown = (selection.full | set(selection.partial)) - set(params)
    if unknown:
        raise ValueError(f"selection names parameters outside the encoder: {sorted(unknown)[:3]}")
    for name, param in params.items():
        param.requires_grad_(name in selection.full)
    for param in head_parameters(model).values():
        param.requires_grad_(True)
    for name, indices in selection.partial.items():
        module, attr = _owner(model, name)
        delta = SparseDelta(indices).to(params[name].device)
        parametrize.register_parametrization(module, attr, delta, unsafe=True)
        module.parametrizations[attr].original.requires_grad_(False)
    return model


def effective_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor the forward pass uses for parameter `name` (its pre-apply name)."""
    module, attr = _owner(model, name)
    return getattr(module, attr)


def canonical_name(name: str) -> str:
    """A parameter's pre-trained name, through parametrisations and peft's `base_layer`."""
    return (name.replace(".parametrizations.", ".").replace(".original", "")
            .replace(".base_layer.", "."))


def trainable_entries(model: nn.Module, pretrained_names: set[str], head_names: set[str]):
    """Yield (name, kind, count) for everything that trains: kind is `encoder` (pre-trained
    entries that may differ: whole tensors, or what a parametrisation module declares with
    `entries_changed()`, under its tensor's pre-trained name), `new` or `head`."""
    counted = set()
    for name, module in model.named_modules():
        if hasattr(module, "entries_changed"):  # e.g. '<m>.parametrizations.weight.0'
            yield canonical_name(name.rsplit(".", 1)[0]), "encoder", module.entries_changed()
            counted |= {id(p) for p in module.parameters()}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in counted:
            continue
        if name in head_names:
            yield name, "head", param.numel()
        elif canonical_name(name) in pretrained_names:
            yield canonical_name(name), "encoder", param.numel()
        else:
            yield name, "new", param.numel()


def count_trainable(model: nn.Module, pretrained_names: set[str], head_names: set[str]) -> dict:
    """Count trainable parameters the same way for every method.

    - `encoder`: pre-trained entries that may differ from their pre-trained values: whole
      tensors trained, plus what each parametrisation module declares with `entries_changed()`
      (a sparse delta's k entries, DiffPruning's projected mask); such a module's own
      parameters are not counted again;
    - `new`: parameters that did not exist in the pre-trained model and are not the task head
      (LoRA matrices, adapters, ...);
    - `head`: the task head, trained by every method, reported on its own;
    - `trainable` = encoder + new: the figure a budget is compared with. `total` adds the head.

    `pretrained_names` / `head_names` are the parameter names before the method changed the model.
    """
    totals = {"encoder": 0, "new": 0, "head": 0}
    for _, kind, count in trainable_entries(model, pretrained_names, head_names):
        totals[kind] += count
    return {**totals, "trainable": totals["encoder"] + totals["new"],
            "total": totals["encoder"] + totals["new"] + totals["head"]}

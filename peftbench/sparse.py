"""Training a subset of entries, with the rest frozen by construction.

A parameter trained in part becomes W = W0 + scatter(indices, values) through
`torch.nn.utils.parametrize`: W0 (the pre-trained tensor) never requires grad, and only the
k-vector `values` is an optimizer parameter. So

- frozen entries are bit-identical to the pre-trained ones (no weight-decay drift, unlike
  gradient-zeroing implementations such as Fu et al.'s reference code);
- optimizer state grows with the trainable count, not with the model size.

A parameter trained whole just keeps `requires_grad=True`.

Weight decay, one rule for every method (`decay_plan`): AdamW's decoupled decay pulls every
trained *pre-trained entry's value* towards 0, whether its tensor trains whole or in part, and
new parameters (LoRA, adapters, DiffPruning's w) towards 0; biases and normalisation weights are
exempt, judged by the pre-trained tensor's name (so a partially trained bias, whose optimizer
parameter is called `...bias.0.values`, is exempt like a whole one). For a sparse delta the
entry's value is W0[i] + v, so the trainer applies v <- v - lr wd (W0[i] + v) itself
(`SparseDelta.decay_`) instead of AdamW's v <- v - lr wd v, which would pull towards W0.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftbench.models import head_parameters, pretrained_parameters
from peftbench.selector import Selection


class SparseDelta(nn.Module):
    """W = W0 + delta, where delta is zero outside `indices` and `values` on them."""

    def __init__(self, indices: torch.Tensor, base: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("indices", indices.to(torch.long))
        self.values = nn.Parameter(torch.zeros(len(indices)))
        # W0 at the trained entries (k floats): decay pulls W0[i] + v towards 0, see `decay_`
        base_values = base.detach().reshape(-1)[self.indices].float() if base is not None else \
            torch.zeros(len(indices))
        self.register_buffer("base_values", base_values)

    @torch.no_grad()
    def decay_(self, amount: float) -> None:
        """Decoupled weight decay of the entries' values W0[i] + v towards 0 by `amount` = lr wd."""
        self.values.sub_(amount * (self.base_values + self.values))

    def changed_indices(self) -> torch.Tensor:
        """Flat indices of the entries this parametrisation can change (the saved mask)."""
        return self.indices

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
        delta = SparseDelta(indices, params[name]).to(params[name].device)
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


def tensor_name(name: str) -> str:
    """The pre-trained tensor an optimizer parameter belongs to: '<m>.bias' for
    '<m>.parametrizations.bias.original' and '<m>.parametrizations.bias.0.values'."""
    module, sep, rest = name.partition(".parametrizations.")
    if sep:
        return f"{module}.{rest.split('.')[0]}"
    return name.replace(".base_layer.", ".")


def decay_exempt(name: str) -> bool:
    """Biases and normalisation weights get no weight decay (Fu et al., BERT), by tensor name."""
    tensor = tensor_name(name)
    owner = tensor.rpartition(".")[0].lower()
    return tensor.endswith("bias") or "layernorm" in owner or "layer_norm" in owner \
        or owner.endswith("norm")


def decay_plan(model: nn.Module) -> tuple[list, list, list[SparseDelta]]:
    """(AdamW parameters with decay, AdamW parameters without, sparse deltas the trainer decays
    itself): the one weight-decay rule of the module docstring."""
    decay, no_decay, deltas = [], [], []
    delta_values = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseDelta):
            delta_values[id(module.values)] = module
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in delta_values:
            no_decay.append(param)  # AdamW must not pull v towards 0: the trainer decays it
            if not decay_exempt(name):
                deltas.append(delta_values[id(param)])
        else:
            (no_decay if decay_exempt(name) else decay).append(param)
    return decay, no_decay, deltas


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


def effective_selection(model: nn.Module, pretrained_names: set[str],
                        head_names: set[str]) -> Selection:
    """What was actually trainable in the pre-trained tensors, read from the model after
    training (the mask a report compares): tensors that trained whole, and for a
    parametrisation its `changed_indices()` (a sparse delta's k entries, DiffPruning's projected
    mask). New parameters (LoRA, adapters) select no pre-trained entries. Measured with the same
    walk as `count_trainable`, so the mask's size is the encoder count."""
    selection = Selection()
    for name, module in model.named_modules():
        if hasattr(module, "entries_changed"):  # the protocol: entries_changed + changed_indices
            tensor = canonical_name(name.rsplit(".", 1)[0])
            selection.partial[tensor] = module.changed_indices().detach().cpu().to(torch.long)
    for name, kind, count in trainable_entries(model, pretrained_names, head_names):
        if kind == "encoder" and name not in selection.partial and count:
            selection.full.add(name)
    return selection


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

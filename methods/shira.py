"""SHiRA (Bhardwaj et al. 2024, "Sparse High Rank Adapters") through the `peft` library."""
from __future__ import annotations

import torch

from peftbench.api import PositiveInt, Selection, Selector, inject, linear_targets


class SHiRA(Selector):
    """On each target layer (Fu et al.'s, named per architecture, as LoRA's) r(m + n) entries
    of the m x n weight train, as many as a rank-r LoRA adds, at positions drawn uniformly
    (SHiRA-Rand, peft's default `random_mask`); the rest of every weight stays frozen. Trained
    through peft's own SHiRA layer (`ShiraConfig` with a `mask_fn` returning this selection):
    the forward adds the sparse delta to a dense copy of W0, autograd gathers the values'
    gradient from the dense weight gradient. `bench step` races it against peftbench's sparse
    step on the same mask.

    Choices: the draw is peft's `random_mask` (a permutation of the mn entries, the first r(m+n)
    kept) from the run's generator rather than `random_seed`, so every seed draws anew as in
    every method here; r = 16 as LoRA here, so the two train the same count (the paper's
    comparison is at equal count). The budget is not used: SHiRA reports its natural count.
    """

    description = "SHiRA: r(m+n) random entries per attention/FFN weight, via peft (r=16)"
    uses_budget = False

    def __init__(self, r: PositiveInt = 16, targets: list[str] | None = None):
        self.r = r
        self.targets = targets

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        from peftbench.api import UsageError

        selection = Selection(notes={"r": self.r})
        for name in _target_modules(model, self.targets):
            weight = model.get_submodule(name).weight
            count = self.r * sum(weight.shape)
            if count > weight.numel():
                raise UsageError(f"shira r={self.r}: {name} ({weight.shape[0]} x {weight.shape[1]}) "
                                 f"has fewer than r(m+n) = {count} entries; choose a smaller r")
            drawn = torch.randperm(weight.numel(), generator=generator)[:count]
            selection.partial[f"{name}.weight"] = drawn.sort().values
        return selection

    def apply(self, model, selection: Selection):
        from peft import ShiraConfig

        masks = {}
        for tensor, indices in selection.partial.items():
            layer = model.get_submodule(tensor.rpartition(".")[0])
            mask = torch.zeros(layer.weight.numel(), dtype=layer.weight.dtype, device=layer.weight.device)
            mask[indices.to(layer.weight.device)] = 1
            masks[id(layer)] = mask.view_as(layer.weight)

        def mask_fn(base_layer, r, **kwargs):
            return masks[id(base_layer)]

        config = ShiraConfig(r=self.r, target_modules=sorted(t.rpartition(".")[0] for t in selection.partial))
        config.mask_fn = mask_fn
        return inject(model, config, "shira_")


def _target_modules(model, targets: list[str] | None) -> list[str]:
    from peftbench.methods.lora import fu_targets  # LoRA's layers: SHiRA's count is LoRA's

    return linear_targets(model, targets if targets is not None else fu_targets(model), "SHiRA")

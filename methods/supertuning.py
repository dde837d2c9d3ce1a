"""Super-Tuning (peft's `SupertuningConfig`, arXiv:2607.09287) through the `peft` library."""
from __future__ import annotations

import torch

from peftbench.api import Selection, Selector, inject, linear_targets, sparse_layers


class SuperTuning(Selector):
    """In each target layer (Fu et al.'s, named per architecture, as LoRA's) the entries of
    largest |W| train (`select_top=False`: the smallest, the paper's "-bottom" variant), the
    same share of every layer; the rest stays frozen. Trained through peft's own Super-Tuning
    layer (flat indices, values scatter-added onto W0 in the forward).

    Budget: peft's tuner takes one `sparsity` for all its layers and gives each layer
    int(numel * (1 - sparsity)) entries; here sparsity = 1 - budget / (entries of the target
    layers), so the count is the budget up to each layer's rounding down (never above).
    `select` computes the very entries peft's `update_layer` chooses (`torch.topk` of |W| per
    layer) so the selection is known before training; `apply` builds peft's layers and checks
    that they chose the same entries.

    Choices: targets default to Fu et al.'s layers (peft's default for BERT is query and value
    only), so the budget spreads over the layers the other methods may use; the hybrid "Supra"
    mode (a LoRA beside the sparse support, `r`) is not offered: it is a different method.
    """

    description = "Super-Tuning: top-|W| entries of every attention/FFN weight, one share, via peft"

    def __init__(self, select_top: bool = True, targets: list[str] | None = None):
        self.select_top = select_top
        self.targets = targets

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        from peftbench.api import UsageError

        names = _target_modules(model, self.targets)
        total = sum(model.get_submodule(n).weight.numel() for n in names)
        if budget > total:
            raise UsageError(f"supertuning: a budget of {budget} entries is more than the "
                             f"{total} entries of its target layers; give a smaller budget or "
                             "more targets")
        sparsity = 1.0 - budget / total
        selection = Selection(notes={"sparsity": sparsity, "target_entries": total})
        for name in names:
            weight = model.get_submodule(name).weight
            count = int(weight.numel() * (1 - sparsity))  # peft's _num_trainable
            if count:
                chosen = torch.topk(weight.detach().abs().flatten(), k=count, largest=self.select_top).indices
                selection.partial[f"{name}.weight"] = chosen.sort().values
        return selection

    def apply(self, model, selection: Selection):
        from peft import SupertuningConfig

        config = SupertuningConfig(target_modules=sorted(t.rpartition(".")[0] for t in selection.partial),
                                   sparsity=selection.notes["sparsity"], select_top=self.select_top)
        model = inject(model, config, "supertuning_")
        built = {f"{name}.weight": flat.sort().values.cpu() for name, _, flat in sparse_layers(model)}
        if built.keys() != selection.partial.keys() or any(
                not torch.equal(built[n], selection.partial[n].cpu()) for n in built):
            raise RuntimeError("peft's Super-Tuning layers chose other entries than `select`")
        return model


def _target_modules(model, targets: list[str] | None) -> list[str]:
    from peftbench.methods.lora import fu_targets  # the layers LoRA, SHiRA and this may use

    return linear_targets(model, targets if targets is not None else fu_targets(model), "Super-Tuning")

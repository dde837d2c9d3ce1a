"""LoRA (Hu et al. 2022) through the `peft` library, on Fu et al.'s target layers."""
from __future__ import annotations

import torch

from peftbench.models import head_parameters, pretrained_parameters
from peftbench.selector import Decay, PositiveFloat, PositiveInt, Selection, Selector

# Fu et al. (loralib, r = 16): query, key, value, attention output, intermediate and output
# dense layers of every encoder layer (BERT and RoBERTa names); never the pooler or the head.
FU_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense")


class LoRA(Selector):
    """W = W0 + (alpha / r) B A on the `targets` linear layers of every encoder layer, injected
    in place with `peft.inject_adapter_in_model` (the model keeps its own class and names); only
    A, B and the task head train; W0 stays bit-identical.

    Choices: B = 0 at start (peft's standard init), so the model starts at the pre-trained
    function; Fu et al.'s code re-initialises B with Kaiming and uses alpha = 1 (scaling 1/16),
    and leaves the head frozen at its random init (loralib marks only LoRA weights trainable);
    here the head trains, as for every method. `lora_alpha` defaults to r (scaling 1).
    The budget is not used: LoRA reports its natural count, r (d_in + d_out) per target layer.
    """

    description = "low-rank updates B A on attention and FFN layers, via peft (r=16, Fu et al.)"
    uses_budget = False

    def __init__(self, r: PositiveInt = 16, lora_alpha: PositiveFloat | None = None,
                 lora_dropout: Decay = 0.0, targets: list[str] | tuple[str, ...] = FU_TARGETS):
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.targets = list(targets)

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return Selection()  # no pre-trained entry changes; LoRA adds new parameters instead

    def apply(self, model, selection: Selection):
        from peft import LoraConfig, inject_adapter_in_model

        pattern = r".*\.layer\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in self.targets) + ")"
        config = LoraConfig(r=self.r, lora_alpha=self.lora_alpha or self.r,
                            lora_dropout=self.lora_dropout, target_modules=pattern, bias="none")
        for p in pretrained_parameters(model).values():
            p.requires_grad_(False)
        try:
            model = inject_adapter_in_model(config, model)
        except ValueError as err:  # peft: no module matched the targets
            from peftbench.errors import UsageError

            raise UsageError(f"lora targets {self.targets} match no module of the model "
                             f"({str(err).splitlines()[0][:200]}); name Linear modules inside "
                             "the layers, e.g. attention.self.query") from None
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

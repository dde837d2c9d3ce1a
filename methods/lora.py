"""LoRA (Hu et al. 2022) through the `peft` library, on Fu et al.'s target layers."""
from __future__ import annotations

import torch

from peftbench.api import (
    Decay, PositiveFloat, PositiveInt, Selection, Selector, head_parameters,
    pretrained_parameters)


def fu_targets(model) -> list[str]:
    """Fu et al.'s layers (loralib, r = 16) in the model's own names: query, key, value,
    attention output, feed-forward input(s) and output of every block (BERT: attention.self.query
    ... output.dense; GPT-2: the fused c_attn, c_proj, c_fc, c_proj; Llama: q/k/v/o_proj,
    gate/up/down_proj); never the pooler or the head (`peftbench.architectures`)."""
    from peftbench.api import layout

    names = layout(model)
    return [*names.qkv, names.attention_out, *names.ffn_in, names.ffn_out]


class LoRA(Selector):
    """W = W0 + (alpha / r) B A on the `targets` layers of every block (default: Fu et al.'s,
    named per architecture, `fu_targets`), injected
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
                 lora_dropout: Decay = 0.0, targets: list[str] | None = None):
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.targets = targets

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        # no pre-trained entry changes; LoRA adds new parameters instead
        return Selection(notes={"targets": self._targets(model)})

    def _targets(self, model) -> list[str]:
        return list(self.targets) if self.targets is not None else fu_targets(model)

    def apply(self, model, selection: Selection):
        from peft import LoraConfig, inject_adapter_in_model

        from peftbench.api import layout

        targets = self._targets(model)
        pattern = rf".*\.{layout(model).block}\.(" + "|".join(t.replace(".", r"\.") for t in targets) + ")"
        config = LoraConfig(r=self.r, lora_alpha=self.lora_alpha or self.r,
                            lora_dropout=self.lora_dropout, target_modules=pattern, bias="none")
        for p in pretrained_parameters(model).values():
            p.requires_grad_(False)
        try:
            model = inject_adapter_in_model(config, model)
        except ValueError as err:  # peft: no module matched the targets
            from peftbench.api import UsageError

            raise UsageError(f"lora targets {targets} match no module of the model "
                             f"({str(err).splitlines()[0][:200]}); name Linear modules inside "
                             "the layers, e.g. attention.self.query") from None
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

"""MixOut (Lee, Cho & Kang, ICLR 2020): dropout towards the pre-trained weights."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftbench.api import Decay, Selection, Selector, check_choice, pretrained_parameters

MODES = ("train", "eval")


class MixoutWeight(nn.Module):
    """The mixed weight of one Linear layer (a parametrisation of its `weight`).

    mode "train" (Lee et al.): while training, W~ = ((1 - M) u + M w - p u) / (1 - p) with
    M ~ Bernoulli(1 - p) drawn per input feature (one column mask repeated over rows, as the
    reference `mixout.py`) and u the pre-trained weight; gradients reach only the kept entries
    (times 1/(1-p)). At evaluation W~ = w.
    mode "eval" (Fu et al.'s code): training sees W~ = w (plain fine-tuning); at evaluation each
    entry is reset to u with probability p. Fu redraws the reset mask at every evaluation; here
    it is drawn once from the run's seed so checkpoint selection and test see the same model.
    """

    def __init__(self, target: torch.Tensor, p: float, mode: str, generator: torch.Generator):
        super().__init__()
        self.register_buffer("target", target.detach().clone())
        self.p, self.mode, self.generator = p, mode, generator
        if mode == "eval":
            reset = torch.rand(target.shape, generator=generator) < p
            self.register_buffer("reset", reset.to(target.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "eval":
            return w if self.training else torch.where(self.reset, self.target, w)
        if not self.training or self.p == 0:
            return w
        keep = (torch.rand(w.shape[1], generator=self.generator) >= self.p).to(w.device, w.dtype)
        mixed = (1 - keep) * self.target + keep * w - self.p * self.target
        return mixed / (1 - self.p)


class MixOut(Selector):
    """Full fine-tuning of every encoder entry, regularised by MixOut on every Linear weight of
    the encoder (the reference's HF example replaces every nn.Linear; dropout layers are kept,
    a documented simplification). `p` is the mixing probability (Lee et al. use 0.7-0.9 with
    dropout off). The budget is not used; every encoder entry may differ, so the count is N.
    """

    description = "full fine-tuning with dropout towards the pre-trained weights (Lee et al. 2020)"
    uses_budget = False

    def __init__(self, p: Decay = 0.7, mode: str = "train"):
        from peftbench.api import UsageError

        if not 0 <= p < 1:
            raise UsageError(f"MixOut p={p} is outside [0, 1)")
        self.p = p
        self.mode = check_choice("MixOut mode", mode, MODES)

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        self._generator = generator
        return Selection(full=set(pretrained_parameters(model)))

    def apply(self, model, selection: Selection):
        model = super().apply(model, selection)
        base = model.get_submodule(model.base_model_prefix)
        for module in base.modules():
            if isinstance(module, nn.Linear):
                parametrize.register_parametrization(
                    module, "weight", MixoutWeight(module.weight, self.p, self.mode, self._generator),
                    unsafe=True)
        return model

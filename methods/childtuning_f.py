"""ChildTuning-F (Xu et al., EMNLP 2021): a fresh Bernoulli gradient mask at every step."""
from __future__ import annotations

import torch

from peftbench.api import Fraction, Selection, Selector, pretrained_parameters


class ChildTuningF(Selector):
    """Every step, each encoder entry's gradient is kept with probability `p` and rescaled by
    1/p (g <- g * Bernoulli(p) / p), as in `ChildTuningAdamW.step`; the others get no gradient
    this step. The masks come from the seeded generator passed to `select`.

    Order: the mask is applied after global gradient clipping, just before the optimizer step,
    as the reference does inside `ChildTuningAdamW.step` (the HF trainer clips before the step).

    Counting and the saved mask: every encoder entry can move over training, so the uniform
    trainable count is N (the whole encoder) and the saved mask is the whole encoder; the
    expected count per step, p N, is recorded as `expected_step_entries` in the selection notes.
    `p` defaults to the run's budget fraction when left None.
    Choices: the reference masks the head's gradients too; here the head trains fully, as for
    every method. The reference's weight decay is applied to all entries; ours too, since all
    entries train.
    """

    description = "fresh Bernoulli(p) gradient mask every step, rescaled by 1/p (ChildTuning-F)"
    budget_in_expectation = True  # every entry can move; p N per step in expectation

    def __init__(self, p: Fraction | None = None):
        self.p = p

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        params = pretrained_parameters(model)
        total = sum(p.numel() for p in params.values())
        self.keep = self.p if self.p is not None else budget / total
        if not 0 < self.keep <= 1:
            from peftbench.api import UsageError

            raise UsageError(f"ChildTuning-F keep probability {self.keep} is outside (0, 1]")
        self._generator = generator
        self._params = list(params.values())  # apply() keeps these objects trainable
        return Selection(full=set(params), notes={"expected_step_entries": self.keep * total})

    def before_step(self, model, step: int) -> None:
        for param in self._params:
            grad = param.grad
            if grad is None:
                continue
            keep = torch.rand(grad.shape, generator=self._generator).to(grad.device) < self.keep
            grad.mul_(keep.to(grad.dtype)).div_(self.keep)

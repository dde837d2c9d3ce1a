"""DiffPruning (Guo et al., ACL 2021), in Fu et al.'s variant: L0-relaxed mask, then projection."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftbench.models import pretrained_parameters
from peftbench.selector import (NonNegativeFloat, PositiveFloat, PositiveInt, Scope, Selection,
                                Selector, check_scope, top_k)


class HardConcreteDelta(nn.Module):
    """theta = theta0 + z * w, with w = 0 at start and a hard-concrete gate z per entry.

    Before projection (training): u ~ U(0, 1), s = sigmoid(log u - log(1 - u) + alpha),
    z = clamp(s (r - l) + l, 0, 1); at evaluation the gate is its noise-free value
    clamp(sigmoid(alpha) (r - l) + l, 0, 1). After projection z is the fixed 0/1 `mask`.
    """

    def __init__(self, shape, stretch: float, generator: torch.Generator, k: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))
        self.alpha = nn.Parameter(torch.sigmoid(torch.randn(shape, generator=generator)))
        self.register_buffer("mask", torch.zeros(shape))
        self.l, self.r = -stretch, stretch
        self.generator, self.projected, self.k = generator, False, k

    def entries_changed(self) -> int:
        """Before projection every entry can differ (the model is dense); after it, the mask's."""
        return self.k if self.projected else self.mask.numel()

    def changed_indices(self) -> torch.Tensor:
        if not self.projected:
            return torch.arange(self.mask.numel(), device=self.mask.device)
        return self.mask.reshape(-1).nonzero().squeeze(1)

    def gate(self) -> torch.Tensor:
        if self.projected:
            return self.mask
        if self.training:
            u = torch.rand(self.alpha.shape, generator=self.generator).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid(torch.log(u) - torch.log1p(-u) + self.alpha.cpu()).to(self.alpha.device)
        else:
            s = torch.sigmoid(self.alpha)
        return (s * (self.r - self.l) + self.l).clamp(0, 1)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.gate().to(base.dtype) * self.w.to(base.dtype)

    def l0(self) -> torch.Tensor:
        """Sum over entries of P(z != 0) = sigmoid(alpha - log(-l / r))."""
        return torch.sigmoid(self.alpha - math.log(-self.l / self.r)).sum()


class DiffPruning(Selector):
    """Fu et al.'s `diffprun` mode: every encoder tensor becomes theta0 + z * w (w = 0,
    alpha = sigmoid(randn)); for the first `burnin` steps the loss adds
    lambda * mean over all entries of sigmoid(alpha - log(-l/r)) (the expected L0 norm, divided
    by the entry count), with l = -stretch, r = stretch; at step `burnin` the top-`budget`
    entries by |alpha| become a fixed 0/1 mask (per tensor, apportioned, as the reference; or
    global) and alpha stops training. Afterwards theta = theta0 + mask * w: the entries dropped
    at projection return to theta0 (the "projection discontinuity" of Fu et al. Fig. 1; the
    per-step training losses are in the run's metrics.jsonl and the projection step in
    selection.json).

    Schedule: the projection must happen before the last step (`burnin` < total steps), else the
    model would train densely and be tested dense while the budget is reported: such a run is
    refused at the start. Only epochs that end after the projection can be the tested checkpoint
    (`checkpoint_ready`), so the model tested is always the projected one that was validated.

    Choices: the head trains densely outside the diff (the reference masks it too); frozen
    entries are exactly theta0 after projection; the optimizer holds w and alpha for every entry
    (DiffPruning is dense until projection by nature). Guo et al.'s original (global magnitude
    projection, per-tensor gates) is not implemented.
    """

    description = "hard-concrete L0 mask over a delta, projected to top-k |alpha| (Fu et al.'s DiffPruning)"

    def __init__(self, burnin: PositiveInt = 500, lam: NonNegativeFloat = 1.0, stretch: PositiveFloat = 3.0,
                 scope: Scope = "tensor"):
        self.burnin = burnin
        self.lam = lam
        self.stretch = stretch
        self.scope = check_scope(scope)

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        self._budget, self._generator = budget, generator
        return Selection(notes={"projection_step": self.burnin})

    def apply(self, model, selection: Selection):
        from peftbench.selector import apportion

        params = pretrained_parameters(model)
        quotas = apportion(self._budget, {n: p.numel() for n, p in params.items()})
        for p in model.parameters():
            p.requires_grad_(True)
        self._gates = {}
        for name, param in params.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            gate = HardConcreteDelta(param.shape, self.stretch, self._generator, quotas[name])
            parametrize.register_parametrization(module, attr, gate.to(param.device), unsafe=True)
            module.parametrizations[attr].original.requires_grad_(False)
            self._gates[name] = gate
        self._entries = sum(p.numel() for p in params.values())
        return model

    def begin_training(self, model, total_steps: int) -> None:
        if self.burnin >= total_steps:
            from peftbench.errors import UsageError

            if total_steps < 2:  # no burn-in of at least one step fits before a projection
                raise UsageError(f"diffpruning needs at least 2 training steps (a burn-in, then the "
                                 f"projection); the run has {total_steps}: train longer")
            raise UsageError(f"diffpruning burnin={self.burnin} is not below the run's {total_steps} "
                             "training steps: the mask would never be projected; give burnin < "
                             f"{total_steps} (e.g. --param burnin={max(1, total_steps // 2)}) or train longer")

    def checkpoint_ready(self, step: int) -> bool:
        return step >= self.burnin

    def loss_term(self, model, step: int):
        if step >= self.burnin:
            return None
        return self.lam * sum(g.l0() for g in self._gates.values()) / self._entries

    def after_step(self, model, step: int) -> None:
        if step + 1 != self.burnin:
            return
        chosen = top_k({n: g.alpha.detach().abs().cpu() for n, g in self._gates.items()},
                       self._budget, self.scope, self._generator)
        for name, gate in self._gates.items():
            gate.mask.copy_(chosen.mask(name, gate.alpha.shape).to(gate.mask))
            gate.k = int(gate.mask.sum())
            gate.projected = True
            gate.alpha.requires_grad_(False)
            gate.alpha.grad = None

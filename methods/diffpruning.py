"""DiffPruning (Guo et al., ACL 2021): L0-relaxed mask over a delta, projection, fixed-mask phase."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftbench.api import (
    NonNegativeFloat, PositiveFloat, PositiveInt, Scope, Selection, Selector, check_scope,
    pretrained_parameters, top_k)


class HardConcreteDelta(nn.Module):
    """theta = theta0 + z * w, with w = 0 at start and a hard-concrete gate z per entry.

    Before projection (training): u ~ U(0, 1), s = sigmoid(log u - log(1 - u) + alpha),
    z = clamp(s (r - l) + l, 0, 1); at evaluation the gate is its noise-free value
    clamp(sigmoid(alpha) (r - l) + l, 0, 1). After projection z is the fixed 0/1 `mask`.
    """

    def __init__(self, shape, stretch: float, generator: torch.Generator, k: int, alpha_init: float | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))
        start = torch.randn(shape, generator=generator)  # drawn either way: one stream for both
        self.alpha = nn.Parameter(torch.sigmoid(start) if alpha_init is None else torch.full(shape, float(alpha_init)))
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
        if not self.training:
            return self.noise_free()
        u = torch.rand(self.alpha.shape, generator=self.generator).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid(torch.log(u) - torch.log1p(-u) + self.alpha.cpu()).to(self.alpha.device)
        return (s * (self.r - self.l) + self.l).clamp(0, 1)

    def noise_free(self) -> torch.Tensor:
        return (torch.sigmoid(self.alpha) * (self.r - self.l) + self.l).clamp(0, 1)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.gate().to(base.dtype) * self.w.to(base.dtype)

    def l0(self) -> torch.Tensor:
        """Sum over entries of P(z != 0) = sigmoid(alpha - log(-l / r))."""
        return torch.sigmoid(self.alpha - math.log(-self.l / self.r)).sum()


class DiffPruning(Selector):
    """DiffPruning: every encoder tensor becomes theta0 + z * w (w = 0, a hard-concrete gate z
    per entry); for the first `burnin` steps (the dense phase) the loss adds
    lambda * mean over all entries of sigmoid(alpha - log(-l/r)) (the expected L0 norm, divided
    by the entry count), with l = -stretch, r = stretch; after step `burnin` a fixed 0/1 mask of
    `budget` entries is projected and alpha stops training; then theta = theta0 + mask * w (the
    fixed-mask phase): the entries dropped at projection return to theta0 (the "projection
    discontinuity" of Fu et al. Fig. 1).

    Defaults are Fu et al.'s `diffprun` (their code): alpha = sigmoid(randn) as log alpha,
    stretch 3, one rate for w and alpha, the mask = per-tensor top-k by |alpha|. Guo et al.'s
    own recipe (dguo98/DiffPruning) is these options: `alpha_init=5` (every gate open),
    `stretch=1.5`, `alpha_lr=0.1` (alpha's own AdamW rate), `w_lr` (w's rate in the dense phase,
    1e-5 there: a dense model trains at a dense rate), `projection=magnitude` with
    `scope=global` (a global threshold on |z * w|, the learned delta, as `run_glue_mag.py`).

    Schedule: the run's warm-up and linear decay restart at the projection (`phases`), as the
    authors fine-tune the fixed mask as a run of its own (Guo: `run_glue_fixmask_finetune.py`;
    Fu: >= 20,000 steps after 500), at the run's lr. The projection must come before the last
    step (`burnin` < total steps), else the model would train and be tested dense: refused at
    the start. Only epochs that end after the projection can be the tested checkpoint
    (`checkpoint_ready`), so the model tested is the projected one that was validated.

    Health (`training_record`, the run's `method_record`): Spearman(|alpha_T|, |alpha_0|) over a
    fixed sample of entries (how far the gates moved from their start: near 1 = the mask is its
    initialisation; None when every gate starts equal, as with `alpha_init`), the share of the
    learned delta sum (z w)^2 the mask keeps, and `flags`:
    "mask did not learn" when that Spearman is above 0.5 (projection by |alpha|). Validation on
    both sides of the projection is the run's `phases`; the board flags a cell whose validation
    before the projection is at the constant predictor.

    Our reading, not the papers': the head trains densely outside the diff (Fu's code masks it
    too; Guo trains it densely); Guo's per-tensor structured gate z2 and hand-written alpha
    gradient are not implemented (autograd through the stretched gate instead); the optimizer
    holds w and alpha for every entry (DiffPruning is dense until projection by nature).
    """

    description = "hard-concrete L0 mask over a delta, then a fixed-mask phase (DiffPruning, Fu et al.'s defaults)"

    def __init__(self, burnin: PositiveInt = 500, lam: NonNegativeFloat = 1.0, stretch: PositiveFloat = 3.0,
                 scope: Scope = "tensor", alpha_init: float | None = None, alpha_lr: PositiveFloat | None = None,
                 w_lr: PositiveFloat | None = None, projection: Literal["alpha", "magnitude"] = "alpha"):
        self.burnin = burnin
        self.lam = lam
        self.stretch = stretch
        self.scope = check_scope(scope)
        self.alpha_init = alpha_init
        self.alpha_lr = alpha_lr
        self.w_lr = w_lr
        self.projection = projection

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        self._budget, self._generator = budget, generator
        return Selection(notes={"projection_step": self.burnin, "projection": self.projection})

    def apply(self, model, selection: Selection):
        from peftbench.api import apportion

        params = pretrained_parameters(model)
        quotas = apportion(self._budget, {n: p.numel() for n, p in params.items()})
        for p in model.parameters():
            p.requires_grad_(True)
        self._gates, self._record = {}, None
        for name, param in params.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            gate = HardConcreteDelta(param.shape, self.stretch, self._generator, quotas[name], self.alpha_init)
            parametrize.register_parametrization(module, attr, gate.to(param.device), unsafe=True)
            module.parametrizations[attr].original.requires_grad_(False)
            self._gates[name] = gate
        self._entries = sum(p.numel() for p in params.values())
        self._sample = _sample_indices(self._entries, self._generator)
        self._alpha0 = self._flat_sample(lambda g: g.alpha.detach().abs())
        return model

    def _flat_sample(self, value) -> torch.Tensor:
        flat = torch.cat([value(g).reshape(-1).float().cpu() for g in self._gates.values()])
        return flat[self._sample]

    def begin_training(self, model, total_steps: int) -> None:
        if self.burnin >= total_steps:
            from peftbench.api import UsageError

            if total_steps < 2:  # no burn-in of at least one step fits before a projection
                raise UsageError(f"diffpruning needs at least 2 training steps (a burn-in, then the "
                                 f"projection); the run has {total_steps}: train longer")
            raise UsageError(f"diffpruning burnin={self.burnin} is not below the run's {total_steps} "
                             "training steps: the mask would never be projected; give burnin < "
                             f"{total_steps} (e.g. --param burnin={max(1, total_steps // 2)}) or train longer")

    def phases(self, total_steps: int) -> list[int]:
        return [self.burnin]

    def learning_rates(self, model, lr: float, phase: int) -> dict[str, float]:
        names = {id(p): n for n, p in model.named_parameters()}
        rates = {}
        for gate in self._gates.values():
            if self.alpha_lr is not None:
                rates[names[id(gate.alpha)]] = self.alpha_lr
            if self.w_lr is not None and phase == 0:
                rates[names[id(gate.w)]] = self.w_lr
        return rates

    def checkpoint_ready(self, step: int) -> bool:
        return step >= self.burnin

    def loss_term(self, model, step: int):
        if step >= self.burnin:
            return None
        return self.lam * sum(g.l0() for g in self._gates.values()) / self._entries

    def after_step(self, model, step: int) -> None:
        if step + 1 != self.burnin:
            return
        with torch.no_grad():
            delta = {n: (g.noise_free() * g.w).detach().cpu() for n, g in self._gates.items()}
        if self.projection == "magnitude":
            scores = {n: d.abs() for n, d in delta.items()}
        else:
            scores = {n: g.alpha.detach().abs().cpu() for n, g in self._gates.items()}
        chosen = top_k(scores, self._budget, self.scope, self._generator)
        kept = total = 0.0
        for name, gate in self._gates.items():
            mask = chosen.mask(name, gate.alpha.shape)
            kept += float((delta[name][mask] ** 2).sum())
            total += float((delta[name] ** 2).sum())
            gate.mask.copy_(mask.to(gate.mask))
            gate.k = int(gate.mask.sum())
            gate.projected = True
            gate.alpha.requires_grad_(False)
            gate.alpha.grad = None
        moved = _spearman(self._alpha0, self._flat_sample(lambda g: g.alpha.detach().abs()))
        flags = ["mask did not learn (Spearman(|alpha_T|, |alpha_0|) > 0.5)"] \
            if self.projection == "alpha" and moved is not None and moved > 0.5 else []
        self._record = {"projection_step": self.burnin, "projection": self.projection,
                        "spearman_alpha_final_initial": moved,
                        "delta_kept": kept / total if total > 0 else None, "flags": flags}

    def training_record(self) -> dict | None:
        return self._record


SAMPLE = 1_000_000  # entries the health record's rank correlation reads


def _sample_indices(total: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed sample of entry indices (all of them for a small model): Spearman over 22.7 M
    entries would cost more than the step it checks."""
    if total <= SAMPLE:
        return torch.arange(total)
    return torch.randint(total, (SAMPLE,), generator=torch.Generator().manual_seed(total))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rho; None when the initial gates are all equal (Guo's alpha_init: no ranking
    to keep), 1.0 when they were not and the final ones are (a change that erased them)."""
    from scipy.stats import spearmanr

    if bool((a == a[0]).all()):
        return None
    value = spearmanr(a.numpy(), b.numpy()).statistic
    return float(value) if value == value else 1.0

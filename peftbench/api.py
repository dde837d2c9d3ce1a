"""Everything a method author imports, from one place.

    from peftbench.api import Selector, Selection, top_k, PositiveInt, scoring_session

A method is a `Selector` subclass (see `peftbench.contract.selector` for the contract) registered as an
entry point; `peftbench check-method NAME` (or `peftbench.testing.parametrize_with_checks` in
the author's own pytest) checks it. This module only gathers names: nothing here is new except
`scoring_session`, for methods that fine-tune while scoring (LT-SFT, DiffPruning-style). The
built-in methods import from here alone, as a plugin would.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt

from peftbench.contract.scoring import (
    ScoringData,
    accumulate_gradients,
    count_batches,
    differentiable_parameters,
)
from peftbench.contract.selector import (
    Batches,
    Budget,
    Decay,
    Fraction,
    Scope,
    Selector,
    apportion,
    check_scope,
    top_k,
)
from peftbench.core.errors import UsageError, check_choice
from peftbench.modeling.architectures import block_modules, layout
from peftbench.modeling.compute import forward, loss_fn
from peftbench.modeling.models import head_parameters, pretrained_parameters
from peftbench.modeling.peftsparse import inject, linear_targets, sparse_layers
from peftbench.modeling.selection import Selection
from peftbench.modeling.sparse import canonical_name

__all__ = ["Batches", "Budget", "Decay", "Fraction", "NonNegativeFloat", "PositiveFloat", "PositiveInt",
           "Scope", "ScoringData", "Selection", "Selector", "UsageError", "accumulate_gradients", "apportion",
           "block_modules", "canonical_name", "check_choice", "check_scope", "count_batches",
           "differentiable_parameters", "forward", "head_parameters", "inject", "layout", "linear_targets",
           "loss_fn", "pretrained_parameters", "scoring_session", "sparse_layers", "top_k"]


@contextlib.contextmanager
def scoring_session(model: torch.nn.Module, data: ScoringData, steps: int,
                    lr: float | None = None, train_head: bool = False) -> Iterator[tuple]:
    """A scoring phase that trains, undone on exit: yields (optimizer, scheduler) built with the
    run's own recipe (AdamW over every pre-trained parameter, weight decay exempting biases and
    LayerNorm as the trainer does, linear warm-up and decay over `steps`; clip with
    `data.train.max_grad_norm` yourself) at `lr`, or the run's lr when None. A phase that needs
    its own rate (LT-SFT's full fine-tuning at a full-FT rate while the sparse run trains at
    another) takes it as a method parameter and passes it here: the parameter is in the run's
    record and the score cache's key; the run's settings read here key the cache too. On exit, even after an error, every parameter
    and buffer is back to its value, `requires_grad` flags and train/eval mode are restored:
    the model scored is the model trained next (the runner checks this bit for bit).
    `train_head`: the task head trains in the phase too (restored on exit like the rest), for a
    phase whose loss should not be read through an untrained head."""
    from transformers import get_linear_schedule_with_warmup

    from peftbench.modeling.sparse import decay_exempt
    from peftbench.training.trainer import warmup_steps

    if steps < 1:
        raise UsageError(f"scoring_session needs at least one step, got {steps}")
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    params = dict(pretrained_parameters(model))
    if train_head:
        from peftbench.modeling.models import head_parameters

        params.update(head_parameters(model))
    for p in params.values():
        p.requires_grad_(True)
    groups = [{"params": [p for n, p in params.items() if not decay_exempt(n)], "weight_decay": data.train.weight_decay},
              {"params": [p for n, p in params.items() if decay_exempt(n)], "weight_decay": 0.0}]
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"scoring_session(lr={lr!r}): give a positive finite learning rate, or None for the run's")
    optimizer = torch.optim.AdamW(groups, lr=data.train.lr if lr is None else float(lr))
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps(data.train.warmup_ratio, steps), steps)
    model.train()
    try:
        yield optimizer, scheduler
    finally:
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for key, value in saved.items():
                current[key].copy_(value)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        for n, m in model.named_modules():
            m.train(modes[n])

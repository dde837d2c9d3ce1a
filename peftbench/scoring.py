"""Gradient statistics that several methods score with (SAM, ChildTuning-D, FISH).

Scoring never updates the model: gradients are read, accumulated and zeroed; no optimizer or
scheduler exists here. Accumulators live on the model's device in float32.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import nn

from peftbench.models import pretrained_parameters
from peftbench.trainer import ScoringData


def count_batches(data: ScoringData, batches: int | str) -> int:
    """`batches` as a number: an int as is, "epoch" = one pass over the training set."""
    if batches == "epoch":
        return len(data.loader)
    if isinstance(batches, int) and batches > 0:
        return batches
    from peftbench.errors import UsageError

    raise UsageError(f"batches={batches!r}: give a positive integer or 'epoch'")


def differentiable_parameters(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the pre-trained parameters, all set to require grad, for scoring
    passes that call `torch.autograd.grad` on them (`apply` later sets what trains)."""
    params = pretrained_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    return list(params), list(params.values())


def accumulate_gradients(model: nn.Module, data: ScoringData, batches: int,
                         transform: Callable[[torch.Tensor], torch.Tensor],
                         clip: float | None = None, clip_per_tensor: bool = False,
                         train_mode: bool = True) -> dict[str, torch.Tensor]:
    """Sum over `batches` training batches (cycling the loader) of transform(grad) per entry.

    `clip`: clip the global gradient norm first (Fu et al.'s SAM) or each tensor's norm
    (`clip_per_tensor`, ChildTuning-D). `train_mode`: dropout on (as both references).
    """
    params = pretrained_parameters(model)
    was_training = model.training
    requires = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    model.train(train_mode)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    batch_iter = itertools.cycle(data.batches()) if batches > len(data.loader) else data.batches()
    for batch in itertools.islice(batch_iter, batches):
        model.zero_grad(set_to_none=True)
        data.loss(model, batch).backward()
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        if clip is not None and clip_per_tensor:
            for g in grads.values():  # torch's clip_grad_norm_ formula, one tensor at a time
                g.mul_((clip / (g.norm() + 1e-6)).clamp(max=1.0))
        elif clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        for n, g in grads.items():
            acc[n] += transform(g.float())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for n, p in params.items():
        p.requires_grad_(requires[n])
    return acc

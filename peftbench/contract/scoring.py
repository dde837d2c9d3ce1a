"""What a method's `score` reads (`ScoringData`) and the gradient statistics several methods
score with (SAM, ChildTuning-D, FISH): the helpers a method author uses, in one place.

Scoring never updates the model: gradients are read, accumulated and zeroed; no optimizer or
scheduler exists here. Accumulators live on the model's device in float32. A `score` that
does fine-tune (LT-SFT's short full fine-tuning, say) must restore every parameter and buffer
before returning: the runner checks (see `peftbench.contract.selector`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from peftbench.contract.settings import TrainConfig
from peftbench.data.spec import TaskSpec
from peftbench.modeling.compute import autocast, forward, loss_fn
from peftbench.modeling.models import pretrained_parameters


class RecordedSettings:
    """The run's training settings as `score` sees them: every setting read is noted in
    `read`, so the score cache keys an entry on exactly the settings its scoring read
    (`training.cache.ScoreCache.get_or_compute`): a scoring phase at the run's lr is scored again when
    the lr changes; a score that reads none is shared across rates."""

    def __init__(self, settings: TrainConfig):
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name: str):
        value = getattr(self._settings, name)
        self.read.add(name)
        return value

    def __setattr__(self, name, value):
        raise AttributeError(f"the run's training settings are read-only in score() (tried to set {name!r})")

    def values(self) -> dict:
        from dataclasses import asdict

        return asdict(self._settings)


@dataclass
class ScoringData:
    """What a selector's `score` may read.

    - `loader`: the run's training set, shuffled with the run's seed, batch size of the run;
    - `task`: the task spec (kind, labels, metrics);
    - `device`: where the model is;
    - `train`: the run's training settings (lr, batch size, max length, ...), for a scoring
      phase that fine-tunes (it must restore the model afterwards).
    """

    loader: DataLoader
    task: TaskSpec
    device: torch.device
    train: TrainConfig | RecordedSettings = field(default_factory=TrainConfig)
    progress: bool = False  # a progress bar per pass (a long scoring phase does not look hung)

    def batches(self):
        """One pass over the training batches, moved to `device`."""
        from tqdm.auto import tqdm

        for batch in tqdm(self.loader, desc="scoring", disable=not self.progress, leave=False,
                          dynamic_ncols=True):
            yield {k: v.to(self.device) for k, v in batch.items()}

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The task's training loss on `batch` (cross-entropy, or MSE for regression), computed
        as the trainer computes it (bf16 autocast on CUDA, and on CPU with the run's `bf16`)."""
        with autocast(self.device, self.train.bf16):
            return loss_fn(forward(model, batch, self.task), batch["labels"], self.task)


def count_batches(data: ScoringData, batches: int | str) -> int:
    """`batches` as a number: an int as is, "epoch" = one pass over the training set."""
    if batches == "epoch":
        return len(data.loader)
    if isinstance(batches, int) and batches > 0:
        return batches
    from peftbench.core.errors import UsageError

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

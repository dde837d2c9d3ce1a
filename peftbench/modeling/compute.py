"""The forward pass and the loss of a batch, as training and scoring both compute them (autocast included)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from peftbench.data.spec import TaskSpec


def autocast(device: torch.device, bf16: bool = False):
    """bfloat16 autocast on CUDA always, on CPU with the `bf16` setting; float32 otherwise."""
    if device.type == "cuda" or bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def forward(model, batch: dict, task: TaskSpec) -> torch.Tensor:
    """Logits: [B, classes], [B] for regression, [B, choices] for multiple choice (read by a
    decoder's LM head: each choice's summed token log-likelihood, `choice_logliks`)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "choice_labels")}
    if "choice_labels" in batch:
        targets = batch["choice_labels"]
        inputs = {k: v.flatten(0, 1) for k, v in inputs.items()}
        return choice_logliks(model(**inputs).logits, targets.flatten(0, 1)).view(targets.shape[:2])
    if task.kind == "multiple_choice":
        shape = inputs["input_ids"].shape[:2]
        inputs = {k: v.flatten(0, 1) for k, v in inputs.items()}
        return model(**inputs).logits.view(shape)
    logits = model(**inputs).logits
    return logits.squeeze(-1) if task.kind == "regression" else logits


def choice_logliks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] summed log-likelihood of each sequence's target tokens (`targets`: -100 elsewhere),
    each predicted from the position before it (lm-evaluation-harness's loglikelihood). As the
    choices' logits, their cross-entropy trains the model to rank the right choice first, the
    discriminative loss that matches how the choice is then picked (argmax)."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                          ignore_index=-100, reduction="none")
    return -nll.view(targets.shape[0], -1).sum(-1)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    if task.kind == "regression":
        return F.mse_loss(logits.float(), labels)
    if task.kind == "causal_lm":  # next-token cross-entropy on the answer tokens (-100 elsewhere)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=-100)
    return F.cross_entropy(logits.float(), labels)

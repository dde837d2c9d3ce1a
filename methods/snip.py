"""SNIP connection sensitivity (Lee et al., ICLR 2019), as SPEFT scores sparse fine-tuning."""
from __future__ import annotations

import contextlib
import re

import torch

from peftbench.api import (
    Batches, Scope, Selection, Selector, accumulate_gradients, check_scope, count_batches, top_k)

BLOCK_LINEAR = re.compile(r"\.(layer|layers|h|block|blocks)\.\d+\..*\.weight$")


def block_linear_weights(model) -> set[str]:
    """Names of the weights of the linear layers (`nn.Linear`, GPT-2's `Conv1D`) inside the
    repeated blocks: SPEFT's candidates (its `target_modules`, the attention and feed-forward
    projections). A model without one is refused by name."""
    from transformers.pytorch_utils import Conv1D

    from peftbench.api import UsageError, pretrained_parameters

    pretrained = set(pretrained_parameters(model))
    found = {f"{name}.weight" for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and f"{name}.weight" in pretrained
             and BLOCK_LINEAR.search(f"{name}.weight")}
    if not found:
        raise UsageError(f"{type(model).__name__} has no linear layer inside repeated blocks "
                         "(layer.N / layers.N / h.N / block.N): these salience selectors score those weights")
    return found


@contextlib.contextmanager
def eager_attention(model):
    """The model's attention as plain operations while inside (transformers' eager
    implementation), restored on exit: a fused SDPA kernel has no double backward on CPU
    (GraSP) and hides its softmax from a patch (SynFlow)."""
    attention = getattr(model.config, "_attn_implementation", None)
    switch = attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(attention)


class SNIP(Selector):
    """Train the entries of largest |theta * g|, g the training loss's gradient at theta0
    averaged over `batches` batches, dropout off (the model as loaded is in eval mode when
    SPEFT scores it), over the weights of the linear layers inside the transformer blocks
    (SPEFT's `target_modules`: embeddings, norms, biases and a pooler are never chosen);
    global top-k (`scope="global"`, SPEFT's `--sparse_global_topk`) or per tensor; a budget
    larger than those weights takes them all (<= budget, as SynFlow and GraSP).

    Reference: 0-ml/speft `model/sparse_peft.py`, `compute_gradient_based_scores` with
    `saliency` = |w * s|. SPEFT's `Taylor-FO` scores (w * s)^2: the same order, so the same
    mask at any budget; it is not a second method (tested). Its `gradient` (|s|) is SAM with
    clip=None, scope="global", over all tensors and with dropout on. Our choice where the
    reference leaves a default we could not read: `batches` = 64 (1,024 examples at batch 16;
    SPEFT sets `--sparse_score_accumulation_examples` in its launcher).
    """

    description = "largest |theta * grad| at theta0 over block linear weights (SNIP; SPEFT's saliency)"
    needs_data = True

    def __init__(self, batches: Batches = 64, scope: Scope = "global"):
        self.batches = batches
        self.scope = check_scope(scope)

    def score(self, model, data) -> dict[str, torch.Tensor]:
        summed = accumulate_gradients(model, data, count_batches(data, self.batches),
                                      transform=lambda g: g, train_mode=False)
        params = dict(model.named_parameters())
        return {n: (params[n].detach().float() * summed[n]).abs().cpu()
                for n in sorted(block_linear_weights(model))}

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        pool = sum(s.numel() for s in scores.values())  # a budget past the pool takes all of it
        return top_k(scores, min(budget, pool), self.scope, generator)

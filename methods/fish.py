"""FISH mask (Sung, Nair & Raffel, NeurIPS 2021): empirical Fisher, global top-k, fixed mask."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.api import (
    PositiveInt, Scope, Selection, Selector, check_scope, pretrained_parameters, top_k)


class FISH(Selector):
    """Empirical Fisher F_i = (1/N) sum_n (d loss_n / d theta_i)^2 over the first `num_samples`
    shuffled training examples (all of them, once, when there are fewer), one example at a time, with the true label ("label-square" in
    the reference `calculate_the_importance_label`) and the randomly initialised head (as the
    authors intend), dropout off; then the global top-`budget` entries, fixed for training.
    On a causal-LM task an example's loss is its answer tokens' mean cross-entropy given the
    gold answer (the task's training loss for that row): one squared gradient per example.

    Per-example gradients, batched (`per_example_fisher`): hooks on every Linear, LayerNorm and
    Embedding read each module's input and output gradient for a whole padded batch, and form
    the B per-example gradients from them (G_b^T X_b for a Linear; the rows' summed output
    gradients per example for an embedding), square and sum: one forward and one backward per
    batch, no weight gradient, instead of one pass per example. Padding changes nothing: with
    dropout off, padded positions get exactly zero gradient (their keys are masked out and
    their outputs are unused), so each example's gradient is the one of the example alone
    (tested against the loop). That is the path on CUDA. On CPU the examples go one at a time,
    each trimmed to its own length (`_loop_fisher`), the same maths: measured on the default
    model, RTE, 32 examples, 2 CPU cores: loop 44 ms/example, batched 92 ms/example, because
    either way each example's m x n gradient is materialised and squared (memory-bound), and a
    padded batch adds tokens; a GPU hides the first and not the loop's latency. The loop is
    also the path for a model with a parameter outside those modules.
    (`torch.func`'s vmap cannot run transformers 5 BERT: its attention-mask construction has
    data-dependent control flow.)

    Choices: the reference sums instead of averaging (same ranking) and counts the head inside
    the budget (k = int(p N_all) - |head|); here the head is outside the budget, as for every
    method in peftbench.
    """

    description = "empirical Fisher over per-example gradients, global top-k (Sung et al. 2021)"
    needs_data = True

    def __init__(self, num_samples: PositiveInt = 1024, scope: Scope = "global"):
        self.num_samples = num_samples
        self.scope = check_scope(scope)

    def score(self, model, data) -> dict[str, torch.Tensor]:
        was_training = model.training
        model.eval()
        try:
            # the batched path sums batch-mean losses times the batch size: one loss term per
            # row, which a causal-LM batch (a mean over every answer token) is not
            if data.device.type == "cuda" and data.task.kind != "causal_lm" and per_example_supported(model):
                fisher, seen = per_example_fisher(model, data, self.num_samples)
            else:
                fisher, seen = _loop_fisher(model, data, self.num_samples)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return {n: (f / seen).cpu() for n, f in fisher.items()}

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return top_k(scores, budget, self.scope, generator)


def _first_examples(data, num_samples: int):
    """The first `num_samples` shuffled training examples in batches, the last one cut to
    size; at most one pass, as the reference (its loop over the loader stops at N or at the
    end of the data): with fewer training rows than N, every row is used once and F is their
    mean (peftbench before 0.3.0 cycled the rows instead)."""
    seen = 0
    for batch in data.batches():
        take = min(len(batch["labels"]), num_samples - seen)
        yield {k: v[:take] for k, v in batch.items()}
        seen += take
        if seen == num_samples:
            return


def _loop_fisher(model, data, num_samples: int):
    """Sum over examples of squared per-example gradients, one example at a time."""
    params = pretrained_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    seen = 0
    for example in _examples(_first_examples(data, num_samples)):
        model.zero_grad(set_to_none=True)
        data.loss(model, example).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.float().square()
        seen += 1
    return fisher, seen


SUPPORTED = (nn.Linear, nn.LayerNorm, nn.Embedding)


def per_example_supported(model) -> bool:
    """True when every pre-trained parameter is the weight or bias of a plain Linear,
    LayerNorm or Embedding (BERT, RoBERTa, DeBERTa-style encoders)."""
    params = pretrained_parameters(model)
    covered = set()
    for name, module in model.named_modules():
        if type(module) in SUPPORTED and not (isinstance(module, nn.Embedding) and
                                              (module.max_norm is not None or module.scale_grad_by_freq)):
            covered |= {f"{name}.{attr}" for attr, _ in module.named_parameters(recurse=False)}
    return set(params) <= covered


def per_example_fisher(model, data, num_samples: int):
    """Sum over examples of squared per-example gradients, a batch at a time, from hooks (see
    the class docstring). Parameters are frozen meanwhile: autograd computes activation
    gradients only."""
    params = pretrained_parameters(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    requires = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    handles = []

    def add(name, per_example):  # per_example: [B, *shape], a fresh tensor
        if name in fisher:
            fisher[name] += per_example.float().square_().sum(0)

    def linear_hook(module, inputs, output, name):
        x = inputs[0]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).float()
        output.register_hook(lambda g: (
            add(f"{name}.weight", torch.bmm(g.reshape(*x3.shape[:2], -1).float().transpose(1, 2), x3)),
            module.bias is not None and add(f"{name}.bias", g.reshape(*x3.shape[:2], -1).sum(1)),
            None)[-1])

    def norm_hook(module, inputs, output, name):
        normed = F.layer_norm(inputs[0].float(), module.normalized_shape, eps=module.eps)
        dims = tuple(range(1, normed.dim() - len(module.normalized_shape)))
        output.register_hook(lambda g: (
            module.weight is not None and add(f"{name}.weight", (g.float() * normed).sum(dims)),
            module.bias is not None and add(f"{name}.bias", g.float().sum(dims)), None)[-1])

    def embedding_hook(module, inputs, output, name):
        ids = inputs[0]
        if not output.requires_grad:
            output.requires_grad_()
        if ids.shape[0] != batch_size[0]:  # e.g. position ids [1, T], broadcast over the batch:
            ids = ids.expand(batch_size[0], *ids.shape[1:])  # one copy per example, so its
            output = output.expand(batch_size[0], *output.shape[1:])  # gradient is per example
        ids2 = ids.reshape(ids.shape[0], -1)

        def backward(g):
            g2 = g.reshape(ids2.numel(), -1).float()
            keep = (ids2 != module.padding_idx).reshape(-1) if module.padding_idx is not None else \
                torch.ones(ids2.numel(), dtype=torch.bool, device=ids.device)
            example = torch.arange(ids2.shape[0], device=ids.device).repeat_interleave(ids2.shape[1])
            keys = (example * module.num_embeddings + ids2.reshape(-1))[keep]
            unique, inverse = torch.unique(keys, return_inverse=True)
            rows = torch.zeros(len(unique), g2.shape[1], device=g.device).index_add_(0, inverse, g2[keep])
            if f"{name}.weight" in fisher:
                fisher[f"{name}.weight"].index_add_(0, unique % module.num_embeddings, rows.square())
        output.register_hook(backward)
        return output

    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            handles.append(module.register_forward_hook(functools.partial(linear_hook, name=name)))
        elif type(module) is nn.LayerNorm:
            handles.append(module.register_forward_hook(functools.partial(norm_hook, name=name)))
        elif type(module) is nn.Embedding:
            handles.append(module.register_forward_hook(functools.partial(embedding_hook, name=name)))
    seen, batch_size = 0, [0]
    try:
        for batch in _first_examples(data, num_samples):
            size = batch_size[0] = len(batch["labels"])
            (data.loss(model, batch) * size).backward()  # the loss is a batch mean: sum it
            seen += size
    finally:
        for handle in handles:
            handle.remove()
        for n, p in params.items():
            p.requires_grad_(requires[n])
    return fisher, seen


def _examples(batches):
    """Single examples out of padded batches, each trimmed to its own length."""
    for batch in batches:
        for i in range(len(batch["labels"])):
            length = int(batch["attention_mask"][i].sum(-1).max())
            yield {k: (v[i:i + 1, ..., :length] if k != "labels" or v.dim() > 1 else v[i:i + 1])
                   for k, v in batch.items()}  # token labels (a causal LM's) trimmed with the tokens

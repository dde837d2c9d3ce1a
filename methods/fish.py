"""FISH mask (Sung, Nair & Raffel, NeurIPS 2021): empirical Fisher, global top-k, fixed mask."""
from __future__ import annotations

import torch

from peftbench.models import pretrained_parameters
from peftbench.selector import PositiveInt, Scope, Selection, Selector, check_scope, top_k


class FISH(Selector):
    """Empirical Fisher F_i = (1/N) sum_n (d loss_n / d theta_i)^2 over the first `num_samples`
    shuffled training examples, one example at a time, with the true label ("label-square" in
    the reference `calculate_the_importance_label`) and the randomly initialised head (as the
    authors intend), dropout off; then the global top-`budget` entries, fixed for training.

    Per-example gradients use a plain loop over examples, each trimmed to its own length.
    `torch.func` (vmap over `grad` of a `functional_call`) was measured and cannot run on
    transformers 5 BERT: its attention-mask construction has data-dependent control flow that
    vmap rejects ("data-dependent control flow"), with eager and SDPA attention alike.

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
        params = pretrained_parameters(model)
        for p in params.values():
            p.requires_grad_(True)
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = model.training
        model.eval()
        seen = 0
        while seen < self.num_samples:  # cycle if the training set is smaller than N
            for example in _examples(data.batches()):
                model.zero_grad(set_to_none=True)
                data.loss(model, example).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.float().square()
                seen += 1
                if seen == self.num_samples:
                    break
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {n: (f / seen).cpu() for n, f in fisher.items()}

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        return top_k(scores, budget, self.scope, generator)


def _examples(batches):
    """Single examples out of padded batches, each trimmed to its own length."""
    for batch in batches:
        for i in range(len(batch["labels"])):
            length = int(batch["attention_mask"][i].sum(-1).max())
            yield {k: (v[i:i + 1, ..., :length] if k != "labels" else v[i:i + 1])
                   for k, v in batch.items()}

"""AdaPEFT (Xu & Bu, arXiv 2505.12579): Hessian-informed subset selection as a 0-1 knapsack.

peftbench interpretation: the paper's text beyond the abstract was not available; the
formulas below follow the abstract and the reviewers' summary (methods-research.md 1.13).

Groups. Parameters are partitioned into groups G_1..G_K: `groups="tensor"` (every encoder
tensor), `"module"` (one group per module kind across layers, e.g. all `attention.self.query.weight`
tensors), or `"layer_module"` (per layer and module: tensors with the same name up to the
parameter suffix).

Value. With g the mean training gradient at theta0 and h an estimate of the Hessian diagonal,
a step of size eta along -g_k on group k alone changes the loss by
    dL_k(eta) ~= -eta b_k + eta^2 a_k / 2,  b_k = g_k . g_k,  a_k = g_k . diag(h) g_k,
so the best step decreases the loss by v_k = b_k^2 / (2 a_k) (the authors' "G^T g squared over
2 g^T H g"). Groups with a_k <= 0 (no positive curvature along the step) get v_k = 0, as the
authors discard fits with g^T H g <= 0.

Curvature, `hessian=`:
- "exact" (default): a_k = g_k^T H g_k exactly, by one Hessian-vector product per group and
  batch (H averaged over the scoring batches, g their mean gradient, found in a first pass).
  Why the default: a diagonal estimate throws away the off-diagonal terms that make g^T H g
  positive; on a tiny BERT, Hutchinson with one z per batch gave 13 of 23 module groups
  a_k <= 0 (value 0), while the exact products were positive for all 23. Cost: groups x batches
  double-backward passes.
- "hutchinson": a_k = g_k . diag(h) g_k with h = E_z[z * (H z)], Rademacher z (one z per
  scoring batch, by double back-propagation; exact for a diagonal H);
- "fisher": the same with h the mean squared batch gradient.

Knapsack. Maximise sum v_k x_k subject to sum |G_k| x_k <= budget. `pareto_front` computes the
exact front of (trainable parameters, predicted loss decrease) over all subsets by
Nemhauser-Ullmann dynamic programming (merge and prune dominated points group by group); any
budget's exact knapsack optimum is read off it. If the front grows past `max_front` points, it
switches to the greedy front (groups in order of decreasing value per parameter, taking
prefixes), the documented approximation, which the paper's "incremental Pareto front" also uses.

Scores. `score` returns each entry's per-parameter influence v_k / |G_k| (so a group's
entries sum to v_k); `select` rebuilds the groups from them, so a budget sweep reuses one
scoring pass.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from peftbench.errors import check_choice
from peftbench.scoring import count_batches, differentiable_parameters
from peftbench.selector import Batches, PositiveInt, Selection, Selector

GROUPINGS = ("tensor", "module", "layer_module")
HESSIANS = ("exact", "hutchinson", "fisher")


@dataclass
class FrontPoint:
    weight: int
    value: float
    items: tuple[int, ...]


def pareto_front(values: list[float], weights: list[int], max_front: int = 200_000) -> tuple[list[FrontPoint], bool]:
    """Non-dominated (weight, value) subsets, sorted by weight, and whether it is exact.

    A point is kept iff no other subset has weight <= and value >= with one strict; the front
    is therefore monotone: weights and values both strictly increase along it.
    """
    front = [FrontPoint(0, 0.0, ())]
    for i, (v, w) in enumerate(zip(values, weights)):
        if v <= 0:
            continue  # never worth its weight
        merged = sorted(front + [FrontPoint(p.weight + w, p.value + v, p.items + (i,)) for p in front],
                        key=lambda p: (p.weight, -p.value))
        front, best = [], -1.0
        for p in merged:
            if p.value > best:
                front.append(p)
                best = p.value
        if len(front) > max_front:
            return greedy_front(values, weights), False
    return front, True


def greedy_front(values: list[float], weights: list[int]) -> list[FrontPoint]:
    """Prefixes of the groups sorted by value per parameter (the approximation for large K)."""
    order = sorted((i for i, v in enumerate(values) if v > 0), key=lambda i: -values[i] / weights[i])
    front, weight, value = [FrontPoint(0, 0.0, ())], 0, 0.0
    for n, i in enumerate(order):
        weight, value = weight + weights[i], value + values[i]
        front.append(FrontPoint(weight, value, tuple(order[:n + 1])))
    return front


def best_under(front: list[FrontPoint], capacity: int) -> FrontPoint:
    """The knapsack optimum at `capacity`: the highest-value front point that fits."""
    return max((p for p in front if p.weight <= capacity), key=lambda p: p.value)


def brute_force_knapsack(values, weights, capacity) -> float:
    """Exhaustive optimum, for tests on small instances."""
    best = 0.0
    for mask in itertools.product((0, 1), repeat=len(values)):
        if sum(w for w, x in zip(weights, mask) if x) <= capacity:
            best = max(best, sum(v for v, x in zip(values, mask) if x))
    return best


def hutchinson_diagonal(loss: torch.Tensor, params: list[torch.Tensor], samples: int,
                        generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(gradient, Hessian-diagonal estimate) of `loss`: E_z[z * (H z)] over `samples` Rademacher
    draws of z, by double back-propagation. Exact for a diagonal Hessian (z * z = 1)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    diag = [torch.zeros_like(p) for p in params]
    for i in range(samples):
        zs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
        hz = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=i < samples - 1)
        for d, z, h in zip(diag, zs, hz):
            d += z * h / samples
    return [g.detach() for g in grads], diag


def group_curvature(loss: torch.Tensor, params: list[torch.Tensor], direction: list[torch.Tensor],
                    group_of: list[int], groups: int) -> list[float]:
    """Exact d_k^T H d_k per group k, d_k = `direction` on group k's tensors and 0 elsewhere:
    one Hessian-vector product (double back-propagation) per group."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = []
    for k in range(groups):
        members = [i for i, g in enumerate(group_of) if g == k]
        hv = torch.autograd.grad([grads[i] for i in members], [params[i] for i in members],
                                 grad_outputs=[direction[i] for i in members],
                                 retain_graph=k < groups - 1)
        out.append(float(sum((direction[i] * h).sum() for i, h in zip(members, hv))))
    return out


def group_key(name: str, grouping: str, block: str = r"layer\.\d+") -> str:
    """The group of tensor `name`. "module": the block index replaced by `*` (`block`: the
    architecture's block pattern, `peftbench.architectures`: BERT's `layer.3.`, GPT-2's `h.3.`,
    Llama's `layers.3.`), so a module kind's tensors across blocks form one group."""
    if grouping == "tensor":
        return name
    if grouping == "module":
        return re.sub(rf"(^|\.)({block})\.", lambda m: m.group(1) + re.sub(r"\d+", "*", m.group(2)) + ".", name)
    return name.rsplit(".", 1)[0]  # layer_module: a module's weight and bias together


class AdaPEFT(Selector):
    """Hessian-informed knapsack over parameter groups (see the module docstring)."""

    description = "groups chosen by a knapsack on 2nd-order predicted loss decrease (AdaPEFT, our reading)"
    needs_data = True

    def __init__(self, groups: str = "module", hessian: str = "exact", batches: Batches = 20,
                 max_front: PositiveInt = 200_000):
        self.groups = check_choice("groups", groups, GROUPINGS)
        self.hessian = check_choice("hessian", hessian, HESSIANS)
        self.batches = batches
        self.max_front = max_front

    @classmethod
    def search_space(cls) -> dict:
        from optuna.distributions import CategoricalDistribution

        return {"groups": CategoricalDistribution(GROUPINGS), "hessian": CategoricalDistribution(HESSIANS)}

    def score(self, model, data) -> dict[str, torch.Tensor]:
        names, tensors = differentiable_parameters(model)
        n = count_batches(data, self.batches)
        block = self._block(model)
        keys = {name: group_key(name, self.groups, block) for name in names}
        order = list(dict.fromkeys(keys.values()))
        group_of = [order.index(keys[name]) for name in names]
        g = [torch.zeros_like(p) for p in tensors]
        h = [torch.zeros_like(p) for p in tensors]
        generator = torch.Generator().manual_seed(0)
        was_training = model.training
        model.eval()  # a deterministic loss: the same function for gradient and curvature
        batches = list(itertools.islice(itertools.cycle(data.batches()), n))
        for batch in batches:
            if self.hessian == "hutchinson":  # one z per batch; averaging over batches
                # the fused attention kernels have no double backward: use the math kernel
                with sdpa_kernel([SDPBackend.MATH]):
                    grads, diag = hutchinson_diagonal(data.loss(model, batch), tensors, 1, generator)
                for acc, x in zip(h, diag):
                    acc += x / n
            else:
                grads = torch.autograd.grad(data.loss(model, batch), tensors)
                if self.hessian == "fisher":
                    for acc, x in zip(h, grads):
                        acc += x.square() / n
            for acc, x in zip(g, grads):
                acc += x / n
        b, a, size = {}, {}, {}
        for name, gi, hi in zip(names, g, h):
            k = keys[name]
            b[k] = b.get(k, 0.0) + float(gi.square().sum())
            a[k] = a.get(k, 0.0) + float((hi * gi.square()).sum())
            size[k] = size.get(k, 0) + gi.numel()
        if self.hessian == "exact":  # second pass: g_k^T H g_k with the mean gradient g
            a = dict.fromkeys(order, 0.0)
            for batch in batches:
                with sdpa_kernel([SDPBackend.MATH]):
                    curv = group_curvature(data.loss(model, batch), tensors, g, group_of, len(order))
                for k, value in zip(order, curv):
                    a[k] += value / n
        model.train(was_training)
        value = {k: b[k] ** 2 / (2 * a[k]) if a[k] > 0 else 0.0 for k in b}
        return {name: torch.full(p.shape, value[keys[name]] / size[keys[name]])
                for name, p in zip(names, tensors)}

    def _block(self, model) -> str:
        """The block pattern the "module" grouping collapses (any for the other groupings)."""
        if self.groups != "module":
            return r"layer\.\d+"
        from peftbench.architectures import layout

        return layout(model).block

    def front(self, scores: dict[str, torch.Tensor], block: str = r"layer\.\d+") -> tuple[list[str], list[FrontPoint], bool]:
        """(group keys, Pareto front over the groups, exact?) from the per-entry scores."""
        keys: dict[str, list[str]] = {}
        for name in scores:
            keys.setdefault(group_key(name, self.groups, block), []).append(name)
        groups = list(keys)
        values = [sum(float(scores[n].sum()) for n in keys[k]) for k in groups]
        weights = [sum(scores[n].numel() for n in keys[k]) for k in groups]
        front, exact = pareto_front(values, weights, self.max_front)
        return groups, front, exact

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        block = self._block(model)
        groups, front, exact = self.front(scores, block)
        point = best_under(front, budget)
        members = {}
        for name in scores:
            members.setdefault(group_key(name, self.groups, block), []).append(name)
        chosen = {n for i in point.items for n in members[groups[i]]}
        return Selection(full=chosen, notes={
            "front_exact": exact, "front_points": len(front),
            "predicted_loss_decrease": point.value, "groups_chosen": [groups[i] for i in point.items],
            "front": [[p.weight, p.value] for p in front][:1000]})

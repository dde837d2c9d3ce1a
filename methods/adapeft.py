"""AdaPEFT (Xu & Bu, arXiv 2505.12579): whole PEFT families chosen by a knapsack on their
predicted loss decrease.

The paper (abstract, introduction and reviews: methods-research.md 1.13): the candidate groups
are PEFT families (LoRA, prompt tuning, linear probing, LayerNorm tuning, BitFit); a group's
value is its predicted loss decrease, from a short probe along the optimiser's update with
GeN-style forward fits (the loss along the update fitted by a quadratic, kept only when its
curvature is positive and the fit is good), averaged over checkpoints; a 0-1 knapsack, read off
its Pareto front over budgets, chooses the groups. Where the text is not available, the choices
below are ours, in formulas:

Candidates (`families`). For each module kind m of the blocks (query, key, value, attention
output, feed-forward in and out: `peftbench.architectures`), LoRA of rank r in `ranks` on every
block's m: new parameters, cost sum over blocks of r (d_in + d_out); a kind takes at most one
rank (a multiple-choice class). Ranks 1, 4 and 16 by default: on MiniLM every family at its
largest rank is 3.1% of the encoder, so a 2% budget is a choice even when some families are
valued 0 (with ranks to 8 the whole menu was 1.6%, and STS-B spent 23-42% of 2%); ranks 2 and 8
added cost to every probe (each rank is fitted) and little to the menu. BitFit: the biases of
those Linear layers (pre-trained entries). LayerNorm: every LayerNorm weight and bias of the
encoder (pre-trained entries). Linear probing is the head, which every method trains; prompt
tuning is not a candidate (not implemented).

Probe. A copy of the model with LoRA of the largest rank on every kind, BitFit, LayerNorm and
the head trainable runs `probe_steps` AdamW steps at the run's lr (linear warm-up at the run's
ratio, then constant) on the run's training batches, dropout on.

Value: GeN's estimator (the authors' AutoGeN `lr_parabola`), per candidate, as the reviews
describe it ("4k+1 forward passes", fitted with "minus learning rates"). At `checkpoints` evenly
spaced steps the optimiser's proposed step d is taken, and each candidate's part of it is its
direction: the change of its entries (BitFit, LayerNorm), or for LoRA a band of the singular
components (SVD) of the step's change of each block's B A (with the default ranks: rank 1 the
first, rank 4 the 2nd to 4th, rank 16 the 5th to 16th). The loss at the probe's current state
with one candidate's direction alone scaled by rho in SCALES (-2, -1, 1, 2, and the shared 0:
4k+1 evaluations) on the first `fit_batches` training batches (the same at every scale;
evaluation mode) is fitted by L(rho) = c - b rho + a rho^2 / 2 (least squares). A fit below R^2 `min_r2` is discarded
(value 0); with a > 0 and b > 0 the value is the fitted decrease at the best step, held within
the range (b^2 / (2 a) when b / a <= 2). Our reading where the paper is silent: a fit without
positive curvature whose loss still falls along the step is valued by the decrease observed at
rho > 0 (a lower bound) instead of 0. A band's value is the mean over checkpoints; a LoRA rank's
value is the sum of its kind's bands up to it (`nested_values`): Hi-DLR's diagonal curvature
across orthogonal parts of the step, so a rank that reaches everything a smaller one reaches is
never valued below it. Why bands and not the rank-r approximation fitted as one direction:
measured on SST-2 at 2%, lr 1e-3, seed 2, that valued rank 16 below rank 4 in 5 of 6 kinds
(one scale for the whole direction: the added components bring curvature more than slope), and
the knapsack, taking the cheaper rank, spent 31% of the budget.
Why the step and not the probe's whole displacement, applied alone to the pre-trained encoder
under the probe's head: measured on SST-2 at lr 1e-2, one seed in four found every such
displacement raising the loss (the head had co-adapted with all of them), valued every family 0
and trained no entry; the step is a descent direction where the probe is.

Knapsack. Maximise the summed value under summed cost <= budget, at most one option per
class. `pareto_front` computes the exact front of (cost, value) over all choices by
Nemhauser-Ullmann dynamic programming, class by class; past `max_front` points it switches to
the greedy front (options by value per parameter, one per class), the approximation the paper's
"incremental Pareto front" also makes. Spent / budget is in the selection's notes; the board
flags a cell that spends less than half its budget (`statistics.selection_checks`).
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from peftbench.api import (
    Fraction, PositiveInt, ScoringData, Selection, Selector, canonical_name, head_parameters,
    pretrained_parameters)

SCALES = (-2.0, -1.0, 0.0, 1.0, 2.0)  # multiples of a candidate's step the loss is fitted at (GeN)


@dataclass(frozen=True)
class Family:
    """One candidate: `kind` lora / bitfit / layernorm; `klass` groups the options of which at
    most one is chosen (a LoRA kind's ranks); `targets` the modules (LoRA) or tensors it trains."""

    name: str
    klass: str
    kind: str
    rank: int
    targets: tuple[str, ...]
    cost: int


def families(model: nn.Module, ranks: tuple[int, ...]) -> list[Family]:
    """The candidates of `model`, in a fixed order (module docstring)."""
    from peftbench.api import block_modules, layout

    names = layout(model)
    suffixes = [*names.qkv, names.attention_out, *names.ffn_in, names.ffn_out]
    params = pretrained_parameters(model)
    out, biases = [], []
    for suffix in suffixes:
        modules = tuple(block_modules(model, [suffix]))
        size = sum(sum(model.get_submodule(m).weight.shape) for m in modules)  # d_in + d_out (Linear, Conv1D)
        for r in sorted(set(ranks)):  # ascending: a rank's bands are those below it (`nested_values`)
            out.append(Family(f"lora:{suffix}:r{r}", f"lora:{suffix}", "lora", r, modules, r * size))
        biases += [f"{m}.bias" for m in modules if f"{m}.bias" in params]
    if biases:
        out.append(Family("bitfit", "bitfit", "bitfit", 0, tuple(biases), sum(params[n].numel() for n in biases)))
    norms = tuple(n for n, _ in _layernorm_parameters(model) if n in params)
    if norms:
        out.append(Family("layernorm", "layernorm", "layernorm", 0, norms, sum(params[n].numel() for n in norms)))
    return out


def _layernorm_parameters(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            for p, param in module.named_parameters(recurse=False):
                yield f"{name}.{p}", param


@dataclass
class FrontPoint:
    weight: int
    value: float
    items: tuple[int, ...]


def _prune(points: list[FrontPoint]) -> list[FrontPoint]:
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p.weight, -p.value)):
        if p.value > best:
            front.append(p)
            best = p.value
    return front


def pareto_front(values: list[float], weights: list[int], classes: list[str] | None = None,
                 max_front: int = 200_000) -> tuple[list[FrontPoint], bool]:
    """Non-dominated (weight, value) choices of items, at most one per class (each item its own
    class by default), sorted by weight, and whether it is exact. A point is kept iff no other
    choice has weight <= and value >= with one strict: weights and values strictly increase."""
    classes = classes if classes is not None else [str(i) for i in range(len(values))]
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        if values[i] > 0:  # never worth its weight otherwise
            by_class.setdefault(c, []).append(i)
    front = [FrontPoint(0, 0.0, ())]
    for members in by_class.values():
        front = _prune(front + [FrontPoint(p.weight + weights[i], p.value + values[i], p.items + (i,))
                                for p in front for i in members])
        if len(front) > max_front:
            return greedy_front(values, weights, classes), False
    return front, True


def greedy_front(values: list[float], weights: list[int], classes: list[str] | None = None) -> list[FrontPoint]:
    """Prefixes of the items by value per parameter, skipping an item whose class is taken
    (the approximation for large instances)."""
    classes = classes if classes is not None else [str(i) for i in range(len(values))]
    order = sorted((i for i, v in enumerate(values) if v > 0), key=lambda i: -values[i] / weights[i])
    front, weight, value, items, taken = [FrontPoint(0, 0.0, ())], 0, 0.0, (), set()
    for i in order:
        if classes[i] in taken:
            continue
        taken.add(classes[i])
        weight, value, items = weight + weights[i], value + values[i], items + (i,)
        front.append(FrontPoint(weight, value, items))
    return front


def best_under(front: list[FrontPoint], capacity: int) -> FrontPoint:
    """The knapsack optimum at `capacity`: the highest-value front point that fits."""
    return max((p for p in front if p.weight <= capacity), key=lambda p: p.value)


def brute_force_knapsack(values, weights, capacity, classes=None) -> float:
    """Exhaustive optimum (at most one item per class), for tests on small instances."""
    classes = classes if classes is not None else [str(i) for i in range(len(values))]
    groups = list(dict.fromkeys(classes))
    options = [[None] + [i for i, c in enumerate(classes) if c == g] for g in groups]
    best = 0.0
    for pick in itertools.product(*options):
        chosen = [i for i in pick if i is not None]
        if sum(weights[i] for i in chosen) <= capacity:
            best = max(best, sum(values[i] for i in chosen))
    return best


def quadratic_value(etas, losses, min_r2: float) -> tuple[float, float]:
    """(value, R^2) of the GeN fit L(rho) = c - b rho + a rho^2 / 2 over the scales probed.
    A fit below `min_r2` is discarded (value 0). With positive curvature and slope, the value is
    the fitted decrease at the fitted best step, held within the range probed (b^2 / (2 a) when
    b / a is inside it). Without positive curvature, a loss that still falls along the step
    (rho > 0) is a direction that helps beyond the range: its value is the decrease observed
    there (a lower bound), and 0 when it does not fall."""
    x, y = np.asarray(etas, float), np.asarray(losses, float)
    if not np.all(np.isfinite(y)):
        return 0.0, float("nan")
    design = np.stack([np.ones_like(x), -x, x * x / 2], axis=1)
    (c, b, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - design @ np.array([c, b, a])) ** 2).sum()) / total if total > 0 else 0.0
    if r2 < min_r2:
        return 0.0, r2
    if a > 0 and b > 0:
        step = min(b / a, float(x.max()))
        return float(b * step - a * step * step / 2), r2
    ahead = y[x >= 0]
    drop = float(y[x == 0].min() - ahead.min()) if np.any(x == 0) else 0.0
    return max(drop, 0.0), r2


def nested_values(cands: list[Family], band_values) -> list[float]:
    """A family's value from its bands' (`_directions`): a LoRA rank sums the bands of its kind
    up to it (the bands are orthogonal parts of the step, each fitted alone: Hi-DLR's diagonal
    curvature across them); BitFit and LayerNorm are one band each."""
    out, total = [], {}
    for cand, value in zip(cands, band_values):
        total[cand.klass] = total.get(cand.klass, 0.0) + float(value) if cand.kind == "lora" else float(value)
        out.append(total[cand.klass])
    return out


def _lora_config(chosen: dict[str, int], block: str):
    """peft's LoraConfig for LoRA of rank `chosen[suffix]` on each block's `suffix` (scaling 1:
    alpha = r, as `methods/lora.py`)."""
    from peft import LoraConfig

    patterns = {rf"{block}\.{re.escape(s)}": r for s, r in chosen.items()}
    top = max(chosen.values())
    return LoraConfig(r=top, lora_alpha=top, lora_dropout=0.0, bias="none",
                      target_modules=rf".*\.({'|'.join(patterns)})", rank_pattern=patterns, alpha_pattern=patterns)


class AdaPEFT(Selector):
    """PEFT families chosen by a knapsack on their probed loss decrease (module docstring)."""

    description = "PEFT families (LoRA ranks, BitFit, LayerNorm) chosen by a knapsack on probed loss decrease (AdaPEFT, our reading)"
    needs_data = True

    def __init__(self, ranks: tuple[PositiveInt, ...] = (1, 4, 16), probe_steps: PositiveInt = 30,
                 checkpoints: PositiveInt = 2, fit_batches: PositiveInt = 4, min_r2: Fraction = 0.9,
                 max_front: PositiveInt = 200_000):
        self.ranks = tuple(sorted(set(ranks)))
        self.probe_steps = probe_steps
        self.checkpoints = checkpoints
        self.fit_batches = fit_batches
        self.min_r2 = min_r2
        self.max_front = max_front

    @classmethod
    def search_space(cls) -> dict:
        from optuna.distributions import FloatDistribution, IntDistribution

        return {"probe_steps": IntDistribution(10, 100), "min_r2": FloatDistribution(0.5, 0.99)}

    def score(self, model, data: ScoringData) -> dict[str, torch.Tensor]:
        """Per candidate (the order of `families`): value, cost, and the mean R^2 of its (band's)
        fits."""
        from peft import inject_adapter_in_model

        from peftbench.api import layout

        cands = families(model, self.ranks)
        lora_kinds = {f.targets: f.klass.split(":", 1)[1] for f in cands if f.kind == "lora"}
        entries = [n for f in cands if f.kind != "lora" for n in f.targets]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            probe = inject_adapter_in_model(
                _lora_config({k: max(self.ranks) for k in lora_kinds.values()}, layout(model).block),
                copy.deepcopy(model))
            for name, p in probe.named_parameters():
                p.requires_grad_("lora_" in name)
            trainable = [p for n, p in probe.named_parameters() if "lora_" in n]
            own = {canonical_name(n): p for n, p in probe.named_parameters()}
            for name in [*entries, *head_parameters(model)]:
                own[name].requires_grad_(True)
                trainable.append(own[name])
            checks = self._probe(probe, trainable, data, cands)
        values = nested_values(cands, np.mean([c[0] for c in checks], axis=0))
        r2 = np.nanmean([c[1] for c in checks], axis=0) if checks else np.zeros(len(cands))
        return {"family.value": torch.tensor(values, dtype=torch.float64),
                "family.cost": torch.tensor([f.cost for f in cands]),
                "family.r2": torch.tensor(r2, dtype=torch.float64)}

    def _probe(self, probe, params, data, cands) -> list[tuple[list, list]]:
        """Train the probe; at each checkpoint fit every candidate along the step the optimiser
        proposes there (module docstring), then take that step."""
        lr = float(data.train.lr)
        warm = int(np.ceil(data.train.warmup_ratio * self.probe_steps))
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warm + 1)))
        at = {round(self.probe_steps * (i + 1) / self.checkpoints) for i in range(self.checkpoints)}
        fit = list(itertools.islice(data.batches(), self.fit_batches))
        stream = itertools.cycle(data.batches())
        probe.train()
        out = []
        for step in range(1, self.probe_steps + 1):
            loss = data.loss(probe, next(stream))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, data.train.max_grad_norm)
            before = [p.detach().clone() for p in params] if step in at else None
            optimizer.step()
            if before is not None:
                after = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(b)
                    out.append(self._fits(probe, data, fit, cands, self._directions(cands, probe, before, params, after)))
                    for p, a in zip(params, after):
                        p.copy_(a)
                probe.train()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        return out

    @staticmethod
    def _directions(cands, probe, before, params, after) -> list[dict[str, torch.Tensor]]:
        """Per candidate, its part of the step as changes of pre-trained tensors (canonical
        names), the probe at its state before the step; for LoRA of rank r, the band of the
        step's singular components from the next smaller rank of its kind up to r."""
        now = {canonical_name(n): p for n, p in probe.named_parameters()}
        index = {id(p): i for i, p in enumerate(params)}
        step = {n: after[index[id(p)]] - before[index[id(p)]] for n, p in now.items() if id(p) in index}
        out, lower = [], {}
        for cand in cands:
            if cand.kind != "lora":
                out.append({n: step[n] for n in cand.targets})
                continue
            first, lower[cand.klass] = lower.get(cand.klass, 0), cand.rank
            deltas = {}
            for module in cand.targets:
                layer = probe.get_submodule(module)
                a_name = canonical_name(f"{module}.lora_A.default.weight")
                b_name = canonical_name(f"{module}.lora_B.default.weight")
                a0, b0 = now[a_name], now[b_name]
                a1, b1 = a0 + step[a_name], b0 + step[b_name]
                delta = (b1 @ a1 - b0 @ a0) * layer.scaling["default"]
                u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
                band = slice(first, cand.rank)
                low = ((u[:, band] * s[band]) @ vh[band]).to(delta.dtype)
                weight = layer.base_layer.weight
                deltas[f"{module}.base_layer.weight"] = low if low.shape == weight.shape else low.T  # Conv1D: (in, out)
            out.append(deltas)
        return out

    @torch.no_grad()
    def _fits(self, probe, data, fit, cands, directions) -> tuple[list, list]:
        """(value, R^2) per candidate at the probe's current state along its direction."""
        probe.eval()
        tensors = dict(probe.named_parameters())
        tensors.update({canonical_name(n): p for n, p in list(tensors.items())})  # BitFit, LayerNorm by their names

        def loss() -> float:
            return float(np.mean([float(data.loss(probe, b)) for b in fit]))

        base = loss()
        values, r2s = [], []
        for cand, deltas in zip(cands, directions):
            targets = {n: tensors[n] for n in deltas}
            kept = {n: t.detach().clone() for n, t in targets.items()}
            losses = []
            for rho in SCALES:
                if rho == 0:
                    losses.append(base)
                    continue
                for n, d in deltas.items():
                    targets[n].copy_(kept[n] + rho * d)
                losses.append(loss())
            for n, t in targets.items():
                t.copy_(kept[n])
            value, r2 = quadratic_value(SCALES, losses, self.min_r2)
            values.append(value)
            r2s.append(r2)
        return values, r2s

    def select(self, model, scores, budget: int, generator: torch.Generator) -> Selection:
        cands = families(model, self.ranks)
        values = [float(v) for v in scores["family.value"]]
        costs = [int(c) for c in scores["family.cost"]]
        front, exact = pareto_front(values, costs, [f.klass for f in cands], self.max_front)
        point = best_under(front, budget)
        chosen = [cands[i] for i in point.items]
        self._lora = {f.klass.split(":", 1)[1]: f.rank for f in chosen if f.kind == "lora"}
        full = {n for f in chosen if f.kind != "lora" for n in f.targets}
        return Selection(full=full, notes={
            "front_exact": exact, "front_points": len(front), "predicted_loss_decrease": point.value,
            "families_chosen": [f.name for f in chosen], "spent": point.weight, "budget": budget,
            "spent_share": point.weight / budget if budget else None,
            "values": {f.name: v for f, v in zip(cands, values)},
            "r2": {f.name: float(r) for f, r in zip(cands, scores["family.r2"])},
            "front": [[p.weight, p.value] for p in front][:1000]})

    def apply(self, model, selection: Selection):
        from peft import inject_adapter_in_model

        from peftbench.api import layout

        model = super().apply(model, selection)  # BitFit / LayerNorm entries and the head
        if self._lora:
            head = set(head_parameters(model))
            model = inject_adapter_in_model(_lora_config(self._lora, layout(model).block), model)
            for name, p in model.named_parameters():  # peft leaves only its adapters trainable
                p.requires_grad_("lora_" in name or canonical_name(name) in selection.full | head)
        return model

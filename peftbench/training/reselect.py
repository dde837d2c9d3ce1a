"""Masks re-selected during training: SPEFT's dynamic masks (`TrainConfig.reselect_every`).

SPEFT (Liu et al., ACL 2025; 0-ml/speft `update_linear_sparse`, `--sparse_mask_update_steps`)
re-scores the model every N steps at its current weights and trains the new top-k. Its layers
merge the learned delta into the weight first, so an entry dropped from the mask keeps what it
learned: after R re-selections up to (R + 1) k entries differ from the pre-trained model. Under
peftbench's one count (entries that may differ from theta0) that spends more than the budget, so
here a re-selection keeps the budget instead: entries the new mask keeps keep their learned
values, entries it drops return to theta0 exactly, entries it adds start at theta0. That is our
reading, and the one departure from the reference.

How, without new optimizer parameters mid-run: `prepare` puts every tensor the method scores
under a `SparseDelta` (with no entry where nothing is selected); a re-selection merges each delta
into its tensor (`merged`: the model as `score` reads it at the first selection, plain parameters
under their pre-trained names, at theta0 + delta), scores and selects through the runner's checks,
restores theta0 exactly and moves each delta's entries in place (`reassign`). The AdamW moments
of every delta start again at the re-selection (a fresh optimizer for the new mask; SPEFT's
launcher is not in its release, so this too is our choice); the learning-rate schedule goes on.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.nn.utils import parametrize

from peftbench.contract.selector import Selector, validate_selection
from peftbench.core.errors import UsageError
from peftbench.modeling.models import pretrained_parameters
from peftbench.modeling.selection import Selection
from peftbench.modeling.sparse import SparseDelta, apply_selection
from peftbench.training.checks import checked_score, checked_select, state_digests

#: hooks that make a method change form on its own during training: such a method is not re-selected
_HOOKS = ("begin_training", "before_step", "loss_term", "after_backward", "after_step", "phases",
          "learning_rates")


def check_reselectable(selector: Selector, method: str) -> None:
    """Refuse, naming why, a method whose mask cannot be chosen again by `score` and `select`:
    one that re-parametrises the model (its own `apply`), changes form by its own training
    hooks, or has no budget to keep (a natural count, a budget held in expectation)."""
    cls = type(selector)
    why = None
    if cls.apply is not Selector.apply:
        why = "it builds its own model (apply is overridden), so there is no mask of entries to move"
    elif hooked := [h for h in _HOOKS if getattr(cls, h) is not getattr(Selector, h)]:
        why = f"it changes form during training by its own hooks ({', '.join(hooked)})"
    elif not cls.uses_budget or cls.budget_in_expectation:
        why = "it has no budget to keep (a natural count, or a budget held in expectation)"
    if why:
        raise UsageError(f"train.reselect_every: method {method!r} cannot re-select its mask: {why}; "
                         "dynamic masks take a method that scores and selects entries (reselect_every: 0 "
                         "keeps the mask static)")


def _partial(selection: Selection, numels: dict[str, int]) -> dict[str, torch.Tensor]:
    """The selection as flat indices per tensor (a whole tensor as all of its entries)."""
    out = {n: torch.arange(numels[n]) for n in selection.full}
    out.update({n: idx.to(torch.long) for n, idx in selection.partial.items()})
    return out


def _scored(scores, method: str) -> dict:
    """The scores a (re-)selection reads; a method that scores nothing is refused by name."""
    if scores is None:
        raise UsageError(f"train.reselect_every: method {method!r} scores nothing (score returned "
                         "None), so there is nothing to re-select by")
    return scores


def prepare(model, selection: Selection, scores, numels: dict[str, int], method: str):
    """`apply_selection` with every tensor the method scores under a SparseDelta, an empty one
    where nothing is selected, so that a re-selection only moves entries."""
    candidates = sorted(_scored(scores, method))
    chosen = _partial(selection, numels)
    outside = sorted(set(chosen) - set(candidates))
    if outside:
        raise UsageError(f"train.reselect_every: the selection trains {outside[0]!r}, which the "
                         "method's scores do not cover: a re-selection could not choose it again")
    empty = torch.empty(0, dtype=torch.long)
    return apply_selection(model, Selection(partial={n: chosen.get(n, empty) for n in candidates}))


def sparse_deltas(model) -> dict[str, tuple]:
    """{pre-trained tensor name: (module, attribute, SparseDelta)} for every sparse delta."""
    found = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            if len(plist) == 1 and isinstance(plist[0], SparseDelta):
                found[f"{name}.{attr}" if name else attr] = (module, attr, plist[0])
    return found


@contextlib.contextmanager
def merged(model):
    """Inside: every sparse delta merged into its tensor (theta0 + delta, the values the forward
    pass uses), the tensors plain parameters again with `requires_grad`, as a fresh model is
    scored; on exit each tensor is theta0 again, bit for bit (written back from the delta's
    `base_values`), under its delta, frozen, and no gradient is left on the model."""
    held = []
    with torch.no_grad():
        for module, attr, delta in sparse_deltas(model).values():
            original = module.parametrizations[attr].original
            flat = original.data.view(-1)
            flat[delta.indices] = delta.base_values.to(flat.dtype) + delta.values.detach().to(flat.dtype)
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            held.append((module, attr, delta, original))
    params = pretrained_parameters(model)
    requires = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(requires[n])
        with torch.no_grad():
            for module, attr, delta, original in held:
                original.data.view(-1)[delta.indices] = delta.base_values.to(original.dtype)
                parametrize.register_parametrization(module, attr, delta, unsafe=True)
                module.parametrizations[attr].original.requires_grad_(False)
        model.zero_grad(set_to_none=True)


@torch.no_grad()
def reassign(delta: SparseDelta, base: torch.Tensor, indices: torch.Tensor) -> int:
    """Move `delta` to `indices`: an entry it keeps keeps its value, a new one starts at 0
    (theta0), a dropped one is theta0 again. `values` becomes a new parameter (autograd fixes a
    leaf's shape when it first differentiates it, so a resized one would be refused); the
    caller swaps it into the optimizer. `base`: the tensor's theta0. Returns how many entries
    it kept."""
    indices = torch.sort(indices.to(torch.long).to(delta.indices.device)).values
    old, values = delta.indices, delta.values
    carried = torch.zeros(len(indices), dtype=values.dtype, device=values.device)
    kept = 0
    if len(old) and len(indices):
        ordered, order = torch.sort(old)
        at = torch.searchsorted(ordered, indices).clamp(max=len(old) - 1)
        hit = ordered[at] == indices
        carried[hit] = values.data[order[at[hit]]]
        kept = int(hit.sum())
    delta.indices = indices
    delta.base_values = base.detach().reshape(-1)[indices].float()
    delta.values = torch.nn.Parameter(carried)
    delta._pattern = None
    return kept


def swap_parameter(optimizer, params: list, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """`new` in `old`'s place in the optimizer's group (its moments dropped: a fresh start) and
    in the trainer's list of parameters."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    optimizer.state.pop(old, None)
    params[:] = [new if p is old else p for p in params]


class Reselection:
    """Re-selects a run's mask every `every` steps (`TrainConfig.reselect_every`): called by the
    trainer after a step; holds what the first selection used (the method, its scoring data,
    the budget) so that each re-selection is the first one again at the current weights."""

    def __init__(self, selector: Selector, method: str, data, k: int, bound: int | None,
                 numels: dict[str, int], seed: int, every: int):
        self.selector, self.method, self.data, self.k, self.bound = selector, method, data, k, bound
        self.numels, self.seed, self.every = numels, seed, every

    def due(self, step: int, total: int) -> bool:
        """After `step` steps of `total`: a re-selection every `every` steps, none after the last."""
        return step % self.every == 0 and step < total

    def __call__(self, model, optimizer, params: list, step: int) -> dict:
        """Choose the mask again after `step` steps; `params` (the trainer's list of trainable
        parameters) and the optimizer get the deltas' new `values`."""
        start = time.perf_counter()
        deltas = sparse_deltas(model)
        with merged(model):
            current = state_digests(model)
            scores = _scored(checked_score(self.selector, self.method, model, self.data), self.method)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # ties: seeded per step
            selection = checked_select(self.selector, self.method, model, scores, self.k, generator, current)
        count = validate_selection(self.method, selection, self.numels, self.bound)
        chosen = _partial(selection, self.numels)
        outside = sorted(set(chosen) - set(deltas))
        if outside:
            raise UsageError(f"train.reselect_every: method {self.method!r} chose {outside[0]!r} at step "
                             f"{step}, a tensor its first scores did not cover")
        empty = torch.empty(0, dtype=torch.long)
        kept = 0
        for name, (module, attr, delta) in deltas.items():
            old = delta.values
            kept += reassign(delta, module.parametrizations[attr].original, chosen.get(name, empty))
            swap_parameter(optimizer, params, old, delta.values)
        model.train()
        return {"step": step, "entries": count, "kept": kept, "seconds": time.perf_counter() - start}

    @staticmethod
    def snapshot(model) -> dict:
        """Every trainable parameter and every delta's entries: a checkpoint of a moving mask."""
        deltas = {id(d.values): n for n, (_, _, d) in sparse_deltas(model).items()}
        return {"params": {n: p.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and id(p) not in deltas},
                "masks": {n: (d.indices.clone(), d.base_values.clone(), d.values.detach().clone())
                          for n, (_, _, d) in sparse_deltas(model).items()}}

    @staticmethod
    @torch.no_grad()
    def restore(model, saved: dict) -> None:
        """Back to a `snapshot`: the masks it had and the values it held (for testing: the
        model trains no further)."""
        for name, (_, _, delta) in sparse_deltas(model).items():
            indices, base_values, values = saved["masks"][name]
            delta.indices, delta.base_values = indices, base_values
            delta.values = torch.nn.Parameter(values)
            delta._pattern = None
        params = dict(model.named_parameters())
        for name, value in saved["params"].items():
            params[name].copy_(value)

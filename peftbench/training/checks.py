"""The runner's checks around a method's calls: `score` and `select` must leave the model as they
found it, the trainable count must keep to the budget, frozen entries must stay at theta0."""

from __future__ import annotations

import hashlib

import torch

from peftbench.contract.selector import check_scores
from peftbench.core.errors import UsageError
from peftbench.modeling.sparse import count_trainable


def state_digests(model) -> dict[str, str]:
    """SHA-256 of every parameter and buffer's bytes: an exact, copy-free record of the model
    (about a second per 100M entries on a CPU core)."""
    import hashlib

    out = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


def hooks(model) -> int:
    """How many hooks the model's modules and parameters carry: a hook left by score() or
    select() would change every forward (and backward) of training and evaluation."""
    found = 0
    for module in model.modules():
        found += sum(len(getattr(module, kind, {}) or {}) for kind in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
    found += sum(len(p._backward_hooks or {}) for p in model.parameters() if hasattr(p, "_backward_hooks"))
    return found


def _unchanged(method: str, phase: str, model, before: dict, hooks_before: int) -> None:
    moved = [n for n, d in state_digests(model).items() if before.get(n) != d]
    if moved:
        raise UsageError(f"method {method!r} changed the model in {phase}() ({len(moved)} tensors, "
                         f"e.g. {moved[0]}): {phase} must leave every parameter and buffer at its "
                         "pre-trained value (the Selector contract); a scoring phase that trains goes "
                         "through peftbench.api.scoring_session, which restores them")
    left = hooks(model) - hooks_before
    if left:
        raise UsageError(f"method {method!r} left {left} hook(s) on the model in {phase}(): every hook "
                         "registered while scoring or selecting must be removed before returning "
                         "(handle.remove()); training and evaluation would run through it")


def call_score(selector, method: str, model, data):
    """`selector.score(model, data)`; a method that reads its data without `needs_data` (the
    runner then hands it None) is told to set it, instead of an AttributeError on None."""
    try:
        return selector.score(model, data)
    except AttributeError as err:
        if data is None and "'NoneType' object has no attribute" in str(err):
            raise UsageError(f"method {method!r}: score() read its training data ({err}), but the "
                             "class does not set needs_data = True, so it got None: set "
                             "needs_data = True on the class") from None
        raise


def checked_score(selector, method: str, model, data):
    """`selector.score`, then a check that it left every parameter and buffer as it found them
    and no hook behind: the model scored is the model trained next, so a `score` that moved
    weights (say, a short fine-tuning it forgot to undo) would be trained from there while its
    count says otherwise."""
    before, hooked = state_digests(model), hooks(model)
    scores = call_score(selector, method, model, data)
    check_scores(method, scores)
    _unchanged(method, "score", model, before, hooked)
    return scores


def checked_select(selector, method: str, model, scores, k: int, generator, before: dict[str, str]):
    """`selector.select`, held to what `checked_score` holds score to; `before`: the model's
    `state_digests` just before (the run's theta0, taken once)."""
    hooked = hooks(model)
    selection = selector.select(model, scores, k, generator)
    _unchanged(method, "select", model, before, hooked)
    return selection


def check_count(method: str, model, pretrained: set[str], head: set[str], bound: int | None) -> None:
    """After training: the entries that can differ from the pre-trained model, counted from the
    model (what trains and what parametrisations declare, `modeling.sparse.count_trainable`), never from
    the method's own account, within the budget. Checked on the trained model, not after
    apply(): DiffPruning trains every entry until its projection, by design."""
    counts = count_trainable(model, pretrained, head)
    if bound is not None and counts["trainable"] > bound:
        raise UsageError(f"method {method!r} left {counts['trainable']:,} entries trainable after training "
                         f"({counts['encoder']:,} pre-trained, {counts['new']:,} new), over the budget of "
                         f"{bound:,}: apply must train what select chose (the Selector contract)")


def check_frozen(method: str, model, pretrained: set[str], theta0: dict[str, str]) -> None:
    """After training: every pre-trained tensor that is frozen (a parameter that does not train,
    the frozen original under a sparse delta, peft's frozen base weight) is bit-identical to its
    pre-trained value. A hook that moved one (an `after_step` writing weights, weight decay on
    frozen entries) fails the run instead of training entries its count does not hold."""
    from peftbench.modeling.sparse import canonical_name

    moved = []
    for name, param in model.named_parameters():
        tensor = canonical_name(name)
        if param.requires_grad or tensor not in pretrained or tensor not in theta0:
            continue
        raw = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if hashlib.sha256(raw.numpy().tobytes()).hexdigest() != theta0[tensor]:
            moved.append(tensor)
    if moved:
        raise UsageError(f"method {method!r} moved {len(moved)} frozen pre-trained tensor(s) during training "
                         f"(e.g. {moved[0]}): a frozen entry must stay bit-identical to its pre-trained "
                         "value (the Selector contract); train it through the selection instead")

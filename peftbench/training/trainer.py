"""Fine-tuning under a selection: AdamW, linear warm-up/decay, gradient clipping, seeded.

Only parameters with `requires_grad` reach the optimizer, so frozen entries hold no optimizer
state and memory grows with the trainable count (see `peftbench.modeling.sparse`). The step does the
minimum: forward, loss, backward, clip, step, and the selector's hooks only if it has any.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from peftbench.contract.selector import Selector
from peftbench.contract.settings import TrainConfig
from peftbench.core.errors import UsageError
from peftbench.data.encode import Collator
from peftbench.data.spec import TaskSpec
from peftbench.modeling.compute import autocast, forward, loss_fn
from peftbench.modeling.models import head_parameters
from peftbench.training.evaluation import evaluate


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "auto, cpu" + (", cuda, cuda:N" if torch.cuda.is_available() else "")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} is not available here: allowed {allowed}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(f"device {device!r} is unknown: allowed {allowed}") from None
    if resolved.type not in ("cpu", "cuda"):  # mps, meta, xla...: paths never tested here
        raise UsageError(f"device {device!r} is not supported: allowed {allowed}")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved


def warmup_steps(ratio: float, steps: int) -> int:
    """ceil(ratio * steps) warm-up steps, at most steps - 1 (the last step runs at full rate)."""
    return min(math.ceil(ratio * steps), max(steps - 1, 0))


def optimizer_and_schedule(model, selector: Selector, decay: list, no_decay: list, config: TrainConfig,
                           edges: list[int]):
    """AdamW and its schedule. Groups: with and without weight decay, each split by the rates
    the method gives its parameters in each phase (`Selector.learning_rates`; then
    `config.head_lr` for the head, if set; the run's lr for the rest). Schedule: linear warm-up
    then linear decay to 0 within each phase [edges[i], edges[i+1]), times the group's rate in
    that phase. One phase and no rates is HF's
    `get_linear_schedule_with_warmup`; a method that changes form mid-run (`Selector.phases`)
    starts its next phase with its own warm-up, as DiffPruning's authors fine-tune the fixed
    mask after the projection."""
    from torch.optim.lr_scheduler import LambdaLR

    named = {id(p): n for n, p in model.named_parameters()}
    spans = [(a, b, warmup_steps(config.warmup_ratio, b - a)) for a, b in zip(edges, edges[1:])]
    per_phase = [selector.learning_rates(model, config.lr, i) for i in range(len(spans))]
    for rates in per_phase:
        unknown = set(rates) - set(named.values())
        bad = {n: r for n, r in rates.items() if not (math.isfinite(r) and r > 0)}
        if unknown or bad:
            raise UsageError(f"{type(selector).__name__}.learning_rates: "
                             + (f"names parameters the model does not have: {sorted(unknown)[:3]}" if unknown
                                else f"rates must be positive and finite: {dict(list(bad.items())[:3])}"))
    head = set(head_parameters(model)) if config.head_lr is not None else set()
    groups, keys = [], []
    for members, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
        by_rates: dict[tuple, list] = {}
        for p in members:
            name = named.get(id(p))
            own = config.head_lr if name in head else config.lr
            by_rates.setdefault(tuple(float(r.get(name, own)) for r in per_phase), []).append(p)
        for key, ps in by_rates.items():
            groups.append({"params": ps, "weight_decay": wd, "lr": key[0]})
            keys.append(key)
    optimizer = torch.optim.AdamW(groups or [{"params": []}], lr=config.lr)

    def phase(step: int) -> int:
        return next((i for i, (_, b, _) in enumerate(spans) if step < b), len(spans) - 1)

    def factor(step: int) -> float:
        a, b, warm = spans[phase(step)]
        local, length = step - a, b - a
        if local < warm:
            return float(local) / float(max(1, warm))
        return max(0.0, float(length - local) / float(max(1, length - warm)))

    def lam(key: tuple):
        return lambda step: factor(step) * (key[phase(step)] / key[0])

    scheduler = LambdaLR(optimizer, [lam(k) for k in keys] or [factor])
    scheduler.factor = factor  # the run's own rate is config.lr * factor(step)
    return optimizer, scheduler


def make_loader(dataset, tokenizer, task, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=Collator(tokenizer, task))


def _overrides(selector: Selector, hook: str) -> bool:
    return getattr(type(selector), hook) is not getattr(Selector, hook)


def train(model, selector: Selector, task: TaskSpec, splits, tokenizer, config: TrainConfig,
          seed: int, device: torch.device, run_dir: Path, progress: bool = True,
          on_epoch=None, reselect=None) -> dict:
    """Train the trainable parameters of `model`; evaluate on validation after each epoch, keep
    the best-validation trainable state, and report its validation and test metrics.

    Randomness: the global generators are re-seeded from `seed` here, so dropout and every
    other draw during training are the same whether or how scoring ran (a score-cache hit skips
    scoring, which would otherwise leave the stream elsewhere).

    Only epochs after which `selector.checkpoint_ready(step)` holds may be chosen as the
    checkpoint (DiffPruning: after its projection), so the model tested is one that was validated.

    A non-finite training loss stops the seed: the result carries `diverged` = {step, loss} and
    NaN metrics, never the metrics of a broken model. The check reads the loss every 10 steps
    (where the progress bar reads it anyway) and at the end of each epoch, not every step.

    `reselect` (a `peftbench.training.reselect.Reselection`, with `config.reselect_every`)
    chooses the mask again after every `reselect_every` steps; the checkpoint then keeps the
    mask with the values (`reselections` in the result: step, entries, kept, seconds).

    `on_epoch(epoch, validation_main)` is called after each epoch's evaluation (a sweep's pruner
    reports there and may raise `optuna.TrialPruned`).

    Per-epoch metrics are appended to `run_dir/metrics.jsonl` as they come, so a crash loses
    nothing already measured.

    Cost, returned beside the metrics: `train_time_s` (evaluation included), `steps_per_s` (the
    training loop alone) and `peak_memory` of this call (`peftbench.training.memory`: peak RSS on CPU,
    max allocated on CUDA, the model and evaluation included).
    """
    from peftbench.modeling.sparse import decay_plan
    from peftbench.training import memory

    memory_reset = memory.reset_peak(device)
    set_seed(seed)
    model.to(device)
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UsageError(f"gradient_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay, no_decay, deltas = decay_plan(model)
    train_loader = make_loader(splits["train"], tokenizer, task, config.batch_size, True, seed)
    val_loader = make_loader(splits["validation"], tokenizer, task, config.eval_batch_size, False, seed)
    test_loader = make_loader(splits["test"], tokenizer, task, config.eval_batch_size, False, seed)
    steps = config.epochs * len(train_loader)
    if config.max_steps:
        steps = min(steps, config.max_steps)
    params = [p for _, p in trainable]
    selector.begin_training(model, steps)
    boundaries = sorted({b for b in selector.phases(steps) if 0 < b < steps})
    optimizer, scheduler = optimizer_and_schedule(model, selector, decay, no_decay, config,
                                                  [0, *boundaries, steps])
    phases = []
    extra_loss = _overrides(selector, "loss_term")
    after_backward = _overrides(selector, "after_backward")
    before_step = _overrides(selector, "before_step")
    after_step = _overrides(selector, "after_step")
    decay_deltas = deltas if config.weight_decay else []

    best, best_val, best_state, best_epoch, history, step = -math.inf, None, None, None, [], 0
    reselections = []
    diverged = None
    bar = tqdm(total=steps, desc=f"train seed {seed}", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    step_time = 0.0  # the training loop alone, evaluation left out: steps per second
    for epoch in range(config.epochs):
        model.train()
        losses = []
        loop_start = time.perf_counter()
        for batch in train_loader:
            if step >= steps:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, config.bf16):
                loss = loss_fn(forward(model, batch, task), batch["labels"], task)
                if extra_loss:
                    term = selector.loss_term(model, step)
                    loss = loss if term is None else loss + term
            loss.backward()
            if after_backward:
                selector.after_backward(model, step)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if before_step:
                selector.before_step(model, step)
            if decay_deltas:  # the sparse entries' decay towards 0 (see peftbench.modeling.sparse)
                amount = config.lr * scheduler.factor(scheduler.last_epoch) * config.weight_decay
                for delta in decay_deltas:
                    delta.decay_(amount)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step + 1 in boundaries:  # validation on both sides of the method's change of form
                before = evaluate(model, val_loader, task, device, config=config)
            if after_step:
                selector.after_step(model, step)
            if step + 1 in boundaries:
                phases.append({"step": step + 1, "validation_before": before,
                               "validation_after": evaluate(model, val_loader, task, device, config=config)})
                model.train()
            step += 1
            if reselect is not None and reselect.due(step, steps):
                reselections.append(reselect(model, optimizer, params, step))
            losses.append(loss.detach())
            if step % 10 == 0:
                value = losses[-1].item()
                if not math.isfinite(value):
                    break
                bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
        step_time += time.perf_counter() - loop_start
        step_losses = torch.stack(losses).float().cpu().tolist() if losses else []
        bad = next((i for i, v in enumerate(step_losses) if not math.isfinite(v)), None)
        if bad is not None:
            diverged = {"step": step - len(step_losses) + bad + 1, "loss": step_losses[bad]}
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"epoch": epoch + 1, "step": step, "diverged": diverged,
                                     "step_losses": step_losses}) + "\n")
            break
        val = evaluate(model, val_loader, task, device, config=config)
        ready = selector.checkpoint_ready(step)
        record = {"epoch": epoch + 1, "step": step,
                  "train_loss": float(np.mean(step_losses)) if losses else float("nan"),
                  "validation": val, "checkpoint_ready": ready,
                  "elapsed_s": time.perf_counter() - start, "step_losses": step_losses}
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if ready and val["main"] > best:
            best, best_val, best_epoch = val["main"], val, epoch + 1
            best_state = reselect.snapshot(model) if reselect is not None else \
                [p.detach().clone() for p in params]
        if on_epoch is not None:
            on_epoch(epoch + 1, val["main"])
        if step >= steps:
            break
    bar.close()
    train_time = time.perf_counter() - start
    common = {"steps": step, "train_time_s": train_time, "step_time_s": step_time, "phases": phases,
              "reselections": reselections if reselect is not None else None,
              "steps_per_s": step / step_time if step_time > 0 else float("nan"),
              "peak_memory": memory.peak(device, memory_reset), "config": asdict(config)}
    if diverged is not None:
        nan = {name: float("nan") for name in [*task.metrics, "main"]}
        return {"validation": nan, "test": dict(nan), "best_epoch": None, "diverged": diverged,
                **common}
    if best_state is None:
        raise RuntimeError(f"no epoch ended with {type(selector).__name__} in its final form "
                           "(checkpoint_ready was never true): nothing valid to test")
    if reselect is not None:
        reselect.restore(model, best_state)
    else:
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    test, predictions = evaluate(model, test_loader, task, device, keep=True, config=config)
    return {"validation": best_val, "test": test, "test_predictions": predictions,
            "best_epoch": best_epoch, **common}


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)
    np.random.seed(seed)

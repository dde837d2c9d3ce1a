"""Fine-tuning under a selection: AdamW, linear warm-up/decay, gradient clipping, seeded.

Only parameters with `requires_grad` reach the optimizer, so frozen entries hold no optimizer
state and memory grows with the trainable count (see `peftbench.sparse`). The step does the
minimum: forward, loss, backward, clip, step, and the selector's hooks only if it has any.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import (ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt,
                      ValidationError)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from peftbench import metrics
from peftbench.data import Collator, TaskSpec
from peftbench.errors import UsageError
from peftbench.selector import Selector


@pydantic_dataclass(config=ConfigDict(strict=True, allow_inf_nan=False))
class TrainConfig:
    """Training settings, validated on construction (strict types, finite positive values):
    build one from user input with `train_config`, which names the bad key."""

    epochs: PositiveInt = 3
    batch_size: PositiveInt = 16
    eval_batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-4  # Fu et al.'s learning rate, for every method
    weight_decay: NonNegativeFloat = 0.01  # not on biases and LayerNorm, as Fu et al.
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_grad_norm: PositiveFloat = 1.0
    max_length: PositiveInt = 128
    max_steps: PositiveInt | None = None  # stop early (quick runs, tests)
    # recompute activations in the backward instead of keeping them (transformers'
    # gradient_checkpointing_enable, non-reentrant): less memory for large models, same numbers
    gradient_checkpointing: bool = False
    # compute under bfloat16 autocast on CPU as well (CUDA always does; master weights stay
    # float32): a faster step where the CPU has bf16 arithmetic, and other numbers, so a board
    # that wants it declares it in its spec's `train:`
    bf16: bool = False
    # "length": evaluation batches made of rows of similar length (less padding, fewer tokens;
    # the predictions are put back in the split's order). Padding changes the last bits of a
    # row's logits, so this too is a declared setting, not a silent speed-up
    eval_order: Literal["given", "length"] = "given"


#: settings that cannot change a number: a cell's fingerprint leaves them out (`sweep.cell_config`)
NUMERICALLY_NEUTRAL = ("gradient_checkpointing",)
#: settings added after cells were committed: at these values they are left out of a cell's
#: fingerprint, so a cell fingerprinted before the setting existed stays current
OMITTED_AT = {"bf16": False, "eval_order": "given"}


def fingerprinted(train: dict) -> dict:
    """The training settings that enter a cell's fingerprint (`train`: TrainConfig's fields)."""
    return {k: v for k, v in train.items()
            if k not in NUMERICALLY_NEUTRAL and not (k in OMITTED_AT and v == OMITTED_AT[k])}


def train_config(values: dict, where: str = "train", base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from user values (over `base`'s), or a UsageError naming the key, the
    value, what was wrong and the allowed settings."""
    allowed = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown train settings {unknown}; allowed: {sorted(allowed)}")
    try:
        return TrainConfig(**{**(asdict(base) if base else {}), **values})
    except ValidationError as err:
        problem = err.errors()[0]
        key = ".".join(str(x) for x in problem["loc"])
        raise UsageError(f"{where}.{key} = {problem.get('input')!r}: {problem['msg']}") from None


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


def _autocast(device: torch.device, bf16: bool = False):
    """bfloat16 autocast on CUDA always, on CPU with the `bf16` setting; float32 otherwise."""
    if device.type == "cuda" or bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _eval_batches(loader: DataLoader, by_length: bool):
    """(row indices, collated batch) over a split: the loader's own batches, or with `by_length`
    batches of rows sorted by token count (stable), so little of each batch is padding."""
    if not by_length:
        start = 0
        for batch in loader:
            n = len(batch["labels"]) if "labels" in batch else len(batch["input_ids"])
            yield list(range(start, start + n)), batch
            start += n
        return
    rows = loader.dataset
    lengths = [_row_length(rows[i]["input_ids"]) for i in range(len(rows))]
    order = sorted(range(len(rows)), key=lengths.__getitem__)
    for start in range(0, len(order), loader.batch_size):
        chunk = order[start:start + loader.batch_size]
        yield chunk, loader.collate_fn([rows[i] for i in chunk])


def _row_length(ids) -> int:
    return max((len(x) for x in ids), default=0) if ids and isinstance(ids[0], list) else len(ids)


def _in_split_order(parts: list, indices: list[int]):
    """The rows' outputs (concatenated in evaluation order) put back in the split's order."""
    out = torch.cat(parts)
    if indices == list(range(len(indices))):
        return out
    restored = torch.empty_like(out)
    restored[torch.tensor(indices)] = out
    return restored


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


def warmup_steps(ratio: float, steps: int) -> int:
    """ceil(ratio * steps) warm-up steps, at most steps - 1 (the last step runs at full rate)."""
    return min(math.ceil(ratio * steps), max(steps - 1, 0))


def optimizer_and_schedule(model, selector: Selector, decay: list, no_decay: list, config: TrainConfig,
                           edges: list[int]):
    """AdamW and its schedule. Groups: with and without weight decay, each split by the rates
    the method gives its parameters in each phase (`Selector.learning_rates`; the run's lr for
    the rest). Schedule: linear warm-up then linear decay to 0 within each phase
    [edges[i], edges[i+1]), times the group's rate in that phase. One phase and no rates is HF's
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
    groups, keys = [], []
    for members, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
        by_rates: dict[tuple, list] = {}
        for p in members:
            name = named.get(id(p))
            by_rates.setdefault(tuple(float(r.get(name, config.lr)) for r in per_phase), []).append(p)
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


def _float32_text(values: np.ndarray) -> list[float]:
    """Scores as the shortest decimals that read back as the same float32 (at most 9 digits): a
    compact result file from which the metric is recomputed exactly (as float32)."""
    return [float(np.format_float_positional(np.float32(v), unique=True)) for v in np.ravel(values)]


@torch.no_grad()
def evaluate(model, loader: DataLoader, task: TaskSpec, device: torch.device, keep: bool = False,
             config: TrainConfig | None = None):
    """The split's metrics; with `keep`, also its per-example predictions and labels (a dict
    as `record.Predictions`), in the split's order: (metrics, predictions). `config`: the run's
    `bf16` and `eval_order` settings (defaults when None)."""
    config = config or TrainConfig()
    if task.kind == "causal_lm":
        return evaluate_causal(model, loader, task, device, keep, config)
    model.eval()
    preds, labels, seen = [], [], []
    with torch.nn.utils.parametrize.cached(), _autocast(device, config.bf16):
        for indices, batch in _eval_batches(loader, config.eval_order == "length"):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = forward(model, batch, task).float()
            preds.append((logits if task.kind == "regression" else logits.argmax(-1)).cpu())
            labels.append(batch["labels"].cpu())
            seen += indices
    p, y = _in_split_order(preds, seen).numpy(), _in_split_order(labels, seen).numpy()
    scores = metrics.compute(task.metrics, task.main_metric, p, y, task.num_classes)
    if not keep:
        return scores
    regression = task.kind == "regression"
    kept = {"predictions": _float32_text(p) if regression else [int(v) for v in p],
            "labels": _float32_text(y) if regression else [int(v) for v in y],
            "num_classes": task.num_classes}
    return scores, kept


@torch.no_grad()
def evaluate_causal(model, loader: DataLoader, task: TaskSpec, device: torch.device, keep: bool = False,
                    config: TrainConfig | None = None):
    """A causal-LM split: `answer_loglik`, each gold answer's mean per-token log-likelihood
    given its prompt (teacher-forced, the loader's batches), and `exact_match`, the greedy
    continuation of each prompt (`task.max_new_tokens` tokens, prompts left-padded) after
    `task.extract_answer` against the extracted gold answer."""
    model.eval()
    collate = loader.collate_fn
    tokenizer = collate.tokenizer
    rows = loader.dataset
    config = config or TrainConfig()
    order = list(range(len(rows)))
    if config.eval_order == "length":
        order.sort(key=lambda i: len(rows[i]["input_ids"]))
    logliks, generated = [None] * len(rows), [None] * len(rows)
    with torch.nn.utils.parametrize.cached(), _autocast(device, config.bf16):
        for start in range(0, len(rows), loader.batch_size):
            indices = order[start:start + loader.batch_size]
            chunk = [rows[i] for i in indices]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            logits = forward(model, batch, task).float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            target = batch["labels"][:, 1:]
            mask = target != -100
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            for i, value in zip(indices, (picked.sum(-1) / mask.sum(-1).clamp(min=1)).tolist()):
                logliks[i] = value
            prompts = [{"input_ids": r["input_ids"][:r["prompt_length"]],
                        "attention_mask": r["attention_mask"][:r["prompt_length"]]} for r in chunk]
            enc = {k: v.to(device) for k, v in
                   tokenizer.pad(prompts, return_tensors="pt", padding_side="left").items()}
            out = model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(indices, texts):
                generated[i] = text
    predictions = {"exact_match": [task.extract_answer(text) for text in generated],
                   "answer_loglik": logliks}
    scores = metrics.compute(task.metrics, task.main_metric, predictions, list(rows["gold"]))
    if not keep:
        return scores
    return scores, {"predictions": predictions, "labels": [str(g) for g in rows["gold"]], "num_classes": None}


def _overrides(selector: Selector, hook: str) -> bool:
    return getattr(type(selector), hook) is not getattr(Selector, hook)


def train(model, selector: Selector, task: TaskSpec, splits, tokenizer, config: TrainConfig,
          seed: int, device: torch.device, run_dir: Path, progress: bool = True,
          on_epoch=None) -> dict:
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

    `on_epoch(epoch, validation_main)` is called after each epoch's evaluation (a sweep's pruner
    reports there and may raise `optuna.TrialPruned`).

    Per-epoch metrics are appended to `run_dir/metrics.jsonl` as they come, so a crash loses
    nothing already measured.

    Cost, returned beside the metrics: `train_time_s` (evaluation included), `steps_per_s` (the
    training loop alone) and `peak_memory` of this call (`peftbench.memory`: peak RSS on CPU,
    max allocated on CUDA, the model and evaluation included).
    """
    from peftbench import memory
    from peftbench.sparse import decay_plan

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
            with _autocast(device, config.bf16):
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
            if decay_deltas:  # the sparse entries' decay towards 0 (see peftbench.sparse)
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
            best_state = [p.detach().clone() for p in params]
        if on_epoch is not None:
            on_epoch(epoch + 1, val["main"])
        if step >= steps:
            break
    bar.close()
    train_time = time.perf_counter() - start
    common = {"steps": step, "train_time_s": train_time, "step_time_s": step_time, "phases": phases,
              "steps_per_s": step / step_time if step_time > 0 else float("nan"),
              "peak_memory": memory.peak(device, memory_reset), "config": asdict(config)}
    if diverged is not None:
        nan = {name: float("nan") for name in [*task.metrics, "main"]}
        return {"validation": nan, "test": dict(nan), "best_epoch": None, "diverged": diverged,
                **common}
    if best_state is None:
        raise RuntimeError(f"no epoch ended with {type(selector).__name__} in its final form "
                           "(checkpoint_ready was never true): nothing valid to test")
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

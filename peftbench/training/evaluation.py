"""Evaluation: the main metric of a split at a checkpoint, for classification, regression,
multiple choice and causal LM, in the split's order or in batches of similar length."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from peftbench.contract.settings import TrainConfig
from peftbench.data import metrics
from peftbench.data.spec import TaskSpec
from peftbench.modeling.compute import autocast, forward


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


def _float32_text(values: np.ndarray) -> list[float]:
    """Scores as the shortest decimals that read back as the same float32 (at most 9 digits): a
    compact result file from which the metric is recomputed exactly (as float32)."""
    return [float(np.format_float_positional(np.float32(v), unique=True)) for v in np.ravel(values)]


@torch.no_grad()
def evaluate(model, loader: DataLoader, task: TaskSpec, device: torch.device, keep: bool = False,
             config: TrainConfig | None = None):
    """The split's metrics; with `keep`, also its per-example predictions and labels (a dict
    as `training.record.Predictions`), in the split's order: (metrics, predictions). `config`: the run's
    `bf16` and `eval_order` settings (defaults when None)."""
    config = config or TrainConfig()
    if task.kind == "causal_lm":
        return evaluate_causal(model, loader, task, device, keep, config)
    model.eval()
    preds, labels, seen = [], [], []
    with torch.nn.utils.parametrize.cached(), autocast(device, config.bf16):
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
    with torch.nn.utils.parametrize.cached(), autocast(device, config.bf16):
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

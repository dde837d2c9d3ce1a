"""What a run forgets: representation retention, measured on a probe that is no board's task.

The default model (all-MiniLM-L6-v2) is a sentence encoder: its mean-pooled last hidden states
score sentence similarity zero-shot. Fine-tuning on a task moves that representation; how much
it still ranks the probe's pairs as people do, before and after, is the drift a selection
causes, in seconds per run. The probe: SICK-R's 495 TRIAL pairs (relatedness 1-5,
`tasks/data/probe/`), chosen because no committed board trains or tests on SICK, it is small
enough to score at the end of every run, and its pairs are everyday sentences unlike SST-2's and
STS-B's. Statistic: Spearman between the pairs' cosine similarity of mean-pooled last hidden
states (padding left out) and the gold relatedness, as MTEB scores STS.

A causal language model trained through its LM head is scored instead by its held-out
next-token loss on the same probe's sentences (the 990 sentences of its pairs, in sorted order):
mean cross-entropy per predicted token, each sentence on its own row (no padding inside a
sequence), labels shifted by one token as the model's own loss shifts them, "before" on the
base model as loaded (peft's method_comparison, after its PR #3419 fixed both). Everyday
captions, no board's task and unlike any task's prompts: what the model knew of plain English.
Higher is worse, so its `change` (after - before) is positive when the run forgot; the record
says which statistic it holds.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np
import scipy.stats
import torch

PROBE = "sick-r-trial"
STATISTICS = {False: "spearman", True: "next_token_loss"}  # keyed by `causal`
PROBE_FILE = resources.files("peftbench.tasks") / "data" / "probe" / f"{PROBE}.jsonl"  # installed with the tasks


@lru_cache(maxsize=1)
def probe_pairs() -> tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...]]:
    rows = [json.loads(line) for line in PROBE_FILE.read_text().splitlines() if line.strip()]
    return (tuple(r["sentence_a"] for r in rows), tuple(r["sentence_b"] for r in rows),
            tuple(float(r["relatedness"]) for r in rows))


def _order(tokenizer, sentences, by_length: bool, max_length: int) -> list[int]:
    """The order the sentences are batched in: as given, or by token count (less padding)."""
    if not by_length:
        return list(range(len(sentences)))
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]]
    return sorted(range(len(sentences)), key=lengths.__getitem__)


@torch.no_grad()
def _embed(model, tokenizer, sentences, device, batch_size: int, max_length: int,
           by_length: bool = False) -> torch.Tensor:
    order = _order(tokenizer, sentences, by_length, max_length)
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [sentences[i] for i in order[start:start + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    embedded = torch.cat(out)
    restored = torch.empty_like(embedded)
    restored[torch.tensor(order)] = embedded
    return restored


@torch.no_grad()
def next_token_loss(model, tokenizer, sentences, device, batch_size: int, max_length: int,
                    by_length: bool = False) -> float:
    """Mean cross-entropy per predicted token of `sentences` under a causal LM: position t
    predicts token t + 1; padding (on the right, whatever the tokenizer's side) is no label."""
    rows = [ids for ids in tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]
            if len(ids) > 1]
    if by_length:
        rows.sort(key=len)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / count


def retention(model, tokenizer, device, causal: bool = False, batch_size: int = 64,
              max_length: int = 128, bf16: bool = False, by_length: bool = False) -> float:
    """The probe's statistic for `model` as it is now (eval mode, restored after): Spearman of
    mean-pooled cosine against relatedness for an encoder, held-out next-token loss for a causal
    LM trained through its LM head (`causal`). `bf16` and `by_length`: the run's declared
    `bf16` and `eval_order: length` settings (bfloat16 autocast; batches by token count)."""
    a, b, gold = probe_pairs()
    was_training = model.training
    model.eval()
    try:
        with torch.nn.utils.parametrize.cached(), \
                torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            if causal:
                return next_token_loss(model, tokenizer, sorted(set(a + b)), device, batch_size,
                                       max_length, by_length)
            ea = _embed(model, tokenizer, a, device, batch_size, max_length, by_length)
            eb = _embed(model, tokenizer, b, device, batch_size, max_length, by_length)
    finally:
        model.train(was_training)
    cosine = torch.nn.functional.cosine_similarity(ea, eb).numpy()
    return float(scipy.stats.spearmanr(cosine, np.asarray(gold)).statistic)


def record(before: float, after: float, causal: bool = False) -> dict:
    """The run's `forgetting` entry: the probe, its statistic, the score before and after, and
    the change (after - before)."""
    return {"probe": PROBE, "statistic": STATISTICS[causal], "before": before, "after": after,
            "change": after - before}

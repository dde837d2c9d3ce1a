"""What a run forgets: representation retention, measured on a probe that is no board's task.

The default model (all-MiniLM-L6-v2) is a sentence encoder: its mean-pooled last hidden states
score sentence similarity zero-shot. Fine-tuning on a task moves that representation; how much
it still ranks the probe's pairs as people do, before and after, is the drift a selection
causes, in seconds per run. The probe: SICK-R's 495 TRIAL pairs (relatedness 1-5,
`tasks/data/probe/`), chosen because no committed board trains or tests on SICK, it is small
enough to score at the end of every run, and its pairs are everyday sentences unlike SST-2's and
STS-B's. Statistic: Spearman between the pairs' cosine similarity of mean-pooled last hidden
states (padding left out) and the gold relatedness, as MTEB scores STS.

Not measured (None, said in the run's record): a causal language model, whose forgetting is its
held-out next-token loss (a probe of its own, not built yet).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.stats
import torch

PROBE = "sick-r-trial"
PROBE_FILE = Path(__file__).resolve().parents[1] / "tasks" / "data" / "probe" / f"{PROBE}.jsonl"


@lru_cache(maxsize=1)
def probe_pairs() -> tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...]]:
    rows = [json.loads(line) for line in PROBE_FILE.read_text().splitlines() if line.strip()]
    return (tuple(r["sentence_a"] for r in rows), tuple(r["sentence_b"] for r in rows),
            tuple(float(r["relatedness"]) for r in rows))


@torch.no_grad()
def _embed(model, tokenizer, sentences, device, batch_size: int, max_length: int) -> torch.Tensor:
    out = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def retention(model, tokenizer, device, causal: bool = False, batch_size: int = 64,
              max_length: int = 128) -> float | None:
    """The probe's Spearman for `model` as it is now (eval mode, restored after); None for a
    causal language model."""
    if causal:
        return None
    a, b, gold = probe_pairs()
    was_training = model.training
    model.eval()
    try:
        with torch.nn.utils.parametrize.cached():
            ea = _embed(model, tokenizer, a, device, batch_size, max_length)
            eb = _embed(model, tokenizer, b, device, batch_size, max_length)
    finally:
        model.train(was_training)
    cosine = torch.nn.functional.cosine_similarity(ea, eb).numpy()
    return float(scipy.stats.spearmanr(cosine, np.asarray(gold)).statistic)


def record(before: float | None, after: float | None) -> dict | None:
    """The run's `forgetting` entry: the probe, its score before and after, and the change."""
    if before is None or after is None:
        return None
    return {"probe": PROBE, "before": before, "after": after, "change": after - before}

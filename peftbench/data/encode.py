"""Rows to batches: tokenising a task's splits, encoding choices and causal targets, the collator."""

from __future__ import annotations

from peftbench.core.errors import UsageError
from peftbench.data.spec import TaskSpec, render


# -- tokenisation ----------------------------------------------------------------------------
def tokenize(task: TaskSpec, tokenizer, splits, max_length: int, lm_head: bool = False):
    """Token ids and a `labels` column for every split (multiple choice: one row per choice).
    `lm_head` (`modeling.models.uses_lm_head`): a multiple-choice task read by a decoder's LM head, each
    choice a continuation of the context (`encode_choices`)."""

    def encode(row):
        if task.kind == "causal_lm":
            return encode_causal(task, tokenizer, row, max_length)
        if task.kind == "multiple_choice" and lm_head:
            return encode_choices(task, tokenizer, row, max_length)
        if task.kind == "multiple_choice":
            pairs = task.choice_inputs(row)
            enc = tokenizer([c for c, _ in pairs], [x for _, x in pairs],
                            truncation=True, max_length=max_length)
        else:
            enc = tokenizer(*task.inputs(row), truncation=True, max_length=max_length)
        enc["labels"] = task.label_id(row["label"])
        return dict(enc)

    columns = splits["train"].column_names
    return splits.map(encode, remove_columns=columns, desc=f"tokenize {task.name}")


def encode_causal(task: TaskSpec, tokenizer, row: dict, max_length: int) -> dict:
    """A causal-LM row: the prompt's tokens then the answer's (and EOS when the tokenizer has
    one), `labels` = -100 on the prompt (the loss is on answer tokens only), `prompt_length` and
    the extracted gold answer `gold` for evaluation. Truncated to `max_length` from the answer's
    end, so the prompt survives when it fits."""
    prompt = tokenizer(task.prompt_text(row))["input_ids"]
    answer = tokenizer(task.answer_text(row), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    if len(prompt) >= max_length:
        raise UsageError(f"task {task.name!r}: a prompt of {len(prompt)} tokens leaves no room for its "
                         f"answer within max_length {max_length}: raise max_length (or shorten the prompt)")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "prompt_length": min(len(prompt), max_length),
            "gold": task.extract_answer(task.answer_text(row))}


def encode_choices(task: TaskSpec, tokenizer, row: dict, max_length: int) -> dict:
    """A multiple-choice row for a decoder, as lm-evaluation-harness builds it: per choice, the
    context's tokens then the choice's (" " + choice, its target delimiter; no end-of-sequence
    token), `choice_labels` = the choice's tokens (-100 on the context), so a choice's score is
    the sum of its tokens' log-likelihoods given the context. Too long a sequence loses context
    tokens from the left, never the choice's."""
    context = tokenizer(render(task.context, row))["input_ids"]
    ids, targets = [], []
    for choice in task.choices:
        continuation = tokenizer(" " + render(choice, row), add_special_tokens=False)["input_ids"]
        keep = context[max(0, len(context) + len(continuation) - max_length):]
        ids.append((keep + continuation)[-max_length:])
        targets.append(([-100] * len(keep) + continuation)[-max_length:])
    return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "choice_labels": targets,
            "labels": task.label_id(row["label"])}


def _pad_right(tokenizer, feats: list[dict], targets: list[list[int]]):
    """(`tokenizer.pad` on the right whatever the tokenizer's default (Llama's pads on the
    left), the token targets padded with -100 to the same length)."""
    import torch

    batch = dict(tokenizer.pad(feats, return_tensors="pt", padding_side="right"))
    padded = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
    for i, t in enumerate(targets):
        padded[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return batch, padded


class Collator:
    """Pads a batch with the tokenizer; multiple choice is padded flat, then shaped [B, C, L]."""

    def __init__(self, tokenizer, task: TaskSpec):
        self.tokenizer, self.task = tokenizer, task

    def __call__(self, rows: list[dict]):
        import torch

        if self.task.kind == "causal_lm":  # right-padded; labels padded with -100 (no loss)
            feats = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows]
            batch, labels = _pad_right(self.tokenizer, feats, [r["labels"] for r in rows])
            return {**batch, "labels": labels}
        labels = torch.tensor([r["labels"] for r in rows],
                              dtype=torch.float if self.task.kind == "regression" else torch.long)
        if rows and "choice_labels" in rows[0]:  # choices read by a decoder's LM head: [B, C, L]
            n = len(self.task.choices)
            flat = [{"input_ids": r["input_ids"][i], "attention_mask": r["attention_mask"][i]}
                    for r in rows for i in range(n)]
            batch, targets = _pad_right(self.tokenizer, flat, [r["choice_labels"][i] for r in rows for i in range(n)])
            batch["choice_labels"] = targets
            return {**{k: v.view(len(rows), n, -1) for k, v in batch.items()}, "labels": labels}
        feats = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
        if self.task.kind != "multiple_choice":
            batch = self.tokenizer.pad(feats, return_tensors="pt")
        else:
            n = len(self.task.choices)
            flat = [{k: v[i] for k, v in f.items()} for f in feats for i in range(n)]
            batch = {k: v.view(len(rows), n, -1)
                     for k, v in self.tokenizer.pad(flat, return_tensors="pt").items()}
        return {**batch, "labels": labels}

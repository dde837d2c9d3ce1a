"""Row preprocessors a task names (`preprocess:`), for formats a template cannot express: one
record each, built-ins here, third-party ones by entry point (`peftbench.preprocessors`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from peftbench.core.plugins import PluginTable


@dataclass(frozen=True)
class Preprocessor:
    """A function from one row (a dict) to the row the task's templates read."""

    name: str
    apply: Callable[[dict], dict]
    description: str


def _norm(word: str) -> str:
    return word.strip(".,;:!?\"'()").lower().removesuffix("'s")


def wsc_span_start(words: list[str], index: int, span: list[str]) -> int:
    """Where `span` starts in `words`: SuperGLUE's word index, moved to the nearest place where
    the span's words actually stand (compared without case, punctuation or "'s"). A few indices
    in the data are off (one span of 'it' points at 'use'); without this the marks would wrap
    the wrong words. If the words stand nowhere, the index is kept."""
    target = [_norm(w) for w in span]
    places = [j for j in range(len(words) - len(span) + 1)
              if [_norm(w) for w in words[j:j + len(span)]] == target]
    return min(places, key=lambda j: (abs(j - index), j)) if places else index


def mark_wsc_spans(row: dict) -> dict:
    """WSC: mark the candidate noun phrase with * * and the pronoun with # #, by word index
    (SuperGLUE span indices count whitespace-separated words; `wsc_span_start` corrects the few
    that are off), as in the span-marking input format of T5 / SuperGLUE baselines; the pair
    becomes a single marked sentence. Words are split on any whitespace (one span holds a
    newline)."""
    words = row["text"].split()
    t = row["target"]
    spans = []
    for key, mark in (("span1", "*"), ("span2", "#")):
        span = t[f"{key}_text"].split()
        spans.append((wsc_span_start(words, t[f"{key}_index"], span), len(span), mark))
    for start, length, mark in sorted(spans, reverse=True):  # right to left so indices stay valid
        words[start:start + length] = [mark, *words[start:start + length], mark]
    return {**row, "text": " ".join(words)}


# Third-party: `[project.entry-points."peftbench.preprocessors"] name = "package.module:PREPROCESSOR"`.
REGISTRY: PluginTable[Preprocessor] = PluginTable("peftbench.preprocessors", "preprocessor", Preprocessor, [
    Preprocessor("mark_wsc_spans", mark_wsc_spans, "WSC: the candidate span marked * *, the pronoun # #")])

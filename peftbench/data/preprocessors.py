"""TODO"""
from __future__ import annotations
import json
import math
import os
import re
import string
from importlib import resources
from pathlib import Path
from typing import Annotated
import regex
import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, PrivateAttr, StrictBool,
                      StrictInt, StrictStr, ValidationError, field_validator, model_validator)
from peftbench import yamlio
from peftbench.errors import UsageError, schema_problem
from peftbench.metrics import BINARY, METRIC_KINDS, METRICS


# -- preprocessors a spec may name (`preprocess:`), for formats a template cannot express ----
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


PREPROCESSORS = {"mark_wsc_spans": mark_wsc_spans}

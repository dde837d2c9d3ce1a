"""Tasks as data: one YAML file per task (see `tasks/*.yaml` and the README for the schema).

A spec names its data files (relative to the YAML file) or a hub dataset, how to build the
model's input text, the label mapping and the metrics. Loading goes through `datasets`.
"""
from __future__ import annotations

import os
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftbench.errors import UsageError
from peftbench.metrics import METRICS

KINDS = ("classification", "regression", "multiple_choice")
SPLITS = ("train", "validation", "test")


def task_dirs() -> list[Path]:
    """Built-in specs first, then folders in $PEFTBENCH_TASKS_PATH (os.pathsep-separated)."""
    builtin = Path(str(resources.files("peftbench.tasks")))  # the repo's tasks/ folder
    extra = [Path(p) for p in os.environ.get("PEFTBENCH_TASKS_PATH", "").split(os.pathsep) if p]
    return [builtin, *extra]


def available_tasks() -> dict[str, Path]:
    found = {}
    for folder in task_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


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


@dataclass
class TaskSpec:
    name: str
    path: Path
    kind: str
    metrics: list[str]
    main_metric: list[str]
    description: str = ""
    files: dict[str, str] = field(default_factory=dict)
    hub: dict | None = None
    text: list[str] = field(default_factory=list)
    context: str | None = None
    choices: list[str] = field(default_factory=list)
    labels: list | None = None
    preprocess: str | None = None
    notes: str = ""

    @property
    def num_labels(self) -> int:
        """Outputs of the head: classes, 1 for regression, 1 score per choice."""
        return len(self.labels) if self.kind == "classification" else 1

    @property
    def num_classes(self) -> int | None:
        """Classes a prediction can take (metrics such as macro-F1 average over all of them)."""
        if self.kind == "classification":
            return len(self.labels)
        return len(self.choices) if self.kind == "multiple_choice" else None

    def data_files(self) -> list[str]:
        """The files whose content defines this task (its spec, and its data files if local)."""
        return [str(self.path)] + [str(self.path.parent / f) for _, f in sorted(self.files.items())]

    def load_splits(self, limit: int | None = None):
        """A `datasets.DatasetDict` with train / validation / test, rows as in the files."""
        from datasets import DatasetDict, load_dataset

        if self.hub:
            raw = load_dataset(self.hub["path"], self.hub.get("name"))
            raw = DatasetDict({s: raw[self.hub.get("splits", {}).get(s, s)] for s in SPLITS})
        else:
            files = {s: str(self.path.parent / f) for s, f in self.files.items()}
            for split, file in files.items():
                if not Path(file).is_file():
                    raise UsageError(f"task {self.name!r}: {split} data file {file} is missing "
                                     f"(named in {self.path})")
            raw = load_dataset("json", data_files=files)
        if self.preprocess:
            raw = raw.map(PREPROCESSORS[self.preprocess])
        if limit:
            raw = DatasetDict({s: d.select(range(min(limit, len(d)))) for s, d in raw.items()})
        return raw

    def label_id(self, value):
        if self.kind == "regression":
            return float(value)
        if self.kind == "multiple_choice":
            return int(value)
        try:
            return self.labels.index(value)
        except ValueError:
            raise UsageError(f"task {self.name!r}: label {value!r} is not in the spec's labels "
                             f"{self.labels}") from None

    def inputs(self, row: dict) -> list[str]:
        """The one or two texts fed to the tokenizer for a classification/regression row."""
        return [_render(t, row) for t in self.text]

    def choice_inputs(self, row: dict) -> list[tuple[str, str]]:
        """(context, choice) pairs of a multiple-choice row."""
        return [(_render(self.context, row), _render(c, row)) for c in self.choices]


def _render(template: str, row: dict) -> str:
    return template.format(**row) if "{" in template else str(row[template])


def load_task(name_or_path: str) -> TaskSpec:
    """A task by name (a YAML file in a task folder) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UsageError(f"task file {name_or_path} does not exist")
    else:
        tasks = available_tasks()
        if name_or_path.lower() not in tasks:
            raise UsageError(f"unknown task {name_or_path!r}: allowed {', '.join(tasks)} "
                             "or the path of a task YAML file")
        path = tasks[name_or_path.lower()]
    return parse_task(path)


def parse_task(path: Path) -> TaskSpec:
    text = path.read_text()
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"malformed task YAML {where}: {problem}") from None

    def fail(key: str, message: str):
        raise UsageError(f"malformed task YAML {path}:{_line_of(node, key)}: {message}")

    if not isinstance(raw, dict):
        raise UsageError(f"malformed task YAML {path}:1: expected a mapping of keys to values")
    allowed = set(TaskSpec.__dataclass_fields__) - {"path", "files", "hub"} | {"data"}
    for key in raw:
        if key not in allowed:
            fail(key, f"unknown key {key!r}: allowed {', '.join(sorted(allowed))}")
    for key in ("name", "kind", "data", "metrics"):
        if key not in raw:
            fail(key, f"missing required key {key!r}")
    if raw["kind"] not in KINDS:
        fail("kind", f"kind {raw['kind']!r} is unknown: allowed {', '.join(KINDS)}")
    metrics = raw["metrics"] if isinstance(raw["metrics"], list) else [raw["metrics"]]
    main = raw.get("main_metric", metrics[0])
    main = main if isinstance(main, list) else [main]
    for m in metrics + main:
        if m not in METRICS:
            fail("metrics", f"metric {m!r} is unknown: allowed {', '.join(METRICS)}")
    data = raw["data"]
    if not isinstance(data, dict) or not ({"files", "hub"} & set(data)):
        fail("data", "data needs 'files' (train/validation/test paths) or 'hub' (path, name)")
    files = data.get("files") or {}
    if files and set(files) != set(SPLITS):
        fail("data", f"data.files must name exactly the splits {', '.join(SPLITS)}")
    kind = raw["kind"]
    if kind == "classification" and not raw.get("labels"):
        fail("kind", "a classification task needs 'labels' (file values in class-id order)")
    if kind == "multiple_choice" and not (raw.get("context") and raw.get("choices")):
        fail("kind", "a multiple_choice task needs 'context' and 'choices'")
    if kind != "multiple_choice" and not raw.get("text"):
        fail("kind", "a classification or regression task needs 'text' (one or two fields)")
    if raw.get("preprocess") and raw["preprocess"] not in PREPROCESSORS:
        fail("preprocess", f"preprocessor {raw['preprocess']!r} is unknown: allowed "
                           f"{', '.join(PREPROCESSORS)}")
    fields = {k: v for k, v in raw.items() if k not in ("data", "metrics", "main_metric")}
    if isinstance(fields.get("text"), str):
        fields["text"] = [fields["text"]]
    return TaskSpec(path=path, metrics=metrics, main_metric=main, files=files,
                    hub=data.get("hub"), **fields)


def _line_of(node, key: str) -> int:
    """1-based line of top-level `key` in a composed YAML mapping (1 if absent)."""
    for key_node, _ in getattr(node, "value", []) or []:
        if getattr(key_node, "value", None) == key:
            return key_node.start_mark.line + 1
    return 1


# -- tokenisation ----------------------------------------------------------------------------
def tokenize(task: TaskSpec, tokenizer, splits, max_length: int):
    """Token ids and a `labels` column for every split (multiple choice: one row per choice)."""

    def encode(row):
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


class Collator:
    """Pads a batch with the tokenizer; multiple choice is padded flat, then shaped [B, C, L]."""

    def __init__(self, tokenizer, task: TaskSpec):
        self.tokenizer, self.task = tokenizer, task

    def __call__(self, rows: list[dict]):
        import torch

        labels = torch.tensor([r["labels"] for r in rows],
                              dtype=torch.float if self.task.kind == "regression" else torch.long)
        feats = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
        if self.task.kind != "multiple_choice":
            batch = self.tokenizer.pad(feats, return_tensors="pt")
        else:
            n = len(self.task.choices)
            flat = [{k: v[i] for k, v in f.items()} for f in feats for i in range(n)]
            batch = {k: v.view(len(rows), n, -1)
                     for k, v in self.tokenizer.pad(flat, return_tensors="pt").items()}
        return {**batch, "labels": labels}

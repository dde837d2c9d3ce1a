"""Tasks as data: one YAML file per task (see `tasks/*.yaml` and the README for the schema).

A spec names its data files (relative to the YAML file) or a hub dataset, how to build the
model's input text, the label mapping and the metrics. Loading goes through `datasets`.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from pathlib import Path
from typing import Annotated

import regex
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from peftbench.core.errors import UsageError
from peftbench.data import metrics, preprocessors

KINDS = ("classification", "regression", "multiple_choice", "causal_lm")


SPLITS = ("train", "validation", "test")


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # task names become folder names


REGRESSION_LIMIT = 1e6  # a regression label beyond this is a unit error, not a score


MAX_NEW_TOKENS = 1024  # a generated answer longer than this is not an answer to extract


EXTRACT_TIMEOUT_S = 1.0  # one `extract` search on one answer: a backtracking blow-up ends here, by name


def render(template: str, row: dict) -> str:
    return template.format(**row) if "{" in template else str(row[template])


class _Files(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    train: str
    validation: str
    test: str


class _Hub(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str
    name: str | None = None
    splits: dict[str, str] = {}


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    files: _Files | None = None
    hub: _Hub | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.files is None and self.hub is None:
            raise ValueError("data needs 'files' (train/validation/test paths) or 'hub' (path, name)")
        return self


def _as_list(value):
    """A single value where a list is allowed as a list; None as an empty list (not for
    `main_metric`, whose None means "the first metric")."""
    if value is None:
        return None
    return value if isinstance(value, list) else [value]


class TaskSpec(BaseModel):
    """A task YAML file (README "Add a task"), validated on load and used as it is at run time:
    every key typed, strictly (a number is not read as a string, nor a string as a list),
    unknown keys refused; shorthands normalised on the way in (`metrics: accuracy` ->
    [accuracy], `text: sentence` -> [sentence]; `main_metric` defaults to the first metric).
    Checks that need the file's lines (kind against its fields, metrics against the kind) are
    `parse_task`'s, which names the line."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    kind: str
    data: _Data
    metrics: Annotated[list[str], BeforeValidator(_as_list)]
    main_metric: Annotated[list[str] | None, BeforeValidator(_as_list)] = None
    description: str = ""
    notes: str = ""
    text: Annotated[list[str], BeforeValidator(_as_list)] = []
    context: str | None = None
    choices: Annotated[list[str], BeforeValidator(_as_list)] = []
    labels: list[StrictBool | StrictInt | StrictStr] | None = None
    preprocess: str | None = None
    # causal_lm: the model reads `prompt` and is trained on `answer` (both templates); a
    # generated answer is compared with the gold one after `extract` (a regex: its first group,
    # or the whole match; the stripped text without one), GSM8K-style "#### (-?[0-9.,]+)"
    prompt: str | None = None
    answer: str | None = None
    extract: str | None = None
    max_new_tokens: Annotated[int, Field(gt=0, le=MAX_NEW_TOKENS)] = 32
    _path: Path = PrivateAttr(default=Path("."))

    @model_validator(mode="after")
    def _main_metric(self):
        if not self.main_metric:
            self.main_metric = self.metrics[:1]
        return self

    @property
    def path(self) -> Path:
        """The task file (data files are read relative to its folder)."""
        return self._path

    @property
    def files(self) -> dict[str, str]:
        """split -> local data file (relative to the task file); empty for a hub dataset."""
        return self.data.files.model_dump() if self.data.files else {}

    @property
    def hub(self) -> dict | None:
        return self.data.hub.model_dump() if self.data.hub else None

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

    def digests(self) -> list[str]:
        """SHA-256 of each of `data_files()` (what a run records and a cell is fingerprinted
        by); a missing data file is a one-line error naming its split."""
        from peftbench.core.files import file_digest

        for split, name in sorted(self.files.items()):
            if not (self.path.parent / name).is_file():
                raise UsageError(f"task {self.name!r}: {split} data file {self.path.parent / name} "
                                 f"is missing (named in {self.path})")
        return [file_digest(f) for f in self.data_files()]

    def load_splits(self, limit: int | None = None):
        """A `datasets.DatasetDict` with train / validation / test, rows as in the files."""
        from datasets import DatasetDict, load_dataset

        if self.hub:
            try:
                raw = load_dataset(self.hub["path"], self.hub.get("name"))
                raw = DatasetDict({s: raw[self.hub.get("splits", {}).get(s, s)] for s in SPLITS})
            except Exception as err:  # offline, unknown id, a missing split: one line, named
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                offline = " (offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if \
                    os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") else ""
                raise UsageError(f"task {self.name!r}: cannot load hub dataset {self.hub['path']!r}"
                                 f"{offline}: {type(err).__name__}: {first}; use local files "
                                 "(data: files:) to run offline") from None
            for split in SPLITS:  # (local files are checked line by line, below)
                self._check_rows(split, raw[split])
        else:
            files = {s: str(self.path.parent / f) for s, f in self.files.items()}
            for split, file in files.items():
                self._check_file(split, file)
            try:
                raw = load_dataset("json", data_files=files)
            except Exception as err:  # e.g. a column whose values have different types
                first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                raise UsageError(f"task {self.name!r}: cannot read its data files: {first}") from None
        if self.preprocess:
            try:
                raw = raw.map(preprocessors.REGISTRY.get(self.preprocess).apply)
            except KeyError as err:
                raise UsageError(f"task {self.name!r}: preprocessor {self.preprocess!r} needs field "
                                 f"{err.args[0]!r}, which the rows lack (named in {self.path})") from None
        if limit:
            raw = DatasetDict({s: d.select(range(min(limit, len(d)))) for s, d in raw.items()})
        return raw

    def _check_file(self, split: str, file: str) -> None:
        """Every line of a local JSONL file is a JSON object with the fields the spec reads and
        an allowed label, and there is at least one: a bad line is named by file and line
        number (datasets' own errors name neither, or fail on a mixed-type column)."""
        if not Path(file).is_file():
            raise UsageError(f"task {self.name!r}: {split} data file {file} is missing "
                             f"(named in {self.path})")
        rows = 0
        with open(file, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UsageError(f"task {self.name!r}: {file}:{number}: not UTF-8 text (byte "
                                     f"{raw[err.start]:#04x}); save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"task {self.name!r}: {file}:{number}: not valid JSON "
                                     f"({err.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise UsageError(f"task {self.name!r}: {file}:{number}: a line must be a JSON "
                                     f"object with the fields, not {type(row).__name__}")
                self._check_row(row, f"{file}:{number}", list(row))
                rows += 1
        if not rows:
            raise UsageError(f"task {self.name!r}: {split} data file {file} has no rows")

    def fields(self) -> list[str]:
        """The row fields the spec reads: the label (none for causal_lm) and every text
        template's fields."""
        if self.kind == "causal_lm":
            return list(dict.fromkeys(f for t in (self.prompt, self.answer) for f in template_fields(t)))
        templates = self.text if self.kind != "multiple_choice" else [self.context, *self.choices]
        return ["label", *dict.fromkeys(f for t in templates for f in template_fields(t))]

    def prompt_text(self, row: dict) -> str:
        return render(self.prompt, row)

    def answer_text(self, row: dict) -> str:
        return render(self.answer, row)

    def extract_answer(self, text: str) -> str:
        """What exact match compares: `extract`'s first group (or whole match) in `text`, ''
        when it does not match; without `extract`, the stripped text."""
        if self.extract is None:
            return text.strip()
        try:  # the `regex` engine (re-compatible syntax), because it can bound a search's time
            found = regex.search(self.extract, text, timeout=EXTRACT_TIMEOUT_S)
        except TimeoutError:
            raise UsageError(f"task {self.name!r}: extract {self.extract!r} ran over {EXTRACT_TIMEOUT_S:g} s on "
                             f"a {len(text)}-character answer ({text[:40]!r}...): the pattern backtracks "
                             "catastrophically (nested or overlapping repeats such as (a|aa)+); simplify it") from None
        if found is None:
            return ""
        return (found.group(1) if found.re.groups else found.group(0)).strip()

    def _check_row(self, row: dict, where: str, columns: list[str]) -> None:
        missing = [f for f in self.fields() if f not in columns]
        if missing:
            raise UsageError(f"task {self.name!r}: {where}: no field(s) {missing} (named in "
                             f"{self.path}); the fields there are {columns}")
        if self.kind == "causal_lm":  # no label: the answer template is the target
            if self.extract is not None and not self.extract_answer(self.answer_text(row)):
                raise UsageError(f"task {self.name!r}: {where}: extract {self.extract!r} finds no answer "
                                 f"in the gold answer {self.answer_text(row)[:80]!r}: every generation "
                                 "would score as equal to it ('' == ''); fix the pattern")
            return
        if self.kind == "multiple_choice":
            empty = [i for i, c in enumerate(self.choices) if not render(c, row).strip()]
            if empty:
                raise UsageError(f"task {self.name!r}: {where}: choice {empty[0]} is empty (an empty "
                                 "continuation has log-likelihood 0 and always wins on a decoder)")
        try:
            self.label_id(row["label"])
        except UsageError as err:
            raise UsageError(f"{err} ({where})") from None

    def _check_rows(self, split: str, rows) -> None:
        """The same checks on a loaded split (hub datasets, and after a preprocessor)."""
        if len(rows) == 0:
            raise UsageError(f"task {self.name!r}: the {split} split has no rows")
        for number, row in enumerate(rows, 1):
            self._check_row(row, f"{split} row {number}", rows.column_names)

    def label_id(self, value):
        if self.kind == "regression":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"task {self.name!r}: regression label {value!r} is not a number")
            if not math.isfinite(value) or abs(value) > REGRESSION_LIMIT:
                raise UsageError(f"task {self.name!r}: regression label {value!r} is not a finite "
                                 f"number within +-{REGRESSION_LIMIT:g} (squared errors of larger "
                                 "labels overflow float32: rescale the labels)")
            return float(value)
        if self.kind == "multiple_choice":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(self.choices):
                raise UsageError(f"task {self.name!r}: multiple-choice label {value!r} is not a "
                                 f"choice index: allowed 0..{len(self.choices) - 1}")
            return value
        for index, label in enumerate(self.labels):  # 1 == True in Python: the type must match too
            if type(label) is type(value) and label == value:
                return index
        raise UsageError(f"task {self.name!r}: label {value!r} is not in the spec's labels "
                         f"{self.labels}")

    def inputs(self, row: dict) -> list[str]:
        """The one or two texts fed to the tokenizer for a classification/regression row."""
        return [render(t, row) for t in self.text]

    def choice_inputs(self, row: dict) -> list[tuple[str, str]]:
        """(context, choice) pairs of a multiple-choice row."""
        return [(render(self.context, row), render(c, row)) for c in self.choices]

    @field_validator("kind")
    @classmethod
    def _kind(cls, value):
        if value not in KINDS:
            raise ValueError(f"kind {value!r} is unknown: allowed {', '.join(KINDS)}")
        return value

    @field_validator("metrics", "main_metric")
    @classmethod
    def _metrics(cls, value):
        for m in value or []:
            if m not in metrics.REGISTRY:
                raise ValueError(f"metric {m!r} is unknown: allowed {', '.join(metrics.REGISTRY.names())}")
        return value

    @field_validator("preprocess")
    @classmethod
    def _preprocess(cls, value):
        if value is not None and value not in preprocessors.REGISTRY:
            raise ValueError(f"preprocessor {value!r} is unknown: allowed "
                             f"{', '.join(preprocessors.REGISTRY.names())}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value):
        if value is not None:
            kinds = {type(v).__name__ for v in value}
            if len(kinds) > 1:
                raise ValueError(f"labels {value} mix {' and '.join(sorted(kinds))}: give labels of one "
                                 "type (1 and true are equal in Python, so they would be one class)")
        return value

    @field_validator("extract")
    @classmethod
    def _extract(cls, value):
        if value is not None:
            try:
                pattern = regex.compile(value)
            except regex.error as err:
                raise ValueError(f"extract {value!r} is not a regular expression ({err})") from None
            if pattern.groups > 1:
                raise ValueError(f"extract {value!r} has {pattern.groups} groups: give at most one "
                                 "(the answer)")
        return value

    @field_validator("text", "context", "choices", "prompt", "answer")
    @classmethod
    def _templates(cls, value):
        for template in [value] if isinstance(value, str) else value or []:
            template_fields(template)  # raises ValueError on a broken template
        return value


def template_fields(template: str) -> list[str]:
    """The row fields a text template reads: '{premise} What was the {question}?' -> premise,
    question; a bare name ('premise') is that field. ValueError on a broken template."""
    if "{" not in template and "}" not in template:
        return [template]
    try:
        parts = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)
                 if field is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is broken ({err}); write fields as {{name}}") from None
    names = [field for field, _, _ in parts]
    if any(not n or not n.isidentifier() for n in names):
        raise ValueError(f"template {template!r} has an empty or unnamed field; write fields as {{name}}")
    shaped = [f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
              for field, spec, conversion in parts if spec or conversion]
    if shaped:  # '{text:>400000000}' pads every row to 400 MB: a template only places fields
        raise ValueError(f"template {template!r} formats a field ({shaped[0]}): write fields as "
                         "plain {name}, without a format spec or conversion")
    return names

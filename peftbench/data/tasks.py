"""Finding and reading task files: the built-in tasks, a task by name or path, parse errors with line numbers."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from peftbench.core import yamlio
from peftbench.core.errors import UsageError, schema_problem
from peftbench.data.metrics import REGISTRY as METRICS
from peftbench.data.spec import SAFE_NAME, TaskSpec


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise UsageError(f"malformed task YAML {path}:{line}: not UTF-8 text (byte "
                         f"{path.read_bytes()[err.start]:#04x}); save the file as UTF-8") from None
    try:
        node = yaml.compose(text)
        raw = yamlio.load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"malformed task YAML {yamlio.where(err, path)}") from None

    def fail(key: str, message: str):
        raise UsageError(f"malformed task YAML {path}:{_line_of(node, key)}: {message}")

    if not isinstance(raw, dict):
        raise UsageError(f"malformed task YAML {path}:1: expected a mapping of keys to values")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as err:
        fail(*schema_problem(err, raw, TaskSpec))
    spec._path = path
    kind = spec.kind
    if kind == "classification" and not spec.labels:
        fail("kind", "a classification task needs 'labels' (file values in class-id order)")
    if kind == "multiple_choice" and not (spec.context and spec.choices):
        fail("kind", "a multiple_choice task needs 'context' and 'choices'")
    if kind in ("classification", "regression") and not spec.text:
        fail("kind", "a classification or regression task needs 'text' (one or two fields)")
    if kind == "causal_lm" and not (spec.prompt and spec.answer):
        fail("kind", "a causal_lm task needs 'prompt' and 'answer' (templates of the row's fields)")
    if kind != "causal_lm" and (spec.prompt or spec.answer or spec.extract):
        fail("prompt" if spec.prompt else "answer" if spec.answer else "extract",
             f"'prompt', 'answer' and 'extract' belong to a causal_lm task, not a {kind} one")
    for metric in spec.metrics:
        if kind not in METRICS.get(metric).kinds:
            allowed = [m for m in METRICS.names() if kind in METRICS.get(m).kinds]
            fail("metrics", f"metric {metric!r} cannot score a {kind} task: allowed {', '.join(allowed)}")
        classes = len(spec.labels or []) if kind == "classification" else len(spec.choices)
        if METRICS.get(metric).binary and classes != 2:
            fail("metrics", f"metric {metric!r} needs two classes (class 1 positive), the task has "
                            f"{classes}: use macro_f1")
    outside = [m for m in spec.main_metric if m not in spec.metrics]
    if outside:
        fail("main_metric", f"main_metric {outside[0]!r} is not in metrics {spec.metrics}: list it there too")
    if kind != "multiple_choice" and len(spec.text) > 2:
        fail("text", f"text names {len(spec.text)} fields; a classification or regression input is "
                     "one text or a pair: join the others in a template, e.g. '{a} {b}'")
    if spec.labels is not None and len(set(map(repr, spec.labels))) != len(spec.labels):
        twice = next(l for l in spec.labels if spec.labels.count(l) > 1)
        fail("labels", f"label {twice!r} is listed twice: each class once (a repeat would add a "
                       "class no row can have)")
    if not SAFE_NAME.fullmatch(spec.name) or ".." in spec.name:
        fail("name", f"name {spec.name!r} is not file-safe: letters, digits, '.', '_', '-' (it "
                     "names run folders)")
    return spec


def _line_of(node, key: str) -> int:
    """1-based line of top-level `key` in a composed YAML mapping (1 if absent)."""
    for key_node, _ in getattr(node, "value", []) or []:
        if getattr(key_node, "value", None) == key:
            return key_node.start_mark.line + 1
    return 1

"""mkdocs hooks: the reference pages' tables are generated from the code at build time (the CLI
from its parser, the schemas from their pydantic models, the method table from the registry),
so the documentation cannot drift from what the code accepts. A page asks for one with a line
`<!-- generated: NAME -->`."""
from __future__ import annotations

import re
from dataclasses import fields

MARK = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cli() -> str:
    import argparse

    from peftbench.cli.parser import build_parser

    parser = build_parser()
    parser.prog = "peftbench"
    out = ["```text", parser.format_help().rstrip(), "```"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [f"## `peftbench {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _schema_table(model) -> str:
    schema = model.model_json_schema()
    rows = ["| field | type | default | required |", "| --- | --- | --- | --- |"]
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type") or " or ".join(
            p.get("type", p.get("$ref", "").rsplit("/", 1)[-1]) for p in prop.get("anyOf", ()))
        rows.append(f"| `{name}` | {_cell(kind or prop.get('$ref', '').rsplit('/', 1)[-1])} | "
                    f"{_cell(prop.get('default', '')) if 'default' in prop else ''} | "
                    f"{'yes' if name in required else ''} |")
    return "\n".join(rows)


def task_schema() -> str:
    from peftbench.data.spec import TaskSpec

    return _schema_table(TaskSpec)


def spec_schema() -> str:
    from peftbench.sweep.spec import SearchSpec, StudySpec

    return "\n".join([_schema_table(StudySpec), "", "The `search:` section:", "",
                      _schema_table(SearchSpec)])


def run_record() -> str:
    from peftbench.training.record import RunRecord

    return _schema_table(RunRecord)


def train_config() -> str:
    from peftbench.contract.settings import TrainConfig

    rows = ["| setting | default |", "| --- | --- |"]
    for f in fields(TrainConfig):
        rows.append(f"| `{f.name}` | `{f.default!r}` |")
    return "\n".join(rows)


def methods() -> str:
    from peftbench.contract import registry

    rows = ["| name | package | budget | description |", "| --- | --- | --- | --- |"]
    for name, info in sorted(registry.methods().items()):
        cls = registry.get(name)
        budget = ("exact" if cls.budget_exact else "<= budget") if cls.uses_budget else "natural count"
        rows.append(f"| `{name}` | {info.package} | {budget} | {_cell(cls.description)} |")
    return "\n".join(rows)


def changelog() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()


def layout() -> str:
    """One row per module, layer by layer from the bottom, from the modules' own docstrings."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "peftbench"

    def summary(path: Path) -> str:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        return _cell(doc.split("\n\n")[0])

    out = []
    layers = ["core", "data", "modeling", "contract", "training", "sweep", "analysis", "rendering",
              "board", "bench", "api.py", "testing.py", "cli"]
    for layer in layers:
        path = root / layer
        if path.is_dir():
            out += [f"### `peftbench/{layer}/`", "", summary(path / "__init__.py"), "",
                    "| module | lines | what it holds |", "| --- | --- | --- |"]
            out += [f"| `{m.stem}` | {len(m.read_text().splitlines())} | {summary(m)} |"
                    for m in sorted(path.glob("*.py")) if m.name != "__init__.py"]
        else:
            out += [f"### `peftbench/{layer}`", "", summary(path)]
        out.append("")
    return "\n".join(out)


GENERATORS = {"layout": layout, "changelog": changelog, "cli": cli, "task-schema": task_schema, "spec-schema": spec_schema,
              "run-record": run_record, "train-config": train_config, "methods": methods}


def on_page_markdown(markdown, page, config, files):
    def render(match):
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: no generator {name!r}; known: {sorted(GENERATORS)}")
        return GENERATORS[name]()

    return MARK.sub(render, markdown)

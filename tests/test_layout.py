"""The package layout shows the architecture: layers that import only downwards, no import circle
(imports inside functions and under `if TYPE_CHECKING:` count: a circle closed by a type-only
import is still a circle a reader must untangle), no module over 400 lines, the built-in methods
written against `peftbench.api` alone, and every package installed."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peftbench"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS = ["core", "data", "modeling", "contract", "training", "sweep", "analysis", "rendering",
          "board", "bench", "api", "testing", "cli", "__main__"]
MAX_LINES = 400
# Functions over 60 lines, each with its reason (a new long function needs one here).
LONG_FUNCTIONS = {
    "training.trainer.train": "the training loop: one place to read what a step does, in order",
    "cli.parser.build_parser": "a declarative table of commands and options, one call per option",
    "sweep.search.tune": "one (task, method) search: the objective is a closure over its trial log",
    "training.experiment._run_seed": "one seed's run from scoring to result.json, in order",
    "board.rekey.rekey": "the proof and the re-keying in one transaction: nothing written unless all pass",
    "board.verify.verify": "re-run sampled cells and compare every number, in one report",
    "analysis.findings.sections": "Fu et al.'s three findings, each test beside its wording",
    "rendering.report.report_sections": "the report's sections in reading order",
    "bench.cells.tuning_rules": "the tuning replay's two rules side by side",
    "rendering.verdict.verdict": "the verdict's sentences, each beside the statistic it words",
    "training.experiment.run_experiment": "a run directory's life: claim, seeds, summary, marker",
    "rendering.report._ranking_sections": "Friedman, ranks and the declared comparisons, one after another",
}


def _module_name(path: Path) -> str:
    """'sweep.grid' for peftbench/sweep/grid.py, 'sweep' for its __init__, 'cli.main' for cli/main.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    if module == "__init__":
        return -1  # the version number alone
    return LAYERS.index(module.split(".")[0])


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(peftbench modules imported anywhere in the file, method modules imported), named as
    `_module_name` does; `from peftbench import x` counts the module x, or the package itself."""
    known = _modules()
    modules, methods = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("peftbench.")]
            modules |= {n.removeprefix("peftbench.") for n in names if not n.startswith("peftbench.methods")}
            continue
        if not isinstance(node, ast.ImportFrom) or not node.module or node.level:
            continue
        if node.module.startswith(("peftbench.methods", "peftbench.tasks")):
            methods.add(node.module)
        elif node.module.startswith("peftbench."):
            name = node.module.removeprefix("peftbench.")
            subs = {f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known}
            modules |= subs if subs and len(subs) == len(node.names) else {name} | subs
        elif node.module == "peftbench":
            modules |= {a.name if a.name in known else "__init__" for a in node.names}
    return modules - {_module_name(path)}, methods


def _graph() -> dict[str, set[str]]:
    return {name: _imports(p)[0] for name, p in _modules().items()}


def test_every_module_is_in_a_layer():
    unplaced = [m for m in _modules() if m != "__init__" and m.split(".")[0] not in LAYERS]
    assert not unplaced, f"place these in LAYERS (and docs/reference/layout.md): {unplaced}"


def test_no_import_runs_up_a_layer():
    up = [f"{m} ({LAYERS[_layer(m)]}) -> {d} ({LAYERS[_layer(d)]})"
          for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not up, up


def test_no_import_circle():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_layer_test_sees_type_only_and_function_level_imports(tmp_path, monkeypatch):
    module = tmp_path / "peftbench" / "core" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from peftbench.training.record import RunRecord\n"
                      "def f():\n    from peftbench.board import paths\n")
    (tmp_path / "peftbench" / "training").mkdir()
    (tmp_path / "peftbench" / "training" / "record.py").write_text("")
    (tmp_path / "peftbench" / "board").mkdir()
    (tmp_path / "peftbench" / "board" / "paths.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "peftbench")
    assert _imports(module)[0] == {"training.record", "board.paths"}


def test_the_core_imports_no_method_module():
    offenders = {name: sorted(_imports(p)[1]) for name, p in _modules().items() if _imports(p)[1]}
    assert not offenders, offenders


def test_no_module_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job (at most {MAX_LINES} lines each): {long}"


def test_long_functions_have_a_reason():
    found = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                found[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    unexplained = {f: n for f, n in found.items() if f not in LONG_FUNCTIONS}
    assert not unexplained, f"shorten, or give a reason in LONG_FUNCTIONS: {unexplained}"
    gone = set(LONG_FUNCTIONS) - set(found)
    assert not gone, f"no longer long (remove from LONG_FUNCTIONS): {sorted(gone)}"


@pytest.mark.parametrize("path", sorted((ROOT / "methods").glob("*.py")), ids=lambda p: p.name)
def test_a_built_in_method_imports_peftbench_api_alone(path):
    """The built-ins are the code a method author copies: they use the author's face only
    (another built-in method they extend is theirs to import)."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftbench"):
            used.add(node.module)
        elif isinstance(node, ast.Import):
            used |= {a.name for a in node.names if a.name.startswith("peftbench")}
    other = {m for m in used if m != "peftbench.api" and not m.startswith("peftbench.methods")}
    assert not other, other
    if path.name != "__init__.py":
        assert "peftbench.api" in used


def test_every_package_is_installed():
    """A package missing from pyproject's list installs from a checkout (editable) and is
    absent from a wheel: every folder with an __init__.py is listed."""
    listed = set(re.findall(r'"(peftbench[\w.]*)"', (ROOT / "pyproject.toml").read_text().split(
        "packages = [", 1)[1].split("]", 1)[0]))
    packages = {"peftbench." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE else "peftbench"
                for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, sorted(packages - listed)

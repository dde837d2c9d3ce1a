"""The package layout shows the architecture: no import circle among peftbench's modules, and
the core reaches methods only through the registry."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peftbench"


def _module_name(path: Path) -> str:
    """'sweep.grid' for peftbench/sweep/grid.py, 'sweep' for its __init__, 'cli' for cli.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(peftbench modules imported at run time, method modules imported) by one module, named
    as `_module_name` does ('sweep.spec'); imports under `if TYPE_CHECKING:` are annotations
    only and do not count."""
    tree = ast.parse(path.read_text())
    known = _modules()
    typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
    modules, methods = set(), set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.module.startswith("peftbench.methods"):
            methods.add(node.module)
        elif node.module.startswith("peftbench."):
            name = node.module.removeprefix("peftbench.")
            modules.add(name)
            modules |= {f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known}
        elif node.module == "peftbench":
            modules |= {a.name for a in node.names if a.name in known}
    return modules - {_module_name(path)}, methods


def test_no_import_circle():
    graph = {name: _imports(p)[0] for name, p in _modules().items()}
    circles = []

    def visit(start, node, path):
        for dep in graph.get(node, ()):
            if dep == start:
                circles.append(" -> ".join(path + [start]))
            elif dep not in path and len(path) < len(graph):
                visit(start, dep, path + [dep])

    for module in graph:
        visit(module, module, [module])
    assert not circles, circles[:3]


def test_the_core_imports_no_method_module():
    offenders = {name: sorted(_imports(p)[1]) for name, p in _modules().items() if _imports(p)[1]}
    assert not offenders, offenders

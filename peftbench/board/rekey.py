"""Carry a board's committed cells across an edit to a method file that cannot move a number.

A cell, a search entry and a trial-log row are keyed on their method file's digest, so any edit
to the file stales them. Some edits provably cannot change what the method computes: the
module's syntax tree with its import statements taken out is unchanged (comments and layout are
not in the tree; docstrings and every other statement are), and each name an import statement
binds, in every scope, is bound to the very same object as before (say `top_k`, now imported
from `peftbench.api`, which re-exports `peftbench.contract.selector.top_k`). For a method whose edit
passes both checks, `rekey` rewrites the key of every committed cell and search record the old
file made (and the cells' fingerprints in the board's tables, where values measured from masks
are kept by fingerprint) and appends the proof to the board's `rekeyed.json`; any other difference is refused,
naming it, and nothing is written. The old file is read from git (`git show REV:path`, read
only) and must hash to the digest its cells recorded.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import subprocess
from datetime import date
from pathlib import Path

from peftbench.core.errors import UsageError
from peftbench.core.files import write_json
from peftbench.sweep import spec

RECORDS = ("search.json", "carry.json", "per-budget.json")
TRIAL_LOGS = ("search-trials.json", "carry-trials.json", "per-budget-trials.json")
PROOFS = "rekeyed.json"


class _Imports(ast.NodeTransformer):
    """Takes import statements out of a tree and notes what each binds, by scope."""

    def __init__(self):
        self.scope: list[str] = []
        self.bound: list[tuple[str, str, str, str | None]] = []  # (scope, name, module, attribute)

    def _scoped(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Import(self, node):
        for alias in node.names:
            if alias.asname:
                self.bound.append((".".join(self.scope), alias.asname, alias.name, None))
            else:
                top = alias.name.split(".")[0]
                self.bound.append((".".join(self.scope), top, top, None))
        return None

    def visit_ImportFrom(self, node):
        if node.level:
            raise UsageError("a relative import cannot be resolved without the package: rekey "
                             "handles absolute imports only")
        for alias in node.names:
            if alias.name == "*":
                raise UsageError(f"`from {node.module} import *`: what it binds cannot be listed")
            self.bound.append((".".join(self.scope), alias.asname or alias.name, node.module, alias.name))
        return None


def _resolve(module: str, attribute: str | None):
    target = importlib.import_module(module)
    if attribute is None:
        return target
    if hasattr(target, attribute):
        return getattr(target, attribute)
    return importlib.import_module(f"{module}.{attribute}")


def _analyse(source: str) -> tuple[str, dict]:
    tree = ast.parse(source)
    imports = _Imports()
    body = ast.dump(imports.visit(tree), include_attributes=False)
    bindings: dict[tuple[str, str], object] = {}
    for scope, name, module, attribute in imports.bound:
        try:
            bindings[(scope, name)] = _resolve(module, attribute)
        except (ImportError, AttributeError) as err:
            raise UsageError(f"`{module}{'.' + attribute if attribute else ''}` (bound to {name!r}"
                             f"{' in ' + scope if scope else ''}) cannot be imported here: {err}") from None
    return body, bindings


def prove_same_code(old: str, new: str) -> str:
    """A sentence saying why the two sources compute the same, or a UsageError naming the first
    difference: the trees without imports must be equal and every binding the same object."""
    old_body, old_bound = _analyse(old)
    new_body, new_bound = _analyse(new)
    if old_body != new_body:
        raise UsageError("the module changed beyond its import statements (its syntax tree without "
                         "imports differs): only an edit of imports, comments or layout can be "
                         "carried; run the method's cells again")
    if old_bound.keys() != new_bound.keys():
        gone = sorted(set(old_bound) - set(new_bound)) + sorted(set(new_bound) - set(old_bound))
        scope, name = gone[0]
        raise UsageError(f"the imports bind other names than before (e.g. {name!r}"
                         f"{' in ' + scope if scope else ''}): not the same code")
    for key in old_bound:
        if old_bound[key] is not new_bound[key]:
            scope, name = key
            raise UsageError(f"{name!r}{' in ' + scope if scope else ''} is bound to another object "
                             f"than before ({old_bound[key]!r} -> {new_bound[key]!r}): not the same code")
    return (f"syntax tree without imports unchanged; {len(new_bound)} imported names bound to the "
            "same objects")


def _old_source(path: Path, rev: str) -> bytes:
    done = subprocess.run(["git", "-C", str(path.parent), "show", f"{rev}:./{path.name}"],
                          capture_output=True)
    if done.returncode:
        raise UsageError(f"git show {rev}:{path.name} failed ({done.stderr.decode().strip()[:200]}): "
                         "give --since a revision where the cells' method file exists")
    return done.stdout


def rekey(name: str, since: str, log=print) -> dict:
    """Re-key board `name`'s cells and search records of every method whose file changed since
    `since` by an edit `prove_same_code` accepts; returns {method: proof}. Refuses (writing
    nothing) when any changed method's edit is not provably neutral."""
    from peftbench.board.paths import find
    from peftbench.contract import registry
    from peftbench.core.files import digest
    from peftbench.sweep import cellstore
    from peftbench.training.identity import code_identity

    folder = find(name)
    if spec.load_spec(folder / "spec.yaml").frozen is not None:
        raise UsageError(f"board {name!r} is frozen: its cells are read back as the version it names, never re-keyed")
    cells = cellstore.committed_cells(folder)
    records = {f: json.loads((folder / f).read_text()) for f in RECORDS + TRIAL_LOGS if (folder / f).is_file()}
    old_digests: dict[str, set[str]] = {}
    for cell in cells:
        old_digests.setdefault(cell.method, set()).add(cell.record["config"]["code"]["source"])
    for file, record in records.items():
        for key, value in record.items():
            method = key.split("/")[1]
            entries = value if isinstance(value, list) else [value]
            for entry in entries:
                if isinstance(entry, dict) and entry.get("code"):
                    old_digests.setdefault(method, set()).add(entry["code"])
    proofs, renames = {}, {}
    for method, digests in sorted(old_digests.items()):
        if method not in registry.methods():
            continue
        current = code_identity(method, strict=False)["source"]
        stale = digests - {current}
        if not stale:
            continue
        if registry.methods()[method].package != "peftbench":
            raise UsageError(f"method {method!r} comes from the plugin {registry.methods()[method].package!r}: "
                             "rekey proves built-in method files only")
        path = Path(inspect.getfile(registry.get(method)))
        old = _old_source(path, since)
        old_digest = hashlib.sha256(old).hexdigest()
        if stale != {old_digest}:
            raise UsageError(f"method {method!r}: its records were made with source(s) "
                             f"{sorted(d[:12] for d in stale)}, but {path.name} at {since} is "
                             f"{old_digest[:12]}: give the revision the records were made at")
        proofs[method] = {"file": path.name, "from": old_digest, "to": current, "since": since,
                          "proof": prove_same_code(old.decode(), path.read_text())}
        renames[old_digest] = current
    if not proofs:
        log(f"{name}: no record is keyed on a method file that changed since {since}; nothing to re-key")
        return {}
    rewritten = {"cells": 0, "search records": 0, "tables": 0}
    fingerprints = {}  # old cell fingerprint -> new
    for cell in cells:
        config = cell.record["config"]
        if config["code"]["source"] in renames and cell.method in proofs:
            config["code"]["source"] = renames[config["code"]["source"]]
            fingerprints[cell.fingerprint] = digest(config)
            write_json(cell.folder / cellstore.CELL_FILE, {**cell.record, "config": config, "fingerprint": digest(config)}, newline=True)
            rewritten["cells"] += 1
    for table in sorted(folder.glob("*.csv")):  # values kept by cell fingerprint (mask overlap, score
        text = table.read_text()                 # correlation: measured where the masks were)
        new_text = text
        for old_print, new_print in fingerprints.items():
            new_text = new_text.replace(old_print, new_print)
        if new_text != text:
            table.write_text(new_text)
            rewritten["tables"] += 1
    for file, record in records.items():
        changed = False
        for key, value in record.items():
            if key.split("/")[1] not in proofs:
                continue
            for entry in value if isinstance(value, list) else [value]:
                if isinstance(entry, dict) and entry.get("code") in renames:
                    entry["code"] = renames[entry["code"]]
                    changed = True
                    rewritten["search records"] += 1
        if changed:
            write_json(folder / file, record, newline=True)
    kept = json.loads((folder / PROOFS).read_text()) if (folder / PROOFS).is_file() else []
    kept.append({"date": date.today().isoformat(), "methods": proofs, "rewritten": rewritten})
    write_json(folder / PROOFS, kept, newline=True)
    for method, proof in proofs.items():
        log(f"{name}: {method} ({proof['file']} {proof['from'][:12]} -> {proof['to'][:12]}): {proof['proof']}")
    log(f"{name}: re-keyed {rewritten['cells']} cells, {rewritten['search records']} search records and "
        f"the cell fingerprints in {rewritten['tables']} tables; the proof is in {folder / PROOFS}")
    return proofs

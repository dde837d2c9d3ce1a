"""Reading the YAML that users write (task specs, study specs), without PyYAML's two traps:

- a key written twice is an error naming both lines (PyYAML silently keeps the last, so a
  method listed twice with different parameters would run once, with the second set);
- `1e-3` is a float, as in YAML 1.2 and JSON (PyYAML follows YAML 1.1, which needs `1.0e-3` and
  reads `1e-3` as the *string* '1e-3', which a strict schema then refuses).
"""

from __future__ import annotations

import re

import yaml

FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


class DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class TooLargeError(yaml.MarkedYAMLError):
    pass


MAX_EXPANDED = 100_000  # values a spec may hold once its aliases are expanded


class SpecLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate keys refused (`load` also bounds how large
    the document is once its aliases are expanded)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats: the implicit resolver for '1e-3' and friends, ahead of the string fallback.
SpecLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for first in "-+0123456789.":
    SpecLoader.yaml_implicit_resolvers.setdefault(first, [])
    SpecLoader.yaml_implicit_resolvers[first] = [
        (tag, regexp) for tag, regexp in SpecLoader.yaml_implicit_resolvers[first]
        if tag != "tag:yaml.org,2002:float"]
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT, list("-+0123456789."))
# integers must still win over floats for '3': re-add the int resolver after the float one
for first in "-+0123456789":
    resolvers = SpecLoader.yaml_implicit_resolvers[first]
    ints = [r for r in resolvers if r[0] == "tag:yaml.org,2002:int"]
    SpecLoader.yaml_implicit_resolvers[first] = ints + [r for r in resolvers if r[0] != "tag:yaml.org,2002:int"]


def _expanded(node, memo: dict) -> int:
    """How many values `node` stands for with every alias expanded (an alias is the same node
    object again, so a few lines of nested aliases can stand for billions: "billion laughs")."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a node that contains itself counts once here; the constructor refuses it
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded(k, memo) + _expanded(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def load(text: str):
    """Parse YAML text with `SpecLoader`; raises yaml.YAMLError (with marks) on bad input, and
    on a document that stands for more than MAX_EXPANDED values once its aliases are expanded
    (which would take minutes and gigabytes to print or compare)."""
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded(node, {})
        if size > MAX_EXPANDED:
            raise TooLargeError("while expanding aliases", None,
                                    f"the document stands for {size:,} values once its aliases (*name) are "
                                    f"expanded; at most {MAX_EXPANDED:,}", node.start_mark)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def where(err: yaml.YAMLError, path) -> str:
    """'path:line: problem' for a YAML error."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{path}:{mark.line + 1}: {problem}" if mark else f"{path}: {problem}"


def dump_flow(obj) -> str:
    """`obj` as one line of flow-style YAML (a list item appended to a spec by hand keeps the
    rest of the file, comments included, as it was)."""
    return yaml.safe_dump(obj, default_flow_style=True, sort_keys=False, width=10**9).strip()

"""Tables of named things a third party may add (metrics, preprocessors): the built-ins, then
every installed entry point of the table's group, one record each.

A plugin that fails to import, or whose object is not the table's record type, fails alone:
the other names still work and asking for it says why. A name claimed twice (a plugin reusing
a built-in's name, or two plugins) is refused by name, never a silent replacement. The methods'
registry (`peftbench.contract.registry`) follows the same rules with its own loader.
"""
from __future__ import annotations

import difflib
from functools import cached_property
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from peftbench.core.errors import UsageError

T = TypeVar("T")


class PluginTable(Generic[T]):
    """Named `record_type` instances: `builtins`, then the entry points of `group`
    (`[project.entry-points."<group>"] name = "package.module:OBJECT"`)."""

    def __init__(self, group: str, kind: str, record_type: type, builtins: list[T]):
        self.group, self.kind, self.record_type = group, kind, record_type
        self._builtins = {b.name: b for b in builtins}

    @cached_property
    def _loaded(self) -> tuple[dict[str, T], dict[str, str]]:
        table, errors = dict(self._builtins), {}
        for ep in entry_points(group=self.group):
            package = ep.dist.name if ep.dist is not None else "?"
            if ep.name in table or ep.name in errors:
                errors[ep.name] = (f"the {self.kind} name {ep.name!r} is claimed twice (one of them "
                                   f"by {ep.value} in package {package}): rename one entry point")
                table.pop(ep.name, None)
                continue
            try:
                obj = ep.load()
            except BaseException as err:  # noqa: BLE001  a broken plugin fails alone
                errors[ep.name] = f"{ep.value} in package {package} failed to import: {type(err).__name__}: {err}"
                continue
            if not isinstance(obj, self.record_type) or getattr(obj, "name", None) != ep.name:
                errors[ep.name] = (f"{ep.value} in package {package} is not a {self.record_type.__name__} "
                                   f"named {ep.name!r}")
                continue
            table[ep.name] = obj
        return table, errors

    def names(self) -> list[str]:
        """Every usable name (built-in or plugin), in registration order."""
        return list(self._loaded[0])

    def __contains__(self, name: str) -> bool:
        return name in self._loaded[0]

    def get(self, name: str) -> T:
        """The record named `name`; a UsageError saying why a plugin failed, or which names
        are allowed."""
        table, errors = self._loaded
        if name in table:
            return table[name]
        if name in errors:
            raise UsageError(f"{self.kind} {name!r}: {errors[name]}")
        hint = difflib.get_close_matches(name, table, n=1)
        raise UsageError(f"{self.kind} {name!r} is unknown" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f": allowed {', '.join(table)}")

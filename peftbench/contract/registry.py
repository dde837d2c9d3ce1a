"""The method registry: every method, built-in or third-party, is an entry point.

Built-in methods are declared in peftbench's own `pyproject.toml` under the entry-point group
`peftbench.methods`, exactly as a plugin package declares its own, so both take one path:

    [project.entry-points."peftbench.methods"]
    my-method = "my_package.my_module:MySelector"

A plugin that fails to import is reported by name with its error; the others still work. A name
registered twice (a plugin reusing a built-in's name, or two plugins) is an error naming both
packages, never a silent replacement.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from peftbench.contract.selector import Selector, resolve_params, validate_params
from peftbench.core.errors import UsageError

GROUP = "peftbench.methods"


@dataclass
class MethodInfo:
    name: str
    package: str
    target: str  # "module:Class"
    selector_class: type[Selector] | None
    error: str | None

    @property
    def description(self) -> str:
        if self.selector_class is None:
            return f"[failed to load: {self.error}]"
        return self.selector_class.description or (self.selector_class.__doc__ or "").strip().split("\n")[0]


def _load(ep: EntryPoint) -> MethodInfo:
    package = ep.dist.name if ep.dist is not None else "?"
    try:
        cls = ep.load()
    except BaseException as err:  # noqa: BLE001  a plugin that raises, exits or interrupts at import
        # fails alone: it must not stop the built-ins or pass for the user's Ctrl-C
        return MethodInfo(ep.name, package, ep.value, None, f"{type(err).__name__} at import: {err}")
    if not (isinstance(cls, type) and issubclass(cls, Selector)):
        return MethodInfo(ep.name, package, ep.value, None, f"{ep.value} is not a Selector subclass")
    return MethodInfo(ep.name, package, ep.value, cls, None)


def _claims() -> dict[str, list[EntryPoint]]:
    """The registered entry points by method name (nothing loaded). Reading them parses every
    installed distribution's metadata, so they are kept until the import path or a folder on
    it changes (an install or uninstall writes there: importlib.metadata's own test)."""
    key = (entry_points, tuple(sys.path), tuple(_stat(p) for p in sys.path))
    if _CLAIMS.get("key") != key:
        claims: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=GROUP):
            claims.setdefault(ep.name, []).append(ep)
        _CLAIMS.update(key=key, claims=claims)
    return {name: list(eps) for name, eps in _CLAIMS["claims"].items()}


_CLAIMS: dict = {}


def _stat(path: str) -> tuple[int, int, int] | None:
    """Which folder `path` is (the working folder for "") and when it last changed."""
    try:
        st = os.stat(path or ".")
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a method's name becomes part of run folder names


def _info(name: str, eps: list[EntryPoint]) -> MethodInfo:
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        return MethodInfo(name, _package(eps[0]), eps[0].value, None,
                          f"the entry-point name {name!r} is not file-safe (letters, digits, "
                          "'.', '_', '-'; it names run folders): rename the entry point")
    if len({(ep.value, _package(ep)) for ep in eps}) > 1:  # no winner: either could be meant
        eps = sorted(eps, key=lambda ep: (_package(ep), ep.value))  # the same words whatever the path order
        who = "; ".join(f"{ep.value} in package {_package(ep)}" for ep in eps)
        return MethodInfo(name, ", ".join(_package(ep) for ep in eps), eps[0].value, None,
                          f"the name {name!r} is registered more than once ({who}): "
                          "uninstall one, or rename its entry point")
    return _load(eps[0])


def methods() -> dict[str, MethodInfo]:
    """Every registered method by name, loaded (or with its load error), sorted by name."""
    return dict(sorted((name, _info(name, eps)) for name, eps in _claims().items()))


def _package(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def info(name: str) -> MethodInfo:
    """The registration of method `name` (its package, class or load error); a UsageError
    naming the allowed names if none. Only that method's module is imported (lazily, as
    lm-eval's registry): another plugin that is broken, slow or exits at import cannot stop or
    delay it."""
    available = _claims()
    if name.lower() not in available:
        hint = difflib.get_close_matches(name.lower(), available, n=1)
        raise UsageError(f"unknown method {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f": allowed {', '.join(sorted(available))}")
    return _info(name.lower(), available[name.lower()])


def get(name: str) -> type[Selector]:
    """The Selector class registered as `name` (`info`); a UsageError if it is unknown, or
    registered twice, or failed to load."""
    found = info(name)
    if found.selector_class is None:
        if "registered more than once" in (found.error or ""):
            raise UsageError(f"method {name!r}: {found.error}")
        raise UsageError(f"method {name!r} from package {found.package} failed to load: {found.error}")
    return found.selector_class


def resolved_params(name: str, params: dict) -> dict:
    """`contract.selector.resolve_params` of the method registered as `name`."""
    return resolve_params(get(name), name, params)


def create(name: str, **params) -> Selector:
    """An instance of method `name` with hyper-parameters `params`, validated against its
    `__init__` signature and annotations first (`contract.selector.validate_params`)."""
    cls = get(name)
    params = validate_params(cls, name, params)
    try:
        return cls(**params)
    except TypeError as err:
        raise UsageError(f"bad parameters for method {name!r}: {err}") from None

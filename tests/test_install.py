"""The install a fresh machine gets: README, CI and tox install from one constraints file that
pins every dependency inside pyproject.toml's ranges, so a new pytest or pandas release cannot
turn a user's install red while CI stays green."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """constraints.txt's pins that apply to this interpreter, by canonical name."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _direct() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("test", "postgres", "bench"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("req", _direct(), ids=str)
def test_every_dependency_is_pinned_inside_its_declared_range(req):
    pins = _pins()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} has no pin in constraints.txt: run `tox -e lock`"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}: run `tox -e lock`")


def test_readme_ci_and_tox_install_from_the_constraints():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme, "the README's test command and .ci/run's last line differ"
    assert "pip install -c constraints.txt -e \".[test]\"" in ci
    assert "-c constraints.txt -e . &&" in readme  # the quickstart install too
    assert "-c constraints.txt" in (ROOT / "tox.ini").read_text()


@pytest.mark.parametrize("name", ["torch", "transformers", "tokenizers", "numpy", "scipy", "pandas", "pytest"])
def test_the_running_install_is_the_pinned_one(name):
    """The libraries that move numbers (and the test runner) are the pinned versions: a
    suite run outside the constrained install says so instead of passing on other versions."""
    try:
        installed = version(name)
    except PackageNotFoundError:  # pragma: no cover - every one is a dependency
        pytest.fail(f"{name} is not installed")
    pinned = _pins()[canonicalize_name(name)]
    assert installed.split("+")[0] == pinned, (
        f"{name} {installed} is installed, constraints.txt pins {pinned}: "
        "pip install -c constraints.txt -e \".[test]\"")


def test_the_package_version_is_peftbench_version():
    """One version: the installed distribution's is `peftbench.__version__` (it keys a study's
    cells), read by setuptools from the source, never a second number in pyproject.toml."""
    import peftbench

    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "peftbench.__version__"}
    assert peftbench.__version__.count(".") == 2

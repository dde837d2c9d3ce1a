"""Identities of what determines a result: the model's weights, a method's code, the software.

A name is not an identity: a checkpoint saved again at the same path, or a method edited in
place, keeps its name and changes its results. The score cache (`peftbench.training.cache`) and a
study's cells (`peftbench.sweep`) key on these fingerprints instead, so a changed input is a
miss (or a refused spec), never a silent reuse.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from peftbench.core.files import digest, file_digest

# peftbench's code on the path from (model, data, selection) to a number, as packages and files:
# a change in one of them can change results, so its source is part of every method's code identity.
RESULT_PATH = ("data", "modeling", "contract", "training/trainer.py", "training/evaluation.py",
               "training/experiment.py")


def model_fingerprint(model: str) -> str:
    """The content of a model: every file of a local folder hashed (weights, config,
    tokenizer); for a hub id, the id at the commit the local hub cache resolves to."""
    from peftbench.modeling.models import resolve_model_path

    path = Path(resolve_model_path(model))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return digest({str(p.relative_to(path)): file_digest(p) for p in files})
    try:
        from transformers import AutoConfig

        commit = getattr(AutoConfig.from_pretrained(model), "_commit_hash", None)
    except (OSError, ValueError):
        commit = None
    return digest({"hub": model, "commit": commit})


def distribution_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def code_identity(method: str, strict: bool = True) -> dict:
    """A method's code: its distribution and version, a hash of its module's source, and
    peftbench's identity: with `strict`, a hash of its result-path modules (`RESULT_PATH`: the
    score cache, where a spurious miss only costs a recomputation); without, its version (a
    study's cells, so that a change that cannot move a number, such as input validation, does
    not strand a finished study: bump `peftbench.__version__` with any change that can)."""
    import peftbench
    from peftbench.contract import registry

    info = registry.info(method)
    cls = info.selector_class or registry.get(method)  # get: the error saying why it did not load
    return {"method": method.lower(), "distribution": info.package,
            # peftbench's own version from its source, not from install metadata, which an
            # editable install leaves at the version it was installed with
            "version": peftbench.__version__ if info.package == "peftbench" else distribution_version(info.package),
            "source": source_digest(cls, info.package),
            "peftbench": peftbench_identity() if strict else peftbench.__version__}


def source_digest(cls: type, package: str) -> str:
    """The source a method's results depend on. A built-in: its own module file (the rest of
    peftbench is covered by `peftbench_identity` / its version). A plugin: every Python file of
    its distribution (as installed, from its RECORD) and of its top-level package (an editable
    install lists none), so an edit to a helper module is a new identity, not a stale cache."""
    import sys

    if package == "peftbench":
        return file_digest(inspect.getfile(cls))
    files: dict[str, str] = {}
    try:
        from importlib.metadata import distribution

        dist = distribution(package)
        for entry in dist.files or []:
            path = Path(dist.locate_file(entry))
            if str(entry).endswith(".py") and path.is_file():
                files[str(entry)] = file_digest(path)
    except PackageNotFoundError:
        pass
    top = sys.modules[cls.__module__.split(".")[0]]
    roots = [Path(r) for r in getattr(top, "__path__", [])]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            files[f"{top.__name__}/{path.relative_to(root).as_posix()}"] = file_digest(path)
    if not roots:
        files[Path(inspect.getfile(cls)).name] = file_digest(inspect.getfile(cls))
    return digest(files)


@lru_cache(maxsize=None)
def peftbench_identity() -> str:
    import peftbench

    root = Path(peftbench.__file__).parent
    return digest({"version": peftbench.__version__,
                   **{str(f.relative_to(root)): file_digest(f) for part in RESULT_PATH
                      for f in (sorted((root / part).rglob("*.py")) if (root / part).is_dir() else [root / part])}})


def environment() -> dict:
    """Library versions that change numbers (kernels, tokenisation, initialisation)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def machine_fingerprint(device: str = "cpu") -> dict:
    """What decides whether a re-run can match a committed number to the last digit: the
    libraries that compute it, the device (the CPU model: its kernels pick the summation
    order) and the thread count (it splits reductions)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = f"cpu: {line.split(':', 1)[1].strip()}"
                    break
        except OSError:
            pass
    return {**environment(), "device": name, "threads": torch.get_num_threads()}

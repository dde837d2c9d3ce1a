"""The one way peftbench reads a `.pt` file back: tensors and plain containers, never code.

`torch.load(weights_only=False)` unpickles arbitrary objects, so a crafted file in a folder the
user points `cache list` or `report` at could run a command. Everything peftbench writes in a
`.pt` (score-cache entries, saved masks) is tensors, numbers, strings, lists and dicts, which
`weights_only=True` reads; anything else is refused as unreadable, never executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO

from peftbench.core.errors import UsageError


class UnsafeFile(UsageError):
    """A `.pt` file that holds more than tensors and plain containers (or is not one at all)."""


def load_pt(source: str | Path | IO[bytes]):
    """The tensors and plain containers in `source`; `UnsafeFile` for anything else."""
    import torch
    from torch.torch_version import TorchVersion  # a str subclass, in caches written before 0.4

    try:
        with torch.serialization.safe_globals([TorchVersion]):
            return torch.load(source, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:  # what weights_only refuses: globals, reducers
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFile(f"{source}: not a plain tensor file ({first[:160]})") from None

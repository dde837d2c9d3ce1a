"""Files: content digests, and the one way peftbench writes a file.

Every file peftbench writes that another process or a later run reads (run records, cells,
search records, score-cache entries, trained values) goes through `write_atomic`: a unique
temporary file beside the target, then a rename. A crash, a full disk or a reader at the
same moment never sees half a file, and two writers never share a temporary name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable


def digest(obj) -> str:
    """SHA-256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes; memoised per (path, size, mtime) so a sweep hashes each once."""
    st = os.stat(path)
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def is_temporary_of(name: str, target: str) -> bool:
    """Whether a file named `name` is `write_atomic`'s temporary file for `target` (its default
    `<target>.<random>.tmp`): another process's write in progress, not a user's file."""
    return name.startswith(target + ".") and name.endswith(".tmp")


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], None],
                 prefix: str | None = None) -> Path:
    """Write `content` (text, bytes, or a function that writes a given path, e.g. torch.save)
    to `path` through a temporary file in the same folder, then rename it into place.
    The temporary file is `<name>.<random>.tmp`, or `<prefix><random>.tmp` (a folder whose
    files are checked by name, such as the score cache, says which temporary names are its own)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix or f"{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj, newline: bool = False) -> Path:
    """`obj` as indented JSON, atomically (`write_atomic`); values JSON cannot hold as text."""
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + ("\n" if newline else ""))

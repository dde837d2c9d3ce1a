""""This folder is ours": the one guard before peftbench deletes or overwrites anything.

A folder peftbench creates for a sweep, a score cache, a report or the leaderboards' root gets
a marker file (`.peftbench`, JSON naming the folder's kind). A command that deletes or
overwrites files in a folder first asks `require` (read-only commands) or `claim` (commands
that write): a folder with another kind's marker, or a non-empty folder without a marker whose
files do not look like that kind's (`adopt`, for folders written before markers existed), is
refused with one line, before anything is written. So `cache clear ~/checkpoints` deletes
nothing, and a board given as a path never rewrites the `index.html` of the folder above it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from peftbench.core.errors import UsageError

MARKER = ".peftbench"


MARKER_MAX_BYTES = 4096


def kind_of(folder: Path) -> str | None:
    """The kind in `folder`'s marker, or None (no marker, or one that cannot be read). Only a
    small regular file is read: a marker that is a FIFO would block the read, a symlink to
    /dev/zero would fill memory, and a symlink could name a file peftbench did not write."""
    import stat

    path = Path(folder) / MARKER
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MARKER_MAX_BYTES:
            return None
        return json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _entries(folder: Path) -> list[str]:
    """The names in `folder`, less a marker another process is writing (`_mark`'s temporary
    file), sorted."""
    from peftbench.core.files import is_temporary_of

    return sorted(p.name for p in folder.iterdir() if not is_temporary_of(p.name, MARKER))


def _mark(folder: Path, kind: str) -> None:
    """The marker, written whole (`write_atomic`): workers started together claim one folder at
    once, and a marker seen half-written (empty) read as "no marker" and refused the folder."""
    from peftbench import __version__
    from peftbench.core.files import write_atomic

    write_atomic(folder / MARKER, json.dumps({"kind": kind, "written_by": f"peftbench {__version__}"}) + "\n")


def check(folder: Path, kind: str, adopt: Callable[[Path], bool] | None, what: str) -> bool:
    """True when `folder` is a `kind` folder by its marker or (no marker) by `adopt`; else a
    UsageError. False: an empty or missing folder, free to take. Writes nothing: a command
    checks its output folder with this before its slow work, and `claim`s it after."""
    found = kind_of(folder)
    if found == kind:
        return True
    if found is not None:
        raise UsageError(f"{what} {folder} is a peftbench {found} folder, not a {kind} folder: "
                         "give another folder")
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} is a file, not a folder")
    entries = _entries(folder)
    if not entries:
        return False
    if adopt is not None and adopt(folder):
        return True
    example = entries[0]
    raise UsageError(f"{what} {folder} holds files peftbench did not write (e.g. {example!r}) and "
                     f"no {MARKER} marker: give an empty or new folder, so nothing of yours is "
                     "overwritten or deleted")


def require(folder: str | Path, kind: str, adopt: Callable[[Path], bool] | None = None,
            what: str = "folder") -> Path:
    """`folder` as a `kind` folder, for a command that reads or deletes there; writes nothing."""
    folder = Path(folder)
    entries = _entries(folder) if folder.is_dir() and kind_of(folder) is None else []
    if entries and not (adopt and adopt(folder)):
        raise UsageError(f"{what} {folder} is not a peftbench {kind} folder (no {MARKER} marker, and it "
                         f"holds files that are not a {kind}'s, e.g. {entries[0]!r}): nothing was touched")
    if not check(folder, kind, adopt, what):
        raise UsageError(f"{what} {folder} is not a peftbench {kind} folder (missing or empty)")
    return folder


def claim(folder: str | Path, kind: str, adopt: Callable[[Path], bool] | None = None,
          what: str = "folder") -> Path:
    """`folder` created if needed and marked as a `kind` folder, for a command that writes
    there; refused when it is another kind's, or holds files that are not a `kind` folder's."""
    folder = Path(folder)
    ours = check(folder, kind, adopt, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not ours or kind_of(folder) is None:
            _mark(folder, kind)
        tempfile.TemporaryFile(dir=folder).close()  # writable, before any work is done for it
    except OSError as err:
        raise UsageError(f"{what} {folder}: cannot write there: {err.strerror or err}") from None
    return folder

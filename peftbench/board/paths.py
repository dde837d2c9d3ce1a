"""Where boards live: the leaderboards folder, a board by name, and the machine line a board prints."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from peftbench.core import ownership
from peftbench.core.errors import UsageError


def leaderboards_root() -> Path:
    """$PEFTBENCH_LEADERBOARDS, else ./leaderboards, else the repository's leaderboards/."""
    if os.environ.get("PEFTBENCH_LEADERBOARDS"):
        return Path(os.environ["PEFTBENCH_LEADERBOARDS"])
    here = Path("leaderboards")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "leaderboards"


def shared_root(folder: Path) -> Path | None:
    """The folder above a board when it is a leaderboards root (marked `leaderboards`, as the
    repository's is, or named by $PEFTBENCH_LEADERBOARDS): its index.html and plotly.min.js are
    peftbench's to rewrite. None for a board anywhere else, whose parent folder is the user's
    and is never written."""
    parent = Path(folder).resolve().parent
    ours = ownership.kind_of(parent) == "leaderboards" or parent == leaderboards_root().resolve()
    return parent if ours else None


def find(name: str) -> Path:
    folder = Path(name) if Path(name).is_dir() else leaderboards_root() / name
    if not (folder / "spec.yaml").is_file():
        root = leaderboards_root()
        known = sorted(p.name for p in root.iterdir() if (p / "spec.yaml").is_file()) if root.is_dir() else []
        raise UsageError(f"leaderboard {name!r} not found (no {folder / 'spec.yaml'}); known: {known}")
    linked = [p for p in [folder, *folder.iterdir(), *((folder / "runs").iterdir() if (folder / "runs").is_dir()
                                                       and not (folder / "runs").is_symlink() else [])]
              if p.is_symlink()]
    if linked:  # git carries symlinks: a board's files must be its own, or a rewrite writes (and
        # deletes) through them into another board or any file the link names
        raise UsageError(f"board {name!r}: {linked[0]} is a symbolic link (to {os.readlink(linked[0])}); "
                         "peftbench writes and deletes inside a board folder, so every file and folder "
                         "there (committed cells included) must be a real one: restore a copy in place "
                         "of the link")
    foreign = [f for f, head in (("README.md", "# Leaderboard "), ("index.html", "<!DOCTYPE html><html><head>"))
               if (folder / f).is_file() and not (folder / f).read_text(errors="replace").startswith(head)]
    if foreign:  # peftbench rewrites both: a user's files of those names in a folder holding a spec stay theirs
        raise UsageError(f"board {name!r}: {folder / foreign[0]} was not written by peftbench (a board's "
                         f"{foreign[0]} is, and every board command rewrites it): move your file, or give "
                         "the spec its own folder")
    return folder


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{device}; Python {platform.python_version()}, torch {torch.__version__}")

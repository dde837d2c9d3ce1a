"""Where a study lives: Optuna storages (RDB with a heartbeat, or a journal file), the study
itself, read-only opening for status and reports, reclaiming the trials of dead local workers,
and the sweep's output folder."""

from __future__ import annotations

import json
import os
import socket
import warnings
from contextlib import closing, nullcontext
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from peftbench.core import ownership
from peftbench.core.errors import UsageError
from peftbench.sweep.spec import StudySpec

STORAGE_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "mysql://",
                   "mysql+pymysql://", "journal:")


def open_storage(spec: StudySpec):
    """An Optuna storage for the spec's URL: RDB (with heartbeat) or `journal:<path>`.

    The journal storage has no heartbeat: a killed worker's trial would stay RUNNING forever.
    Its way out: a worker that finds only RUNNING trials fails those whose worker process is
    gone (same host, PID no longer alive; `reclaim_dead_local_trials`), so one machine resumes
    after kill -9. Across machines use an RDB storage."""
    url = spec.storage_url
    if not url.startswith(STORAGE_SCHEMES):
        raise UsageError(f"storage {url!r} has an unknown scheme: allowed "
                         f"{', '.join(s + '...' for s in STORAGE_SCHEMES)}")
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):])
        _check_not_foreign(path, url)
        _check_journal_end(path, url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise UsageError(f"storage {url!r}: cannot open the journal file: {err.strerror or err}") from None
    if url.startswith("sqlite:///"):
        _check_not_foreign(Path(url[len("sqlite:///"):]), url)
        try:
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"storage {url!r}: cannot create its folder: {err.strerror or err}") from None
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else \
        {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    # two processes creating a fresh SQLite schema at once collide (alembic_version): serialise
    lock = FileLock(url[len("sqlite:///"):] + ".lock") if url.startswith("sqlite:///") else nullcontext()
    try:
        with lock, warnings.catch_warnings():  # heartbeat and its retry callback are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=spec.heartbeat_interval,
                              grace_period=spec.grace_period,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except (ImportError, ModuleNotFoundError) as err:
        raise UsageError(f"storage {url!r} needs a database driver: {err} "
                         "(PostgreSQL: pip install 'peftbench[postgres]')") from None
    except (SQLAlchemyError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot open storage {url!r}: {first[:300]}") from None


OPTUNA_TABLES = {"studies", "trials", "version_info"}  # present in every Optuna RDB schema


def _check_not_foreign(path: Path, url: str) -> None:
    """A storage file that exists must be Optuna's before anything is written to it: a SQLite
    database with tables but not Optuna's (an application's), a file that is not SQLite at all,
    or a journal whose first line is not an Optuna journal record would otherwise get Optuna's
    tables or records written into it. Read-only; an empty or missing file is free to take."""
    import sqlite3
    import stat

    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as err:
        raise UsageError(f"storage {url!r}: cannot read {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"storage {url!r}: {path} is not a regular file")
    if st.st_size == 0:
        return
    if url.startswith("journal:"):
        with open(path, "rb") as handle:
            first = handle.readline(1 << 20)
        try:
            record = json.loads(first)
            ours = isinstance(record, dict) and "op_code" in record
        except ValueError:
            ours = False
        if not ours:
            raise UsageError(f"storage {url!r}: {path} is not an Optuna journal (its first line is not a "
                             "journal record): give a new file, so nothing of yours is written into")
        return
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise UsageError(f"storage {url!r}: {path} is not a SQLite database ({err}): give a new file") from None
    if tables and not OPTUNA_TABLES <= tables:
        raise UsageError(f"storage {url!r}: {path} is a SQLite database with tables that are not an Optuna "
                         f"study's (e.g. {sorted(tables)[0]!r}): give a new file, so Optuna's tables are not "
                         "created inside someone else's database")


def _check_journal_end(path: Path, url: str) -> None:
    """A journal whose last line was cut (a crash mid-write) is refused before any command
    appends to it: the next record would be glued onto the cut one, and Optuna could not read
    the file again. The user decides what to keep; nothing is repaired behind their back."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)
    except FileNotFoundError:
        return
    except OSError as err:
        raise UsageError(f"storage {url!r}: cannot read the journal file: {err.strerror or err}") from None
    if last != b"\n":
        raise UsageError(f"storage {url!r}: the journal's last line is cut (a write was interrupted); "
                         f"remove that partial last line of {path} (or restore a copy) and run again")


def uses_heartbeat(spec: StudySpec) -> bool:
    """Whether the spec's storage has a heartbeat: `open_storage` gives every RDB storage one,
    the journal storage has none (known from the URL, not from Optuna's private helper)."""
    return not spec.storage_url.startswith("journal:")


def reclaim_dead_local_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker ran on this host and whose process is gone (the journal
    storage's stand-in for a heartbeat); returns how many. Their cells are queued again."""
    host, failed = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        # Optuna has no public call to annotate a trial another process owns (optuna/optuna#2987:
        # a Trial object needs the storage's private trial id); the state goes through `tell`
        study._storage.set_trial_user_attr(t._trial_id, "failure", f"worker {worker} is gone")
        study.tell(t.number, state=TrialState.FAIL)
        failed += 1
    return failed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NotStarted(UsageError):
    """A read-only command on a study that has no storage or no study yet."""


def open_study(spec: StudySpec, storage=None, read_only: bool = False) -> optuna.Study:
    """The spec's study, created if missing; `read_only` (status, reports): loaded, never
    created or written, a UsageError when there is none yet."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if read_only:
        url = spec.storage_url
        local = url[len("sqlite:///"):] if url.startswith("sqlite:///") else \
            url[len("journal:"):] if url.startswith("journal:") else None
        try:
            if storage is None and local is not None and not Path(local).is_file():
                raise KeyError(spec.name)  # opening it would create it
            return optuna.load_study(study_name=spec.name, storage=storage or open_storage(spec))
        except KeyError:
            raise NotStarted(f"study {spec.name!r} has not started in {url}: nothing to show "
                             f"(start it: peftbench sweep SPEC)") from None
    study = optuna.create_study(study_name=spec.name, storage=storage or open_storage(spec),
                                directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["test_metric", "trainable"])
    return study


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    return out


SWEEP_FILES = ("study.db", "scores", "search-runs", ".enqueue.lock")  # names only a sweep writes


def claim_out(spec: StudySpec) -> Path:
    """The sweep's output folder, made and marked as peftbench's (`peftbench.core.ownership`) before
    anything is written there; a folder holding someone else's files is refused."""
    def looks_like_sweep(folder: Path) -> bool:  # a folder from before markers; never a board's
        return not (folder / "spec.yaml").exists() and any((folder / n).exists() for n in SWEEP_FILES)

    return ownership.claim(spec.out, "sweep", looks_like_sweep, what=f"study {spec.name!r} output folder")

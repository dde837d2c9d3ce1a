"""The `peftbench` entry point: dispatch, and what an interrupt, a broken pipe or a storage fault leaves behind."""

from __future__ import annotations

import os
import sys

from peftbench.cli.commands import (
    cmd_bench,
    cmd_cache,
    cmd_check_method,
    cmd_export,
    cmd_leaderboard,
    cmd_methods,
    cmd_plot,
    cmd_report,
    cmd_run,
    cmd_status,
    cmd_sweep,
    cmd_tasks,
)
from peftbench.cli.parser import build_parser
from peftbench.core.errors import UsageError

INTERRUPTED = {  # what an interrupt leaves behind, per command (said exactly, see README)
    "run": "the run directory is marked INCOMPLETE (reports skip it) and keeps the finished "
           "seeds' results; the same command starts a new run directory",
    "sweep": "completed cells are kept in the study; the same command resumes and runs the "
             "interrupted cell again",
    "leaderboard": "finished cells are committed in the board's runs/ folder and kept in the "
                   "study; the same command resumes and runs the interrupted cell again",
}


def _thread_fault(args) -> None:
    """A storage fault in a background thread (Optuna's heartbeat on a locked database) is one
    line, as in the main thread; any other thread error keeps Python's traceback."""
    fault = storage_fault(args.exc_value) if args.exc_value is not None else None
    if fault is None:
        sys.__excepthook__(args.exc_type, args.exc_value, args.exc_traceback)
        return
    print(f"peftbench: warning: {fault} (in {getattr(args.thread, 'name', 'a thread')})", file=sys.stderr)


class _GuardedOutput:
    """Standard output that never stops the command: a reader gone (`| head -1`: a broken
    pipe) or a full device (`> /dev/full`) drops the rest of the output, and the command's work
    (cells, commits) goes on; `failure` says what happened. Characters the stream's encoding
    cannot write (PYTHONIOENCODING=ascii) are escaped, not an error."""

    def __init__(self, stream):
        self.stream, self.failure = stream, None
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass

    def _guard(self, call, *args):
        if self.failure is not None:
            return None
        try:
            return call(*args)
        except (BrokenPipeError, ConnectionResetError) as err:
            self.failure = ("broken pipe", err)
        except OSError as err:
            self.failure = (err.strerror or type(err).__name__, err)
        except UnicodeEncodeError as err:  # a stream that cannot be reconfigured
            return call(*[a.encode("ascii", "backslashreplace").decode("ascii") for a in args]) \
                if args else None
        if self.failure is not None:
            try:  # Python flushes stdout again at exit: give it somewhere harmless to go
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass
        return None

    def write(self, text):
        return self._guard(self.stream.write, text)

    def flush(self):
        return self._guard(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    import threading

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threading.excepthook = _thread_fault
    guarded = _GuardedOutput(sys.stdout)
    sys.stdout = guarded
    if hasattr(sys.stderr, "reconfigure"):  # one-line errors must print whatever the encoding
        try:
            sys.stderr.reconfigure(errors="backslashreplace")
        except (ValueError, OSError):
            pass
    try:
        code = _dispatch(argv)
        guarded.flush()
    finally:
        sys.stdout = guarded.stream
    if guarded.failure is not None and guarded.failure[0] != "broken pipe":
        print(f"peftbench: error: standard output failed ({guarded.failure[0]}): the rest of the "
              "output was dropped; the command's work itself finished", file=sys.stderr)
        return code or 1
    return code


def _dispatch(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad option (one line, see Parser.error)
        return int(done.code or 0)
    try:
        code = {"run": cmd_run, "bench": cmd_bench, "tasks": cmd_tasks, "methods": cmd_methods,
         "sweep": cmd_sweep, "cache": cmd_cache, "check-method": cmd_check_method, "status": cmd_status, "report": cmd_report, "plot": cmd_plot,
         "leaderboard": cmd_leaderboard, "export": cmd_export}[args.command](args)
    except UsageError as err:
        print(f"peftbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftbench: interrupted; {INTERRUPTED.get(args.command, 'nothing was lost')}",
              file=sys.stderr)
        return 130
    except Exception as err:
        fault = storage_fault(err)
        if fault is None:
            raise
        print(f"peftbench: error: {fault}", file=sys.stderr)
        return 1
    return code or 0


def storage_fault(err: BaseException) -> str | None:
    """One line for a fault of the study's database (damaged, locked, unreachable) found
    anywhere in `err`'s chain, naming its deepest cause; None for any other error."""
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    kinds = {f"{type(e).__module__}.{type(e).__name__}" for e in chain}
    if not any(k.startswith(("sqlalchemy.", "sqlite3.", "optuna.exceptions.StorageInternalError"))
               or k.endswith("StorageInternalError") for k in kinds):
        return None
    root = chain[-1]
    text = (str(getattr(root, "orig", None) or root).strip().splitlines() or [type(root).__name__])[0]
    return (f"the study's storage failed: {text[:200]} (a damaged, locked or unreachable database; "
            "finished cells committed to a board are safe in its runs/ folder)")

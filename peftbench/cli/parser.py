"""The command line's parser: every command, option and its help (the CLI reference is generated from it)."""

from __future__ import annotations

import argparse
import json

from peftbench.core.errors import UsageError


def parse_params(items: list[str]) -> dict:
    """--param key=value (value parsed as JSON when it can be: numbers, true/false, lists)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r} is not key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


DESCRIPTION = "peftbench command line: run, sweep, status, report, plot, leaderboard, bench, export, ..."


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (an option without help text still shows it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit 2), as every other bad input, and every
    default in the help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"peftbench: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="peftbench", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="fine-tune one method on one task over seeds")
    run.add_argument("--method", required=True, help="a name from `peftbench methods`")
    run.add_argument("--task", required=True, help="a name from `peftbench tasks` or a YAML path")
    run.add_argument("--budget", default="0.005",
                     help="fraction p in (0, 1] of pre-trained entries, or an integer count")
    run.add_argument("--seeds", type=_positive_int, default=1, help="run seeds 0 .. N-1")
    run.add_argument("--model", default="default",
                     help="hub id or local path; 'default' = the packaged all-MiniLM-L6-v2")
    run.add_argument("--epochs", type=_positive_int, default=3, help="passes over the training split")
    run.add_argument("--batch-size", type=_positive_int, default=16, help="training batch size")
    run.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, linear warm-up and decay; Fu et al.'s 1e-4)")
    run.add_argument("--head-lr", type=float, default=None,
                     help="the head's peak learning rate (default: --lr): the new output layer and "
                     "pre-head layers the checkpoint did not train")
    run.add_argument("--max-length", type=_positive_int, default=128, help="tokens per input, longer ones truncated")
    run.add_argument("--max-steps", type=_positive_int, default=None,
                     help="stop after this many optimizer steps (default: epochs x batches)")
    run.add_argument("--limit", type=_positive_int, default=None,
                     help="use at most N examples per split (quick checks)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute activations in the backward (less memory, same numbers)")
    run.add_argument("--reselect-every", type=int, default=0, metavar="N",
                     help="choose the mask again every N steps within the budget (SPEFT's dynamic "
                     "masks); 0 keeps it static")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a method hyper-parameter, e.g. --param scope=global (repeatable)")
    run.add_argument("--output-dir", default="runs", help="folder of the run directories")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--save-trained", action="store_true",
                     help="also write each seed's trained values (trained.safetensors), which "
                     "`peftbench export` puts in the adapter")

    bench = sub.add_parser("bench", help="measure selection, step and cell cost, or replay a board's "
                           "tuning under cheaper rules; prints JSON")
    bench.add_argument("what", choices=["selection", "step", "cells", "tuning"],
                       help="cells: real cells per hour under each declared setting (one 1-thread "
                       "worker per cell, as a board runs them); tuning: cheaper tuning rules replayed "
                       "on a board's committed search records")
    bench.add_argument("--cells", default=None, metavar="T/M/B/LR/S,...",
                       help="for `cells`: the cells, one worker each (default: "
                       "stsb/random/0.005/0.01/0,sst2/childtuning-d/0.005/0.001/0)")
    bench.add_argument("--board", default="all-methods-cpu", help="for `tuning`: the board replayed")
    bench.add_argument("--model", default="default", help="for `step` and `cells`: the model")
    bench.add_argument("--steps", type=_positive_int, default=4, help="for `step`: timed steps per run")
    bench.add_argument("--rounds", type=_positive_int, default=2,
                       help="for `step` and `cells`: interleaved rounds (each variant in fresh processes per round)")
    bench.add_argument("--variants", default=None, metavar="A,B",
                       help="for `step`: a subset of the variants (default all); a name + '+bf16' "
                            "times the same step under bfloat16 autocast; for `cells`: of fp32, "
                            "length, bf16, bf16+length (the first is the baseline)")
    bench.add_argument("--device", default="cpu", help="for `step`: cpu or cuda")

    sweep = sub.add_parser("sweep", help="run a study spec (YAML) as an Optuna study; resumable, "
                           "run it in N processes / machines to share the work")
    sweep.add_argument("spec", help="study spec YAML (see README 'Sweeps')")
    _study_options(sweep)
    sweep.add_argument("--search", action="store_true",
                       help="run the spec's hyper-parameter search instead of the grid")
    sweep.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="start N local workers on the study, each with its share of the CPU "
                       "cores (or one GPU each on a GPU machine)")
    sweep.add_argument("--enqueue-only", action="store_true",
                       help="queue the cells and exit (start this once before many machines join)")
    sweep.add_argument("--no-cache", action="store_true",
                       help="score every cell afresh (do not read or write the score cache)")
    sweep.add_argument("--restart-changed", action="store_true",
                       help="cells the study already ran with other settings are run afresh "
                       "(default: such a spec is refused, naming the differing settings)")

    cache = sub.add_parser("cache", help="list or clear a score cache (a sweep's scores/ folder)")
    cache.add_argument("action", choices=["list", "clear"])
    cache.add_argument("where", help="a study spec YAML (its <output-dir>/scores) or a scores folder")
    _study_options(cache)

    status = sub.add_parser("status", help="live progress of a sweep: done / running / failed, ETA")
    status.add_argument("spec")
    _study_options(status)
    status.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                        help="refresh every SECONDS until the study is finished")

    rep = sub.add_parser("report", help="tables and statistics from a sweep or run directories")
    rep.add_argument("spec", nargs="?", help="study spec YAML (reads its study)")
    _study_options(rep)
    rep.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                     help="read run directories (or folders of them) instead of a study")
    rep.add_argument("--out", default=None, help="where to write report.md and the CSVs "
                     "(default: <output-dir>/report, or <first --runs DIR>/report)")
    rep.add_argument("--ties", default="average", help="rank ties: average or min (Fu et al.)")
    rep.add_argument("--html", action="store_true",
                     help="also write index.html (tables, interactive Pareto plot; works offline)")

    plot = sub.add_parser("plot", help="plots from a sweep: pareto (PNG + HTML) and budget spend")
    plot.add_argument("what", choices=["pareto", "spend"])
    plot.add_argument("spec", help="study spec YAML")
    _study_options(plot)
    plot.add_argument("--out", default=None, help="folder for the files (default <output-dir>)")
    plot.add_argument("--budget", default=None, help="for `spend`: the budget to show")

    board = sub.add_parser("leaderboard", help="run or show a leaderboard from leaderboards/")
    board.add_argument("action", choices=["run", "show", "list", "verify", "work", "search", "carry",
                                          "per-budget", "report", "join", "rekey"],
                       help="run: search, grid, carry check, report (resumes from the committed cells); "
                       "search: the search alone (a worker: several split the untuned pairs); carry: "
                       "the carry check alone (a worker, as search); per-budget: the per-budget search "
                       "alone (search: per_budget; a worker, as search); show: "
                       "print the committed README; verify: re-run committed cells and compare; "
                       "work: the grid alone (a worker, or a second machine on a shared study); report: "
                       "rewrite the board from its committed cells without training; join: add METHOD "
                       "to a built board and run only its search and cells under the board's rules; "
                       "rekey: carry the committed cells and search records across a method-file edit "
                       "proven not to move a number (imports, comments, layout), since --since REV")
    board.add_argument("name", nargs="?", help="a folder name in leaderboards/ (or a path)")
    board.add_argument("method", nargs="?", help="join: the method to add (an installed name)")
    board.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="join: a hyper-parameter of the joining method (repeatable)")
    _study_options(board)
    board.add_argument("--restart-changed", action="store_true",
                       help="run: cells this machine's study ran with other settings (say, a method's "
                       "code changed) are run afresh and committed (default: refused, naming them)")
    board.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="run: N local workers on the grid, each with its share of the cores")
    board.add_argument("--cells", default="2", metavar="K",
                       help="verify: how many committed cells to re-run (chosen at random with "
                       "--seed), or 'all'")
    board.add_argument("--seed", type=int, default=0, help="verify: the seed that chooses the cells")
    board.add_argument("--cell", action="append", default=[], metavar="TASK/METHOD/bBUDGET/sSEED",
                       help="verify: re-run this committed cell (repeatable; overrides --cells)")
    board.add_argument("--since", default=None, metavar="REV",
                       help="rekey: the git revision whose method files made the committed records")

    export = sub.add_parser("export", help="write a run's selection as a peft adapter (SHiRA) to "
                            "train it in your own pipeline")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (peftbench run, or a sweep's runs/<cell>)")
    export.add_argument("--to", required=True, choices=["peft"], help="the format")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the adapter folder to write")
    export.add_argument("--seed", type=int, default=None, help="whose mask (default: the first finished seed)")

    check = sub.add_parser("check-method", help="run the Selector conformance checks "
                           "(peftbench.testing) on an installed method, on a tiny model")
    check.add_argument("name", help="a name from `peftbench methods`")
    check.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a method hyper-parameter (default: light settings for built-ins)")

    sub.add_parser("tasks", help="list the tasks")
    sub.add_parser("methods", help="list the methods and their packages")
    return parser


def _study_options(parser) -> None:
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (default sqlite:///<output-dir>/study.db); e.g. "
                        "postgresql://user:pw@host/db or journal:/path/study.log")
    parser.add_argument("--output-dir", default=None, help="default sweeps/<name>")

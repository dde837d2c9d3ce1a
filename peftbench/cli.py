"""`peftbench` command line: run, sweep, status, report, plot, leaderboard, bench, export, ..."""
from __future__ import annotations

import argparse
import json
import os
import sys

from peftbench.errors import UsageError


def _parse_params(items: list[str]) -> dict:
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
    parser = Parser(prog="peftbench", description=__doc__.split("\n")[0].replace("`", ""))
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
    run.add_argument("--max-length", type=_positive_int, default=128, help="tokens per input, longer ones truncated")
    run.add_argument("--max-steps", type=_positive_int, default=None,
                     help="stop after this many optimizer steps (default: epochs x batches)")
    run.add_argument("--limit", type=_positive_int, default=None,
                     help="use at most N examples per split (quick checks)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute activations in the backward (less memory, same numbers)")
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


def _load_spec(args):
    from peftbench.sweep import load_spec

    return load_spec(args.spec, storage=args.storage, output_dir=args.output_dir)


def cmd_sweep(args) -> int | None:
    from peftbench import sweep

    spec = _load_spec(args)
    if args.search:
        sweep.run_search(spec)
    elif args.workers:
        shared = [args.spec, *(["--storage", args.storage] if args.storage else []),
                  *(["--output-dir", args.output_dir] if args.output_dir else []),
                  *(["--no-cache"] if args.no_cache else [])]
        code = sweep.run_workers(spec, shared, args.workers, restart_changed=args.restart_changed)
        study = sweep.open_study(spec)
        print(sweep.progress_line(study, sweep.Fingerprints(spec)))
        print(f"results: peftbench report {args.spec}" + (f" --storage {args.storage}" if args.storage else ""))
        return code or None
    elif args.enqueue_only:
        sweep.claim_out(spec)  # its lock (and a default SQLite study) are written there
        added = sweep.enqueue_missing(sweep.open_study(spec), spec, restart_changed=args.restart_changed)
        print(f"{added} cells queued in {spec.storage_url}")
    else:
        study = sweep.run_grid(spec, use_cache=not args.no_cache, restart_changed=args.restart_changed)
        print(f"results: peftbench report {args.spec}" + (f" --storage {args.storage}" if args.storage else ""))
        failed = sweep.failed_cells(study, spec)
        if failed:
            print(f"peftbench: {len(failed)} cell(s) failed:", file=sys.stderr)
            for cell, reason in sorted(failed.items()):
                print(f"  {cell}: {reason}", file=sys.stderr)
            return 1


def cmd_cache(args) -> None:
    from pathlib import Path

    from peftbench.cache import ScoreCache

    where = Path(args.where)
    if where.suffix in (".yaml", ".yml"):
        args.spec = args.where
        where = _load_spec(args).out / "scores"
    if not where.is_dir():
        raise UsageError(f"score cache folder {where} " + ("is a file, not a folder" if where.exists() else
                                                           "does not exist") + ": give a study spec or a scores folder")
    cache = ScoreCache(where, create=False)  # refuses a folder that is not a score cache
    if args.action == "clear":
        print(f"removed {cache.clear()} cached score files from {where}")
        return
    rows = cache.entries()
    for row in rows:
        params = ",".join(f"{k}={v}" for k, v in sorted(row["params"].items()))
        print(f"{row['key'][:12]}  {row['method']:14s} seed {row['seed']!s:3s} {row['bytes'] / 1e6:8.1f} MB"
              f"  {'' if row['readable'] else '[unreadable] '}{params}")
    print(f"{len(rows)} cached score files in {where}")


def cmd_status(args) -> None:
    from peftbench import sweep

    spec = _load_spec(args)
    sweep.watch(spec, every=args.watch or 10.0, once=args.watch is None)


def cmd_report(args) -> None:
    from pathlib import Path

    from peftbench import ownership, plots, report, sweep

    def is_report(folder):  # a report from before markers (a board's folder has no report.md)
        return (folder / "report.md").is_file() and not (folder / "spec.yaml").exists()

    spec = _load_spec(args) if args.spec and not args.runs else None
    # by default inside what it reports on (the sweep folder, the first runs folder), never
    # into the working folder
    out = Path(args.out or (spec.out / "report" if spec else Path(args.runs[0]) / "report" if args.runs else "report"))
    ownership.check(out, "report", is_report, "report folder")  # before any work: never over a file of yours
    if args.runs:
        frame = report.load_runs(args.runs)
    elif args.spec:
        frame = sweep.finished_frame(spec)
    else:
        raise UsageError("give a study spec or --runs DIR ...")
    ownership.claim(out, "report", is_report, "report folder")
    title = f"Report: {spec.name}" if spec else "Report"
    print(report.build_report(frame, out, title=title, published=spec.published if spec else None,
                              cache_dir=spec.out / "scores" if spec else None, ties=args.ties,
                              against=spec.compare_against if spec else None))
    if args.html:
        from peftbench import pages

        for ranking in report.friedman_by_budget(frame):
            if ranking["pairwise"] is not None:
                plots.cd_png(ranking, out / f"cd-b{ranking['budget']}.png")
        plots.spend_png(frame, out / "spend.png")
        pages.write_page(out, title, spec.description if spec else "", frame,
                         {"runs": ", ".join(args.runs)} if args.runs else {"study": spec.storage_url},
                         spec_text=Path(args.spec).read_text() if spec else None)
    print(f"\nwritten to {out}/ (report.md and CSVs{', index.html' if args.html else ''})")


PLOT_FILES = {"pareto.png", "pareto.pdf", "pareto.svg", "pareto.html", "plotly.min.js", "spend.png", ".peftbench"}


def cmd_plot(args) -> None:
    from pathlib import Path

    from peftbench import plots, sweep

    from peftbench import ownership

    spec = _load_spec(args)
    out = Path(args.out) if args.out else None
    if out is not None:  # a folder of yours is refused before any work; the sweep folder is ours
        ownership.check(out, "plots", lambda f: all(p.name in PLOT_FILES for p in f.iterdir()), "plot folder")
    frame = sweep.finished_frame(spec)
    if out is None:
        out = spec.out
        out.mkdir(parents=True, exist_ok=True)
    else:
        ownership.claim(out, "plots", lambda f: all(p.name in PLOT_FILES for p in f.iterdir()), "plot folder")
    if args.what == "pareto":
        plots.write_plotly_js(out)
        paths = [*plots.pareto_png(frame, out / "pareto.png"), plots.pareto_html(frame, out / "pareto.html")]
    else:
        paths = [plots.spend_png(frame, out / "spend.png", budget=args.budget)]
    print("\n".join(str(p) for p in paths))


def cmd_leaderboard(args) -> int | None:
    from peftbench import leaderboard

    if args.action == "list":
        root = leaderboard.leaderboards_root()
        for folder in sorted(p for p in root.iterdir() if (p / "spec.yaml").is_file()):
            print(f"{folder.name:24s} {'results' if (folder / 'README.md').exists() else 'no results yet'}")
        return
    if not args.name:
        raise UsageError(f"peftbench leaderboard {args.action} needs a NAME (see `peftbench leaderboard list`)")
    if args.action == "show":
        print(leaderboard.show(args.name))
    elif args.action == "verify":
        table, code = leaderboard.verify(args.name, cells=args.cells, seed=args.seed, names=args.cell)
        print(table)
        return code
    elif args.action == "rekey":
        from peftbench.rekey import rekey

        if not args.since:
            raise UsageError("peftbench leaderboard rekey needs --since REV: the git revision whose "
                             "method files made the committed cells (e.g. HEAD~1)")
        rekey(args.name, args.since)
    elif args.action == "report":
        print(leaderboard.refresh(args.name, storage=args.storage, output_dir=args.output_dir))
    elif args.action == "join":
        if not args.method:
            raise UsageError(f"peftbench leaderboard join {args.name} needs a METHOD (see `peftbench methods`)")
        print(leaderboard.join(args.name, args.method, _parse_params(args.param), workers=args.workers,
                               storage=args.storage, output_dir=args.output_dir))
    elif args.action == "search":
        leaderboard.search(args.name, storage=args.storage, output_dir=args.output_dir)
    elif args.action == "carry":
        leaderboard.carry(args.name, storage=args.storage, output_dir=args.output_dir)
    elif args.action == "per-budget":
        leaderboard.per_budget(args.name, storage=args.storage, output_dir=args.output_dir)
    elif args.action == "work":
        return 1 if leaderboard.work(args.name, storage=args.storage, output_dir=args.output_dir) else 0
    else:
        print(leaderboard.run(args.name, storage=args.storage, output_dir=args.output_dir,
                              workers=args.workers, restart_changed=args.restart_changed))


def cmd_run(args) -> None:
    from peftbench.experiment import RunConfig, run_experiment
    from peftbench.trainer import train_config

    config = RunConfig(
        method=args.method, task=args.task, budget=args.budget, seeds=list(range(args.seeds)),
        model=args.model, device=args.device, method_params=_parse_params(args.param),
        train=train_config({"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                            "max_length": args.max_length, "max_steps": args.max_steps,
                            "gradient_checkpointing": args.gradient_checkpointing}, "run options"),
        limit=args.limit, output_dir=args.output_dir, save_trained=args.save_trained)
    summary, run_dir = run_experiment(config, progress=not args.quiet)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")


def format_summary(s: dict) -> str:
    """One table: test metrics as mean ± std over seeds, trainable counts, times, training
    steps per second and peak memory (MiB: RSS on CPU, max allocated on CUDA)."""
    names = [k[len("test_"):-len("_mean")] for k in s if k.startswith("test_") and k.endswith("_mean")]
    if len(s["main_metric"]) == 1:  # "main" would repeat that metric's column
        names.remove("main")
    header = ["method", "task", "budget", "seeds", *[f"test {n}" for n in names],
              "trainable", "% of encoder", "head", "score s", "train s", "steps/s", "peak MiB"]
    row = [s["method"], s["task"], str(s["budget"]), str(len(s["seeds"])),
           *[f"{s[f'test_{n}_mean']:.4f} ± {s[f'test_{n}_std']:.4f}" for n in names],
           f"{s['trainable']:,}", f"{100 * s['trainable'] / s['pretrained_entries']:.3f}",
           f"{s['head']:,}", f"{s['scoring_time_s']:.1f}", f"{s['train_time_s']:.1f}",
           f"{s.get('steps_per_s', float('nan')):.2f}", f"{s.get('peak_memory_mb', float('nan')):,.0f}"]
    widths = [max(len(h), len(r)) for h, r in zip(header, row)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    lines = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(row)]
    main = "+".join(s["main_metric"])
    lines.append(f"constant predictor (train majority / mean) on test: {main} = "
                 f"{s['constant_test_main']:.4f} ({s['test_rows']} test rows)")
    if s.get("near_constant"):
        lines.append("WARNING: the test score is within noise of the constant predictor "
                     "(less than max(2 standard errors of the mean over seeds, 1/sqrt(test rows)) above "
                     "it): this run did not "
                     "measurably learn")
    for seed, info in s.get("diverged_seeds", {}).items():
        lines.append(f"DIVERGED: seed {seed} at step {info['step']} (loss {info['loss']}); "
                     "left out of the mean")
    return "\n".join(lines)


def cmd_bench(args) -> None:
    from peftbench import bench
    from peftbench.trainer import pick_device

    if args.what == "selection":
        out = bench.selection_cost()
    elif args.what in ("cells", "tuning"):
        from peftbench import cost

        if args.what == "tuning":
            out = cost.tuning_rules(args.board)
        else:
            out = cost.cells_per_hour(
                tuple(args.cells.split(",")) if args.cells else cost.DEFAULT_CELLS,
                tuple(args.variants.split(",")) if args.variants else tuple(cost.CELL_VARIANTS),
                rounds=args.rounds, model=args.model, progress=lambda line: print(line, file=sys.stderr))
    else:
        variants = args.variants.split(",") if args.variants else list(bench.STEP_VARIANTS)
        unknown = sorted(v for v in variants if not bench.known_variant(v))
        if unknown:
            raise UsageError(f"bench step: unknown variants {unknown}; allowed: {list(bench.STEP_VARIANTS)}, "
                             f"each also with {bench.BF16!r} (bfloat16 autocast)")
        out = bench.step_cost(args.model, variants, steps=args.steps, rounds=args.rounds,
                              device=str(pick_device(args.device)),
                              progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps(out, indent=2))


def cmd_check_method(args) -> int:
    from transformers.utils import logging

    from peftbench import registry, testing

    import datasets

    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    registry.get(args.name)  # an unknown or broken method: one line, exit 2
    params = _parse_params(args.param) if args.param else None
    if params is not None:
        registry.create(args.name, **params)  # a bad --param: one line, exit 2, not a FAIL per check
    outcomes = testing.check_method(args.name, params)
    width = max(len(o.check) for o in outcomes)
    for o in outcomes:
        word = ("XPASS" if o.passed else "XFAIL") if o.expected_failure else ("PASS" if o.passed else "FAIL")
        reason = f" [expected failure: {o.expected_failure}]" if o.expected_failure else ""
        print(f"{word:5s}  {o.check:{width}s}  {o.detail}{reason}")
    failed = sum(not o.ok for o in outcomes)
    xfail = any(o.expected_failure for o in outcomes)
    print(f"{args.name}: {len(outcomes) - failed} of {len(outcomes)} checks passed"
          + (" (an expected failure that fails counts as passed)" if xfail else ""))
    return 1 if failed else 0


def cmd_tasks(args) -> None:
    from peftbench.data import available_tasks, parse_task

    for name, path in available_tasks().items():
        try:
            spec = parse_task(path)
            print(f"{name:8s} {spec.kind:16s} {spec.description}")
        except UsageError as err:
            print(f"{name:8s} [broken] {err}")


def cmd_export(args) -> None:
    from peftbench.export import export_run

    report = export_run(args.run_dir, args.out_dir, args.seed)
    print(report.summary())
    print(f"adapter written to {args.out_dir}")


def cmd_methods(args) -> None:
    from peftbench.registry import methods

    for name, info in methods().items():
        print(f"{name:14s} {info.package:18s} {info.description}")


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


if __name__ == "__main__":
    sys.exit(main())

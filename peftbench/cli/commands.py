"""What each `peftbench` command does, one `cmd_*` function per command (the parser names them)."""

from __future__ import annotations

import json
import sys

from peftbench.analysis import frame as analysis_frame
from peftbench.board import paths as board_paths
from peftbench.board import phases, verify
from peftbench.cli.parser import parse_params
from peftbench.core.errors import UsageError
from peftbench.rendering import interactive
from peftbench.sweep import grid, search, state, storage


def _load_spec(args):
    from peftbench.sweep.spec import load_spec

    return load_spec(args.spec, storage=args.storage, output_dir=args.output_dir)


def cmd_sweep(args) -> int | None:

    spec = _load_spec(args)
    if args.search:
        search.run_search(spec)
    elif args.workers:
        shared = [args.spec, *(["--storage", args.storage] if args.storage else []),
                  *(["--output-dir", args.output_dir] if args.output_dir else []),
                  *(["--no-cache"] if args.no_cache else [])]
        code = grid.run_workers(spec, shared, args.workers, restart_changed=args.restart_changed)
        study = storage.open_study(spec)
        print(state.progress_line(study, state.Fingerprints(spec)))
        print(f"results: peftbench report {args.spec}" + (f" --storage {args.storage}" if args.storage else ""))
        return code or None
    elif args.enqueue_only:
        storage.claim_out(spec)  # its lock (and a default SQLite study) are written there
        added = grid.enqueue_missing(storage.open_study(spec), spec, restart_changed=args.restart_changed)
        print(f"{added} cells queued in {spec.storage_url}")
    else:
        study = grid.run_grid(spec, use_cache=not args.no_cache, restart_changed=args.restart_changed)
        print(f"results: peftbench report {args.spec}" + (f" --storage {args.storage}" if args.storage else ""))
        failed = state.failed_cells(study, spec)
        if failed:
            print(f"peftbench: {len(failed)} cell(s) failed:", file=sys.stderr)
            for cell, reason in sorted(failed.items()):
                print(f"  {cell}: {reason}", file=sys.stderr)
            return 1


def cmd_cache(args) -> None:
    from pathlib import Path

    from peftbench.training.cache import ScoreCache

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

    spec = _load_spec(args)
    state.watch(spec, every=args.watch or 10.0, once=args.watch is None)


def cmd_report(args) -> None:
    from pathlib import Path

    from peftbench.core import ownership
    from peftbench.rendering import report
    from peftbench.rendering.figures import figure_sections

    def is_report(folder):  # a report from before markers (a board's folder has no report.md)
        return (folder / "report.md").is_file() and not (folder / "spec.yaml").exists()

    spec = _load_spec(args) if args.spec and not args.runs else None
    # by default inside what it reports on (the sweep folder, the first runs folder), never
    # into the working folder
    out = Path(args.out or (spec.out / "report" if spec else Path(args.runs[0]) / "report" if args.runs else "report"))
    ownership.check(out, "report", is_report, "report folder")  # before any work: never over a file of yours
    if args.runs:
        frame = analysis_frame.load_runs(args.runs)
    elif args.spec:
        frame = state.finished_frame(spec)
    else:
        raise UsageError("give a study spec or --runs DIR ...")
    ownership.claim(out, "report", is_report, "report folder")
    title = f"Report: {spec.name}" if spec else "Report"
    sections = report.report_sections(frame, out, published=spec.published if spec else None,
                                      cache_dir=spec.out / "scores" if spec else None, ties=args.ties,
                                      against=spec.compare_against if spec else None)
    page = None
    if args.html:  # the figures and the page a board draws, from the same sections
        figures, js = figure_sections(frame, out)
        sections += figures
        page = {"intro": spec.description if spec else "", "plotly_js": js,
                "meta": {"runs": ", ".join(args.runs)} if args.runs else {"study": spec.storage_url},
                "spec_text": Path(args.spec).read_text() if spec else None}
    print(report.publish(out, title, "", sections, "report.md", page=page))
    print(f"\nwritten to {out}/ (report.md and CSVs{', index.html' if args.html else ''})")


PLOT_FILES = {"pareto.png", "pareto.pdf", "pareto.svg", "pareto.html", "plotly.min.js", "spend.png", ".peftbench"}


def cmd_plot(args) -> None:
    from pathlib import Path

    from peftbench.core import ownership
    from peftbench.rendering import plots

    spec = _load_spec(args)
    out = Path(args.out) if args.out else None
    if out is not None:  # a folder of yours is refused before any work; the sweep folder is ours
        ownership.check(out, "plots", lambda f: all(p.name in PLOT_FILES for p in f.iterdir()), "plot folder")
    frame = state.finished_frame(spec)
    if out is None:
        out = spec.out
        out.mkdir(parents=True, exist_ok=True)
    else:
        ownership.claim(out, "plots", lambda f: all(p.name in PLOT_FILES for p in f.iterdir()), "plot folder")
    if args.what == "pareto":
        interactive.write_plotly_js(out)
        paths = [*plots.pareto_png(frame, out / "pareto.png"), interactive.pareto_html(frame, out / "pareto.html")]
    else:
        paths = [plots.spend_png(frame, out / "spend.png", budget=args.budget)]
    print("\n".join(str(p) for p in paths))


def cmd_leaderboard(args) -> int | None:

    if args.action == "list":
        root = board_paths.leaderboards_root()
        for folder in sorted(p for p in root.iterdir() if (p / "spec.yaml").is_file()):
            print(f"{folder.name:24s} {'results' if (folder / 'README.md').exists() else 'no results yet'}")
        return
    if not args.name:
        raise UsageError(f"peftbench leaderboard {args.action} needs a NAME (see `peftbench leaderboard list`)")
    if args.action == "show":
        print(phases.show(args.name))
    elif args.action == "verify":
        table, code = verify.verify(args.name, cells=args.cells, seed=args.seed, names=args.cell)
        print(table)
        return code
    elif args.action == "rekey":
        from peftbench.board.rekey import rekey

        if not args.since:
            raise UsageError("peftbench leaderboard rekey needs --since REV: the git revision whose "
                             "method files made the committed cells (e.g. HEAD~1)")
        rekey(args.name, args.since)
    elif args.action == "report":
        print(phases.refresh(args.name, storage=args.storage, output_dir=args.output_dir))
    elif args.action == "join":
        if not args.method:
            raise UsageError(f"peftbench leaderboard join {args.name} needs a METHOD (see `peftbench methods`)")
        print(phases.join(args.name, args.method, parse_params(args.param), workers=args.workers,
                               storage=args.storage, output_dir=args.output_dir))
    elif args.action == "search":
        phases.search(args.name, storage=args.storage, output_dir=args.output_dir)
    elif args.action == "carry":
        phases.carry(args.name, storage=args.storage, output_dir=args.output_dir)
    elif args.action == "per-budget":
        phases.per_budget(args.name, storage=args.storage, output_dir=args.output_dir)
    elif args.action == "work":
        return 1 if phases.work(args.name, storage=args.storage, output_dir=args.output_dir) else 0
    else:
        print(phases.run(args.name, storage=args.storage, output_dir=args.output_dir,
                              workers=args.workers, restart_changed=args.restart_changed))


def cmd_run(args) -> None:
    from peftbench.contract.settings import train_config
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(
        method=args.method, task=args.task, budget=args.budget, seeds=list(range(args.seeds)),
        model=args.model, device=args.device, method_params=parse_params(args.param),
        train=train_config({"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                            "head_lr": args.head_lr, "max_length": args.max_length, "max_steps": args.max_steps,
                            "gradient_checkpointing": args.gradient_checkpointing,
                            "reselect_every": args.reselect_every}, "run options"),
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
    from peftbench.bench import step as bench
    from peftbench.training.trainer import pick_device

    if args.what == "selection":
        out = bench.selection_cost()
    elif args.what in ("cells", "tuning"):
        from peftbench.bench import cells as cost

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
    import datasets
    from transformers.utils import logging

    from peftbench import testing
    from peftbench.contract import registry

    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    registry.get(args.name)  # an unknown or broken method: one line, exit 2
    params = parse_params(args.param) if args.param else None
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
    from peftbench.data.tasks import available_tasks, parse_task

    for name, path in available_tasks().items():
        try:
            spec = parse_task(path)
            print(f"{name:8s} {spec.kind:16s} {spec.description}")
        except UsageError as err:
            print(f"{name:8s} [broken] {err}")


def cmd_export(args) -> None:
    from peftbench.training.export import export_run

    report = export_run(args.run_dir, args.out_dir, args.seed)
    print(report.summary())
    print(f"adapter written to {args.out_dir}")


def cmd_methods(args) -> None:
    from peftbench.contract.registry import methods

    for name, info in methods().items():
        print(f"{name:14s} {info.package:18s} {info.description}")

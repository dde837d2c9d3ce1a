"""Checking a committed board: re-running sampled cells (`leaderboard verify`) and the published-numbers-only board."""

from __future__ import annotations

from pathlib import Path

import pandas

from peftbench.analysis import published, ranks
from peftbench.board.paths import find, shared_root
from peftbench.core.errors import UsageError
from peftbench.rendering import pages, report
from peftbench.rendering.sections import Section, markdown
from peftbench.sweep import cellstore
from peftbench.sweep import spec as sweep_spec


def published_only(spec: sweep_spec.StudySpec, folder: Path | None = None) -> str:
    """Their table re-ranked by `ranks.table1` (ties=min, as they print), their stability
    correlation recomputed from it, and a pointer to the command that produces ours. With a
    `folder`, the table is also written there as table1-bpublished.csv and the board's page."""
    cells = published.parse_published(spec.published)
    cells = cells[cells.task != "AVG"].assign(budget="published")
    table = ranks.table1(cells, ties="min", tasks=[t for t in spec.tasks if t in set(cells.task)])
    corr = ranks.stability_correlation(table)
    notes = [f"- {m}: {note}" for m, note in spec.method_notes.items()]
    sections = [Section("Their numbers, ranked by peftbench's report code", table=table.render(top=3),
                        index=True, csv="table1-bpublished.csv",
                        note=f"No results of ours yet: `peftbench leaderboard run {spec.name}` (machine: "
                             f"{spec.machine}). Ties = min, ranks 1-3 shown, as printed.",
                        after="\n\n".join([
                            *([f"Rows that peftbench does not run as their variant (`{spec.name}` spec):\n\n"
                               + "\n".join(notes)] if notes else []),
                            f"Stability vs performance from this table: Spearman rho = {corr['spearman']:.4f} "
                            f"(p = {corr['spearman_p']:.2g}, n = {corr['n']}); they report rho = 0.4356 (p = "
                            "0.000014), computed on per-cell data the paper does not publish."]))]
    title = f"Leaderboard {spec.name}: published numbers only"
    if folder is None:
        return "\n".join([f"# {title}", "", spec.description, "", markdown(sections)])
    text = report.publish(folder, title, spec.description, sections, markdown=None, page={
        "intro": spec.description, "spec_text": (folder / "spec.yaml").read_text(),
        "meta": {"status": f"no results of ours yet: peftbench leaderboard run {spec.name}",
                 "machine needed": spec.machine,
                 **{f"not the paper's variant: {m}": n for m, n in spec.method_notes.items()}}})
    if shared_root(folder) is not None:
        pages.write_index(folder.parent)
    return text


def verify(name: str, cells: str = "2", seed: int = 0, names: list[str] | None = None,
           log=print) -> tuple[str, int]:
    """Re-run committed cells on this machine, in a scratch folder (the committed files are
    only read), and compare: returns (the table and a closing line, exit code). The code is 1
    when a cell whose machine fingerprint (torch, transformers, device, threads) matches the
    committed one gives another test metric: on the same software and CPU a cell is expected to
    reproduce to the last digit. Elsewhere the difference is reported, never hidden."""
    import random
    import tempfile

    from peftbench.training.experiment import run_experiment
    from peftbench.training.identity import machine_fingerprint
    from peftbench.training.trainer import pick_device

    folder = find(name)
    frozen = sweep_spec.load_spec(folder / "spec.yaml").frozen
    if frozen is not None:
        raise UsageError(f"board {name!r} is frozen: made with peftbench {frozen.version} ({frozen.reason}); "
                         "this code would not reproduce its cells: verify them from a checkout of "
                         f"peftbench {frozen.version}")
    committed = cellstore.committed_cells(folder)
    if not committed:
        raise UsageError(f"leaderboard {name!r} has no committed cells with a cell.json under "
                         f"{folder / 'runs'}: run `peftbench leaderboard run {name}` first")
    by_key = {c.cell: c for c in committed}
    if names:
        unknown = [n for n in names if n not in by_key]
        if unknown:
            raise UsageError(f"--cell {unknown[0]!r} is not a committed cell of {name!r}; e.g. "
                             f"{', '.join(sorted(by_key)[:3])} (task/method/b<budget>/s<seed>)")
        chosen = [by_key[n] for n in names]
    elif cells == "all":
        chosen = committed
    else:
        try:
            k = int(cells)
        except ValueError:
            k = 0
        if k < 1:
            raise UsageError(f"--cells {cells!r}: give a positive number of cells or 'all'")
        chosen = sorted(random.Random(seed).sample(committed, min(k, len(committed))),
                        key=lambda c: c.cell)
    rows, mismatched = [], 0
    with tempfile.TemporaryDirectory(prefix=f"verify-{folder.name}-") as scratch:
        for i, cell in enumerate(chosen, 1):
            run = cell.run_config(output_dir=scratch)
            log(f"[{i}/{len(chosen)}] re-running {cell.cell}")
            summary, _ = run_experiment(run, progress=False)
            here = machine_fingerprint(str(pick_device(run.device)))
            there = cell.record.get("machine", {})
            differs = sorted(k for k in here if there.get(k) != here[k])
            before, after = cell.result["test"]["main"], summary["test_main_mean"]
            same = before == after or (before != before and after != after)  # NaN: diverged both times
            if not same and not differs:
                mismatched += 1
            rows.append({"cell": cell.cell, "task": cell.task, "method": cell.method,
                         "budget": cell.budget, "committed": before, "re-run": after,
                         "difference": after - before,
                         "machine": "same" if not differs else "differs: " + ", ".join(
                             f"{k} {there.get(k)} -> {here[k]}" for k in differs)})
    # NaN reproduces only NaN (a cell that diverged both times); a committed NaN is never "exact"
    exact = sum(r["difference"] == 0 or (r["committed"] != r["committed"] and r["re-run"] != r["re-run"])
                for r in rows)
    frame = pandas.DataFrame(rows)
    table = frame.drop(columns=["task", "method", "budget"]).to_markdown(index=False, floatfmt=".10g")
    # the comparison itself, from the numbers just trained: test main metric x100 per method
    summary = frame.groupby(["task", "budget", "method"]).agg(
        seeds=("re-run", "size"), re_run_mean=("re-run", "mean"), re_run_std=("re-run", lambda v: v.std(ddof=0)),
        committed_mean=("committed", "mean"))
    comparison = (100 * summary[["re_run_mean", "re_run_std", "committed_mean"]]).join(summary.seeds) \
        .sort_values("re_run_mean", ascending=False).rename(columns={
            "re_run_mean": "re-run mean x100", "re_run_std": "re-run std x100",
            "committed_mean": "committed mean x100"})
    table = ("Re-run on this machine, test main metric (mean and population std over the seeds "
             "re-run):\n\n" + comparison.reset_index().to_markdown(index=False, floatfmt=".2f")
             + "\n\nEvery cell re-run against its committed number:\n\n" + table)
    closing = (f"reproduced {exact} of {len(rows)} committed cells exactly"
               + (f"; {mismatched} differ on a machine that matches the committed fingerprint"
                  if mismatched else ""))
    return table + "\n\n" + closing, 1 if mismatched else 0

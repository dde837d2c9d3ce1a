"""A board's phases as commands: search, carry check, per-budget search, the grid, refresh, run, show and `join`."""

from __future__ import annotations

import sys
from pathlib import Path

from peftbench.board.paths import find
from peftbench.board.results import write_results
from peftbench.board.tables import trial_duration
from peftbench.board.verify import published_only
from peftbench.contract import registry
from peftbench.core.errors import UsageError
from peftbench.core.files import write_atomic
from peftbench.sweep import budgets, cellstore, grid, state
from peftbench.sweep import records as sweep_records
from peftbench.sweep import search as sweep_search
from peftbench.sweep import spec as sweep_spec
from peftbench.sweep import storage as sweep_storage
from peftbench.sweep import workers as sweep_workers


def join_cost(spec: sweep_spec.StudySpec, folder: Path, method: str) -> tuple[int, int, float | None]:
    """(search runs, grid cells, median seconds of the board's committed cells) that joining
    `method` adds: what `join` projects its cost from."""
    import statistics as stats

    budgeted = registry.get(method).uses_budget
    search = spec.search
    runs = 0
    if search:
        runs = search.trials * len(search.seeds or [spec.seeds[0]])
        if search.per_budget and budgeted:
            others = len(spec.budgets) - 1
            runs += 3 * others * (len(search.carry_check or []) + 1)
    runs *= len(spec.tasks)
    cells = len(spec.tasks) * (len(spec.budgets) if budgeted else 1) * len(spec.seeds)
    durations = [float(c.record.get("duration_s") or 0) for c in cellstore.committed_cells(folder)]
    durations = [d for d in durations if d > 0]
    return runs, cells, (stats.median(durations) if durations else None)


def join(name: str, method: str, params: dict, workers: int | None = None, storage: str | None = None,
         output_dir: str | None = None, log=print) -> str:
    """Add `method` to a built board and run only what it needs under the board's rules: the
    spec gains a `joined:` entry (appended, the file's text and comments kept), then `run`
    searches its keys, runs its cells (each committed as it finishes) and re-renders every
    statistic. Prints the projected cost before and the measured wall time after."""
    import time
    from datetime import date

    import peftbench
    from peftbench.core import yamlio

    folder = find(name)
    path = folder / "spec.yaml"
    spec = sweep_spec.load_spec(path, storage=storage, output_dir=output_dir)
    if spec.frozen is not None:
        _prepare(folder, spec)  # refuses, saying why
    key = method.lower()
    if key in spec.methods:
        raise UsageError(f"method {key!r} is already on board {name!r}: `peftbench leaderboard run {name}` "
                         "finishes its cells")
    registry.create(key, **params)  # unknown method or bad parameter: one line now
    text = path.read_text()
    entry = yamlio.dump_flow({"method": key, "params": params, "date": date.today().isoformat(),
                              "peftbench": peftbench.__version__})
    joined = text.rstrip("\n") + ("\n" if "\njoined:" in text else "\njoined:\n") + f"- {entry}\n"
    path.write_text(joined)
    try:
        sweep_spec.load_spec(path, storage=storage, output_dir=output_dir)
    except UsageError:
        path.write_text(text)
        raise
    runs, cells, median = join_cost(spec, folder, key)
    share = max(1, workers or 1)
    projected = (f"about {(runs + cells) * median / share / 3600:.1f} h on {share} worker(s) "
                 f"(median committed cell {median:.0f} s)" if median else "no committed cell to project from")
    log(f"joining {key} to {name}: {runs} search run(s) and {cells} cell(s); projected {projected}")
    start = time.perf_counter()
    out = run(name, storage=storage, output_dir=output_dir, workers=workers)
    log(f"joined {key} to {name} in {(time.perf_counter() - start) / 3600:.2f} h wall "
        f"({runs} search run(s), {cells} cell(s) projected)")
    return out


def _prepare(folder: Path, spec: sweep_spec.StudySpec, trains: bool = True) -> None:
    """The committed search.json into the sweep folder: the tuned settings are part of the
    board, and the cells' fingerprints are computed from them. Each worker of `run --workers N`
    does this as it starts, while the others read the same files: a record is replaced whole
    (`write_atomic`), never rewritten in place, so no reader sees it half-written. A frozen board
    trains nothing (`trains`: refused) and reads back the committed cells proven to be its own."""
    if spec.frozen is not None and trains:
        raise UsageError(f"board {spec.name!r} is frozen: made with peftbench {spec.frozen.version}; "
                         f"{spec.frozen.reason}. Its cells cannot be run again with this code"
                         + (f"; see board {spec.frozen.see!r}" if spec.frozen.see else "")
                         + f" (rewrite its page with `peftbench leaderboard report {spec.name}`)")
    for record in ("search.json", "carry.json", sweep_records.PER_BUDGET):
        committed, working = folder / record, spec.out / record
        if committed.is_file():
            sweep_storage.claim_out(spec)  # the sweep folder is peftbench's before anything is copied there
            data = committed.read_bytes()
            if not working.is_file() or working.read_bytes() != data:
                write_atomic(working, data)
    if spec.frozen is not None:  # after the copy: a cell's settings include the tuned ones
        _, refused = cellstore.accept_frozen(spec, folder)
        if refused:
            print(f"board {spec.name}: {len(refused)} committed cell(s) not read back: "
                  + "; ".join(refused[:5]) + (" ..." if len(refused) > 5 else ""), file=sys.stderr)


def search(name: str, storage: str | None = None, output_dir: str | None = None) -> dict:
    """The search alone (each of `run --workers N`'s search workers): takes untuned (task,
    method) pairs until none is left, recording each into the board's search.json."""
    folder = find(name)
    spec = sweep_spec.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    if not spec.search:
        raise UsageError(f"leaderboard {name!r} has no 'search:' section")
    _prepare(folder, spec)
    return sweep_search.run_search(spec, mirror=folder / "search.json")


def carry(name: str, storage: str | None = None, output_dir: str | None = None) -> dict:
    """The carry check alone (each of `run --workers N`'s carry workers), into carry.json."""
    folder = find(name)
    spec = sweep_spec.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    return budgets.run_carry_check(spec, mirror=folder / "carry.json", search_mirror=folder / "search.json")


def per_budget(name: str, storage: str | None = None, output_dir: str | None = None) -> dict:
    """The per-budget search alone (each of `run --workers N`'s workers), into per-budget.json."""
    folder = find(name)
    spec = sweep_spec.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    return budgets.run_per_budget_search(spec, mirror=folder / sweep_records.PER_BUDGET, carry_mirror=folder / "carry.json",
                                       search_mirror=folder / "search.json")


def work(name: str, storage: str | None = None, output_dir: str | None = None) -> int:
    """The grid alone, committing each cell into the board as it finishes: what each of
    `run`'s workers does, and what a second machine on a shared study runs. Returns the
    number of cells that failed."""
    folder = find(name)
    spec = sweep_spec.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    cellstore.import_committed(sweep_storage.open_study(spec), spec, folder)
    study = grid.run_grid(spec, on_complete=lambda t: cellstore.commit_cell(folder, t.user_attrs, trial_duration(t)))
    return len(state.failed_cells(study, spec))


def refresh(name: str, storage: str | None = None, output_dir: str | None = None) -> str:
    """Rewrite the board from its committed cells (and the local study) without training: a
    partial board's README, page and CSVs, with "k of n cells" and what is missing."""
    folder = find(name)
    spec = sweep_spec.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    if spec.published and not cellstore.committed_cells(folder):  # nothing of ours yet
        return published_only(spec, folder)
    _prepare(folder, spec, trains=False)
    cellstore.import_committed(sweep_storage.open_study(spec), spec, folder)
    verb = "report" if spec.frozen is not None else "run"
    return write_results(spec, folder, f"peftbench leaderboard {verb} {folder.name}")


def run(name: str, storage: str | None = None, output_dir: str | None = None,
        workers: int | None = None, restart_changed: bool = False) -> str:
    """Search (if the spec has `search:`), sweep, report. The search's results are committed
    beside the spec (`search.json`) and read back from there, so the tuned settings are part of
    the board and a search interrupted in one sitting goes on in the next from what it found.
    Committed cells of the current settings are read back, not re-run (`peftbench.sweep.cellstore`);
    each new cell is committed into the board as it finishes. `workers` > 1: that many local
    `leaderboard work` processes, each with its share of the cores."""
    folder = find(name)
    spec = sweep_spec.load_spec(folder / "spec.yaml", storage=storage, output_dir=output_dir)
    _prepare(folder, spec)
    argv = [name, *(["--storage", storage] if storage else []), *(["--output-dir", output_dir] if output_dir else [])]

    def phase(action: str, what: str, record: str, alone) -> None:
        """A search phase, its keys split between `workers` processes (claims.SearchClaims)."""
        if workers and workers > 1:
            if sweep_workers.spawn_workers(argv, workers, command=("leaderboard", action)):
                raise UsageError(f"the {what} of {name!r} did not finish (see the workers' errors above); "
                                 f"what it measured is in its {record}")
        else:
            alone()

    if not restart_changed:  # refused now, not after the search
        grid.refuse_changed_code(sweep_storage.open_study(spec), spec)
    search = spec.search
    if search:  # search.json into the board after every (task, method): commit as it grows
        phase("search", "search", "search.json", lambda: sweep_search.run_search(spec, mirror=folder / "search.json"))

    def carry_check() -> None:
        phase("carry", "carry check", "carry.json", lambda: budgets.run_carry_check(
            spec, mirror=folder / "carry.json", search_mirror=folder / "search.json"))

    if search and search.per_budget:  # each budget tuned from the carry check, before the grid
        carry_check()
        phase("per-budget", "per-budget search", sweep_records.PER_BUDGET, lambda: budgets.run_per_budget_search(
            spec, mirror=folder / sweep_records.PER_BUDGET, carry_mirror=folder / "carry.json",
            search_mirror=folder / "search.json"))
    study = sweep_storage.open_study(spec)
    cellstore.import_committed(study, spec, folder)
    if workers and workers > 1:
        grid.run_workers(spec, argv, workers, restart_changed=restart_changed, command=("leaderboard", "work"))
    else:
        grid.run_grid(spec, restart_changed=restart_changed,
                       on_complete=lambda t: cellstore.commit_cell(folder, t.user_attrs, trial_duration(t)))
    if search and search.carry_check and not search.per_budget:  # after the grid: a check, not the product
        carry_check()
    command = f"peftbench leaderboard run {folder.name}"
    return write_results(spec, folder, command)


def show(name: str) -> str:
    """The committed results; without any, the published numbers rendered by our report code."""
    folder = find(name)
    readme = folder / "README.md"
    if readme.is_file():
        return readme.read_text()
    spec = sweep_spec.load_spec(folder / "spec.yaml")
    if not spec.published:
        raise UsageError(f"leaderboard {name!r} has no results yet: run `peftbench leaderboard run {name}`")
    text = published_only(spec, folder)
    return text

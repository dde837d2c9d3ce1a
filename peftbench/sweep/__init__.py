"""Sweeps: a YAML study spec run as an Optuna study, resumable, by one worker or many.

Grid (leaderboards): every cell (task, method, budget, seed) is enqueued once as a WAITING trial
of a two-objective study (maximise the test metric of the best-validation checkpoint, minimise
trainable parameters), so `study.best_trials` is the Pareto front. Workers pop WAITING trials; the
sampler is never consulted. Why not `GridSampler`: with several workers it may hand the same
point out twice (documented by Optuna); a queue of enqueued trials is claimed once each.

One configuration per study: every trial carries `config`, everything that determines its
result (model weights' fingerprint, task files' digests, training settings after any search,
method parameters, the method's code identity, row limit, device), and its digest
`fingerprint`. A spec whose cells contradict trials already in the study is refused with the
differing keys (`restart_changed=True`, `--restart-changed` on the command line, runs those
cells afresh); reports, plots, status and leaderboards only read trials of the current spec's
cells with the current fingerprint.

Exactly once, resumable:
- a cell is enqueued only if no trial of it (with the current fingerprint) is WAITING, RUNNING
  or COMPLETE, or failed for good (diverged), so running the same command again resumes:
  completed cells are kept, crashed or interrupted (Ctrl-C) cells are queued again;
- RDB storages (SQLite, PostgreSQL, MySQL) get a heartbeat: a trial whose worker was killed
  (kill -9, lost machine) turns stale after `grace_period` seconds, is failed and re-queued by
  `RetryHeartbeatStaleTrialCallback`; a worker that finds only RUNNING trials waits for them;
- before training, a trial yields (PRUNED, `duplicate_of`) if another trial of the same cell has
  completed or is running with a lower number: the guard for SQLite's lack of row locks and
  for two machines enqueueing at the same moment.

Search (optional, `search:` in the spec): per (task, method), a single-objective study over
training hyper-parameters (and the method's own `search_space()`), TPE sampler seeded, median
pruner on the per-epoch validation metric; its best parameters are written to `search.json` and
the grid uses them for that (task, method).

Every trial's run directory is in its user attributes (`run_dir`), beside the figures a report
needs, so a report reads the study alone (e.g. from PostgreSQL on another machine).

The package, by job: `spec` (the spec file and its cells), `storage` (where the study lives),
`search` (tuning per task and method), `state` (each cell's state, progress, the finished
frame), `workers` (local processes), `grid` (the queue and the objective).
"""

from __future__ import annotations


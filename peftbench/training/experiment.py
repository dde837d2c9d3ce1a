"""One experiment: a method on a task at a budget, over seeds, written to a run directory.

Run directory layout (all JSON, written as soon as each piece exists):

    <runs>/<method>-<task>-b<budget>-<time>/
        config.json            everything needed to reproduce the run
        seed-<s>/selection.json  selection summary: counts per tensor and in total, scoring time
        seed-<s>/mask.pt       the selection itself (full tensor names, partial flat indices)
        seed-<s>/trained.safetensors  with `save_trained`: the trained entries' values, the head
        seed-<s>/metrics.jsonl   one line per epoch (train loss, validation metrics)
        seed-<s>/result.json     final validation/test metrics, trainable counts, times
        summary.json           mean and std over seeds
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from peftbench.contract import registry
from peftbench.contract.scoring import RecordedSettings, ScoringData
from peftbench.contract.selector import Budget, check_scores, validate_selection
from peftbench.contract.settings import TrainConfig
from peftbench.core.errors import UsageError
from peftbench.core.files import write_atomic, write_json
from peftbench.data.encode import tokenize
from peftbench.data.metrics import constant_predictor, near_constant
from peftbench.data.spec import TaskSpec
from peftbench.data.tasks import load_task
from peftbench.modeling.models import (
    head_parameters,
    init_head,
    load_model,
    pretrained_parameters,
    pretrained_size,
    uses_lm_head,
)
from peftbench.modeling.sparse import (
    count_trainable,
    effective_selection,
    trainable_entries,
)
from peftbench.training import forgetting, memory
from peftbench.training.cache import ScoreCache, score_key
from peftbench.training.checks import (
    check_count,
    check_frozen,
    checked_score,
    checked_select,
    state_digests,
)
from peftbench.training.record import RunRecord
from peftbench.training.reselect import Reselection, check_reselectable, prepare
from peftbench.training.trainer import make_loader, pick_device, set_seed, train


@dataclass
class RunConfig:
    method: str
    task: str
    budget: str = "0.005"
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = "default"
    device: str = "auto"
    method_params: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    limit: int | None = None  # at most this many rows per split (quick runs, tests)
    output_dir: str = "runs"
    save_trained: bool = False  # also write each seed's trained values (`peftbench export` carries them)


INCOMPLETE = "INCOMPLETE"  # marker file of a run directory that stopped early (reports skip it)


def run_experiment(config: RunConfig, progress: bool = True, score_cache: ScoreCache | None = None,
                   on_epoch=None) -> tuple[dict, Path]:
    """Run every seed; returns (summary, run directory). Inputs are checked before any work.

    With a `score_cache`, scores are read from / written to it (see `peftbench.training.cache`);
    `on_epoch` is passed to the trainer (a sweep's pruner)."""
    selector_cls = registry.get(config.method)
    selector = registry.create(config.method, **config.method_params)  # fail fast on bad parameters
    if config.train.reselect_every:
        check_reselectable(selector, config.method)
    budget = Budget.parse(config.budget)
    task = load_task(config.task)
    device = pick_device(config.device)
    if not progress:
        import datasets
        from transformers.utils import logging

        datasets.disable_progress_bars()
        logging.disable_progress_bar()
    size, positions = pretrained_size(config.model, task.num_labels, uses_lm_head(config.model, task.kind))
    if selector_cls.uses_budget:
        budget.entries(size)  # fail fast, before any I/O
    if config.train.max_length > positions:
        raise UsageError(f"max length {config.train.max_length} is beyond the model's position "
                         f"table: {config.model!r} takes at most {positions} tokens")
    data_digests = task.digests()
    splits = task.load_splits(limit=config.limit)
    if task.digests() != data_digests:
        raise UsageError(f"task {task.name!r}: its files changed while they were read "
                         f"({', '.join(task.data_files())}); run again once they are settled")

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = Path(config.output_dir) / f"{config.method}-{task.name}-b{budget}-{stamp}"
    try:
        run_dir.mkdir(parents=True)
        (run_dir / INCOMPLETE).write_text("running\n")
        write_json(run_dir / "config.json", {
            **asdict(config), "task_spec": str(task.path), "task_files": data_digests,
            "selector": selector_cls.__module__ + "." + selector_cls.__name__,
            "method_distribution": selector_distribution(config.method),
            "torch": torch.__version__, "python": platform.python_version(),
            "device_resolved": str(device)})
    except OSError as err:
        raise UsageError(f"cannot write the run directory {run_dir}: {err.strerror or err} "
                         f"(--output-dir {config.output_dir!r} must be a writable folder)") from None
    results, start = [], time.perf_counter()
    try:
        for seed in config.seeds:
            results.append(_run_seed(config, task, splits, budget, seed, device,
                                     run_dir / f"seed-{seed}", progress, score_cache, on_epoch))
        summary = summarize(config, task, results)
        summary["wall_time_s"] = time.perf_counter() - start
        write_json(run_dir / "summary.json", summary)
    except BaseException as err:  # Ctrl-C, a full disk, a crash: say so in the folder, then go on
        reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
        try:
            (run_dir / INCOMPLETE).write_text(f"{reason}\nseeds finished: {[r['seed'] for r in results]}\n")
        except OSError:
            pass
        if isinstance(err, OSError):
            raise UsageError(f"writing under {run_dir} failed: {err.strerror or err}; the run "
                             "directory is marked INCOMPLETE (reports skip it)") from None
        raise
    (run_dir / INCOMPLETE).unlink()
    return summary, run_dir


def selector_distribution(method: str) -> dict:
    """The distribution (package) a method comes from and its version, for config.json."""
    from peftbench.training.identity import distribution_version

    package = registry.info(method).package
    return {"name": package, "version": distribution_version(package)}


def _run_seed(config: RunConfig, task: TaskSpec, splits, budget: Budget, seed: int,
              device: torch.device, seed_dir: Path, progress: bool,
              score_cache: ScoreCache | None = None, on_epoch=None) -> dict:
    seed_dir.mkdir()
    load_before = machine_load()
    set_seed(seed)
    lm_head = uses_lm_head(config.model, task.kind)
    model, tokenizer = load_model(config.model, task.num_labels, lm_head)
    head_init = init_head(model, task, splits["train"]["label"] if task.kind == "regression" else [])  # before scoring
    tokenized = tokenize(task, tokenizer, splits, config.train.max_length, lm_head)
    retained_before = _retention_before(config.model, model, tokenizer, lm_head, config.train)
    pretrained = pretrained_parameters(model)
    numels = {n: p.numel() for n, p in pretrained.items()}
    head_names = set(head_parameters(model))
    n_pretrained = sum(numels.values())
    k = budget.entries(n_pretrained)

    selector = registry.create(config.method, **config.method_params)
    params = registry.resolved_params(config.method, config.method_params)  # the cache key's and the record's
    generator = torch.Generator().manual_seed(seed)
    memory_reset = memory.reset_peak(device)
    start = time.perf_counter()
    data = None
    if selector.needs_data:
        model.to(device)
        data = ScoringData(make_loader(tokenized["train"], tokenizer, task, config.train.batch_size, True, seed),
                           task, device, RecordedSettings(config.train), progress=progress)
    cache_key, cached = None, False  # a cached entry reports the time its scoring took
    if score_cache is None:
        scores = checked_score(selector, config.method, model, data)
        score_time = time.perf_counter() - start
    else:
        cache_key, about = score_key(
            config.method, params, config.model,
            task.data_files(), seed,
            {"batch_size": config.train.batch_size, "max_length": config.train.max_length,
             "limit": config.limit, "device": device.type,
             "dtype": compute_dtype(device, config.train.bf16)})
        scores, score_time, cached, cache_key = score_cache.get_or_compute(
            cache_key, lambda: checked_score(selector, config.method, model, data), about,
            settings=data.train if data is not None else None)
        if cached:  # read back from a file: held to what a fresh score is held to
            check_scores(config.method, scores)
    start = time.perf_counter()
    theta0 = state_digests(model)  # the pre-trained model the method may not move outside its count
    selection = checked_select(selector, config.method, model, scores, k, generator, theta0)
    selected = validate_selection(config.method, selection, numels, selector.budget_bound(k))
    select_time = time.perf_counter() - start
    scoring_peak = memory.peak(device, memory_reset)  # scoring and selection
    reselect = None
    if config.train.reselect_every:
        model = prepare(model, selection, scores, numels, config.method)
        reselect = Reselection(selector, config.method, data, k, selector.budget_bound(k), numels, seed,
                               config.train.reselect_every)
    else:
        model = selector.apply(model, selection)
    if not any(p.requires_grad for p in model.parameters()):  # e.g. BitFit on a model without biases
        raise UsageError(f"method {config.method!r} leaves nothing to train on {config.model!r} "
                         "(it selected no entry and the model has no new head): choose another method")
    write_json(seed_dir / "selection.json", {
        "budget_entries": k, "pretrained_entries": n_pretrained, "selected_entries":
        selected, "counts_before_training": count_trainable(model, set(pretrained), head_names),
        "scoring_time_s": score_time, "selection_time_s": select_time, "score_cache_key": cache_key,
        "scores_from_cache": cached,
        "per_tensor": {n: [c, numels[n]] for n, c in selection.per_tensor(numels).items()},
        "params": params, "notes": selection.notes})

    out = train(model, selector, task, tokenized, tokenizer, config.train, seed, device,
                seed_dir, progress, on_epoch, reselect)
    check_frozen(config.method, model, set(pretrained), theta0)
    check_count(config.method, model, set(pretrained), head_names, selector.budget_bound(k))
    retained = forgetting.record(retained_before, forgetting.retention(
        model, tokenizer, next(model.parameters()).device, causal=lm_head, **_probe_settings(config.train)),
        causal=lm_head)
    # measured after training: what can differ now (DiffPruning's projected mask, not its plan)
    counts = count_trainable(model, set(pretrained), head_names)
    trained = effective_selection(model, set(pretrained), head_names)
    mask = {"full": sorted(trained.full),
            "partial": {n: idx.to(torch.int32) for n, idx in trained.partial.items()}}
    write_atomic(seed_dir / "mask.pt", lambda tmp: torch.save(mask, tmp))
    if config.save_trained:
        save_trained(model, trained, head_names, seed_dir / TRAINED)
    result = {"seed": seed, "validation": out["validation"], "test": out["test"],
              "best_epoch": out["best_epoch"], "steps": out["steps"], "trainable": counts,
              "diverged": out.get("diverged"), "budget_entries": k, "pretrained_entries": n_pretrained,
              "constant_predictor": constant_predictor(task, splits), "head_init": head_init,
              "scoring_time_s": score_time, "scores_from_cache": cached,
              "train_time_s": out["train_time_s"], "steps_per_s": out["steps_per_s"],
              "peak_memory": {"scoring_bytes": scoring_peak["bytes"],
                              "training_bytes": out["peak_memory"]["bytes"],
                              "kind": out["peak_memory"]["kind"],
                              "since_reset": scoring_peak["since_reset"] and out["peak_memory"]["since_reset"]},
              "trainable_by_tensor": trainable_by_tensor(model, set(pretrained), head_names),
              # under what load the timings were taken: a busy machine's seconds are not a quiet one's
              "load": {"before": load_before, "after": machine_load(), "cores": os.cpu_count()},
              "padding": {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
                          "model_pad_token_id": getattr(model.config, "pad_token_id", None)},
              "test_predictions": out.get("test_predictions"), "forgetting": retained,
              "untrained_as_head": dict(getattr(model, "peftbench_untrained", None) or {}),
              "phases": out.get("phases") or None, "reselections": out.get("reselections"),
              "method_record": selector.training_record()}
    result = RunRecord.model_validate(result).model_dump(mode="json")  # the one result schema
    write_json(seed_dir / "result.json", result)
    return result


TRAINED = "trained.safetensors"


def save_trained(model, trained, head_names: set[str], path: Path) -> None:
    """The values a seed trained, beside its mask: `encoder/<tensor>` holds the tensor after
    training (trained whole) or its masked entries' values in the mask's order, `head/<name>` the
    head; new parameters (LoRA, adapters) are not pre-trained entries and are not written.
    `peftbench export` puts them in the adapter, so the run's fine-tuned model loads through peft."""
    from safetensors.torch import save_file

    from peftbench.modeling.sparse import effective_weight

    tensors = {}
    for name in sorted(trained.full):
        tensors[f"encoder/{name}"] = effective_weight(model, name).detach().float().cpu().contiguous()
    for name, indices in sorted(trained.partial.items()):
        flat = effective_weight(model, name).detach().reshape(-1)
        tensors[f"encoder/{name}"] = flat[indices.to(flat.device)].float().cpu().contiguous()
    for name in sorted(head_names):
        tensors[f"head/{name}"] = model.get_parameter(name).detach().float().cpu().contiguous()
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def machine_load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


_BEFORE: dict[tuple, float | None] = {}


def _probe_settings(train: TrainConfig) -> dict:
    """The run's declared evaluation settings, as the forgetting probe takes them."""
    return {"bf16": train.bf16, "by_length": train.eval_order == "length"}


def _retention_before(model_name: str, model, tokenizer, causal: bool, train: TrainConfig) -> float:
    """The probe on the pre-trained model, once per process, model and evaluation settings (the
    same for every method and seed: the head it does not read is the only difference)."""
    from peftbench.training.identity import model_fingerprint

    settings = _probe_settings(train)
    key = (model_fingerprint(model_name), causal, *settings.values())
    if key not in _BEFORE:
        _BEFORE[key] = forgetting.retention(model, tokenizer, torch.device("cpu"), causal=causal, **settings)
    return _BEFORE[key]


def compute_dtype(device: torch.device, bf16: bool = False) -> str:
    """Master weights are float32 everywhere; CUDA computes under bfloat16 autocast, a CPU with
    the `bf16` setting too."""
    return "bfloat16-autocast" if device.type == "cuda" or bf16 else "float32"


def trainable_by_tensor(model, pretrained_names: set[str], head_names: set[str]) -> dict[str, int]:
    """Where the budget went (measured after training, so DiffPruning's projected mask counts):
    trainable entries per pre-trained tensor and per new parameter; the head is left out."""
    out: dict[str, int] = {}
    for name, kind, count in trainable_entries(model, pretrained_names, head_names):
        if kind != "head" and count:
            out[name] = out.get(name, 0) + count
    return out


def summarize(config: RunConfig, task: TaskSpec, results: list[dict]) -> dict:
    """Mean and std (population std, ddof=0, over seeds) of every test and validation metric,
    over the seeds that did not diverge (those are listed in `diverged_seeds`, never averaged
    in); the constant predictor's test score beside them."""
    ok = [r for r in results if not r.get("diverged")]
    baseline = results[0]["constant_predictor"]
    summary = {"method": config.method, "task": task.name, "budget": config.budget,
               "model": config.model, "main_metric": task.main_metric, "seeds": [r["seed"] for r in results],
               "diverged_seeds": {r["seed"]: r["diverged"] for r in results if r.get("diverged")},
               "trainable": results[0]["trainable"]["trainable"],
               "head": results[0]["trainable"]["head"],
               "pretrained_entries": results[0]["pretrained_entries"],
               "constant_test_main": baseline["test"]["main"], "test_rows": baseline["test_rows"],
               "scoring_time_s": float(np.mean([r["scoring_time_s"] for r in results])),
               "train_time_s": float(np.mean([r["train_time_s"] for r in results])),
               "steps_per_s": float(np.mean([r["steps_per_s"] for r in results])),
               "peak_memory_mb": max(memory.peak_memory_mb(r) for r in results)}
    for split in ("validation", "test"):
        for name in results[0][split]:
            values = np.array([r[split][name] for r in ok], dtype=float)
            summary[f"{split}_{name}_mean"] = float(values.mean()) if len(values) else float("nan")
            summary[f"{split}_{name}_std"] = float(values.std()) if len(values) else float("nan")
    summary["near_constant"] = near_constant(summary["test_main_mean"], summary["test_main_std"],
                                             summary["constant_test_main"], summary["test_rows"], len(ok))
    return summary

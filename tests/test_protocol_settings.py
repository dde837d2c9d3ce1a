"""The declared speed settings (`bf16` on CPU, `eval_order: length`): each does what it says,
keeps every per-example record in the split's order, and enters a cell's fingerprint only when
set, so cells committed before the settings existed stay current."""
import json
from dataclasses import replace

import pytest
import torch

from peftbench.contract.settings import TrainConfig, fingerprinted
from peftbench.data.encode import tokenize
from peftbench.data.tasks import load_task
from peftbench.training.evaluation import evaluate
from peftbench.training.trainer import make_loader


@pytest.mark.parametrize("task_name", ["stsb", "sst2", "copa"])
def test_length_ordered_evaluation_keeps_the_splits_order(tiny_model_dir, task_name):
    """The same predictions row by row (to float rounding) and the same labels in the same
    order as the given order's; fewer padded tokens per split."""
    from peftbench.modeling.models import load_model

    task = load_task(task_name)
    model, tokenizer = load_model(tiny_model_dir, task.num_labels)
    data = tokenize(task, tokenizer, task.load_splits(limit=40), 64)
    loader = make_loader(data["validation"], tokenizer, task, 8, False, 0)
    outs = {}
    for order in ("given", "length"):
        outs[order] = evaluate(model, loader, task, torch.device("cpu"), keep=True,
                               config=TrainConfig(eval_order=order))
    (given, kept_given), (by_length, kept_length) = outs["given"], outs["length"]
    assert kept_given["labels"] == kept_length["labels"]  # the split's order, both ways
    assert kept_given["labels"] == [task.label_id(v) for v in task.load_splits(limit=40)["validation"]["label"]] \
        or task.kind == "regression"
    if task.kind == "regression":
        assert kept_given["predictions"] == pytest.approx(kept_length["predictions"], abs=1e-5)
    else:
        same = sum(a == b for a, b in zip(kept_given["predictions"], kept_length["predictions"]))
        assert same >= len(kept_given["predictions"]) - 1  # a near-tie may flip
    assert given.keys() == by_length.keys()


def test_length_order_pads_fewer_tokens():
    """What the setting buys: on STS-B's validation split, batches of 64 pad far less."""
    from peftbench.training.evaluation import _eval_batches

    task = load_task("stsb")
    from peftbench.modeling.models import load_model

    _, tokenizer = load_model("default", 1)
    data = tokenize(task, tokenizer, task.load_splits(limit=512), 128)
    loader = make_loader(data["validation"], tokenizer, task, 64, False, 0)
    tokens = {order: sum(b["input_ids"].numel() for _, b in _eval_batches(loader, order))
              for order in (False, True)}
    assert tokens[True] < 0.75 * tokens[False]


@pytest.mark.slow
def test_bf16_computes_in_bfloat16_on_cpu_and_is_recorded(tiny_model_dir, tmp_path):
    """A run with `bf16` trains under bfloat16 autocast on CPU (other losses than float32's),
    writes the setting into config.json, and scores are cached under another dtype."""
    from peftbench.training.experiment import RunConfig, compute_dtype, run_experiment

    losses = {}
    for bf16 in (False, True):
        config = RunConfig(method="random", task="rte", budget="0.01", model=tiny_model_dir, limit=16,
                           train=TrainConfig(epochs=1, batch_size=4, max_length=48, lr=1e-2, bf16=bf16),
                           output_dir=str(tmp_path / str(bf16)))
        _, run_dir = run_experiment(config, progress=False)
        assert json.loads((run_dir / "config.json").read_text())["train"]["bf16"] is bf16
        losses[bf16] = json.loads((run_dir / "seed-0" / "metrics.jsonl").read_text().splitlines()[0])["step_losses"]
    assert losses[False] != losses[True]
    assert compute_dtype(torch.device("cpu"), True) != compute_dtype(torch.device("cpu"))


def test_the_settings_enter_a_fingerprint_only_when_set():
    """At their defaults the new settings leave a cell's fingerprint as it was before they
    existed (every committed cell stays current); set, they change it."""
    from dataclasses import asdict

    base = asdict(TrainConfig(lr=1e-3))
    before_settings = {k: v for k, v in base.items()
                       if k not in ("bf16", "eval_order", "gradient_checkpointing", "reselect_every", "head_lr")}
    assert fingerprinted(base) == before_settings
    for change in ({"bf16": True}, {"eval_order": "length"}, {"reselect_every": 50}, {"head_lr": 1e-3}):
        assert fingerprinted(asdict(replace(TrainConfig(lr=1e-3), **change))) != before_settings


def test_a_bad_setting_is_refused_by_name():
    from peftbench.contract.settings import train_config
    from peftbench.core.errors import UsageError

    with pytest.raises(UsageError, match="eval_order"):
        train_config({"eval_order": "random"})
    with pytest.raises(UsageError, match="bf16"):
        train_config({"bf16": "yes"})
    with pytest.raises(UsageError, match="head_lr = 0"):
        train_config({"head_lr": 0})


@pytest.mark.slow
def test_bench_cells_times_real_cells_per_setting_against_the_first(tiny_model_dir):
    """`bench cells`: each variant's cells in their own worker processes, the wall time split
    into its parts, cells per hour and each metric against the baseline of the same run."""
    from peftbench.bench.cells import cells_per_hour

    out = cells_per_hour(("rte/random/0.01/0.01/0",), ("fp32", "bf16+length"), model=tiny_model_dir, limit=16)
    base, fast = out["variants"]["fp32"], out["variants"]["bf16+length"]
    assert base["vs_fp32"] == 1.0 and fast["vs_fp32"] > 0
    cell = fast["cells"]["rte/random/0.01/0.01/0"]
    assert cell["wall_s"] >= cell["scoring_s"] + cell["step_loop_s"] + cell["evaluation_s"] - 1e-6
    assert "test_minus_fp32" in cell and base["cells"]["rte/random/0.01/0.01/0"]["test_minus_fp32"] == 0


def test_bench_tuning_replays_the_committed_per_budget_search():
    """On all-methods-cpu's committed records: successive halving over seeds keeps the two-seed
    rule's rate on every key; the one-seed rule's misses are listed by key."""
    from peftbench.bench.cells import tuning_rules

    out = tuning_rules("all-methods-cpu")
    assert out["summary"]["keys"] == 44
    assert out["summary"]["halving"]["same_rate"] == 44
    one = out["summary"]["one_seed"]
    assert one["same_rate"] < 44 and set(one["not_within"]) <= {
        f"{k['task']}/{k['method']}/{k['budget']}" for k in out["keys"] if not k["one_seed_same"]}


@pytest.mark.parametrize("argv, expected", [
    (["bench", "cells", "--cells", "stsb/random/0.005"], "give task/method/budget/lr/seed"),
    (["bench", "cells", "--variants", "fp16"], "unknown variants ['fp16']"),
    (["bench", "tuning", "--board", "quickstart-sst2"], "no carry.json"),
])
def test_bench_cells_and_tuning_refuse_bad_input_by_name(capsys, argv, expected):
    from conftest import one_line_error

    assert expected in one_line_error(capsys, *argv)


def test_the_forgetting_probe_follows_the_declared_settings(tiny_model):
    """The probe by length gives the given order's statistic (to float rounding); under bf16
    another one, close to it."""
    from peftbench.training import forgetting

    model, tokenizer = tiny_model
    cpu = torch.device("cpu")
    given = forgetting.retention(model, tokenizer, cpu)
    assert forgetting.retention(model, tokenizer, cpu, by_length=True) == pytest.approx(given, abs=1e-4)
    half = forgetting.retention(model, tokenizer, cpu, bf16=True, by_length=True)
    assert half != given and half == pytest.approx(given, abs=0.05)

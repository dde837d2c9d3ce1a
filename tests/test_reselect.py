"""Dynamic masks (`TrainConfig.reselect_every`, SPEFT's `--sparse_mask_update_steps`): a
re-selection keeps the budget, moves entries without touching theta0, and refuses methods that
have no mask to move."""
from __future__ import annotations

import json

import pytest
import torch

from peftbench.contract import registry
from peftbench.contract.settings import TrainConfig, fingerprinted, train_config
from peftbench.core.errors import UsageError
from peftbench.modeling.models import pretrained_parameters
from peftbench.modeling.selection import Selection
from peftbench.training.reselect import (
    Reselection, check_reselectable, merged, prepare, reassign, sparse_deltas, swap_parameter)

WEIGHT = "bert.encoder.layer.0.attention.self.query.weight"
OTHER = "bert.encoder.layer.1.output.dense.weight"


def _prepared(model, chosen=(3, 7, 11)):
    numels = {n: p.numel() for n, p in pretrained_parameters(model).items()}
    theta0 = {n: p.detach().clone() for n, p in pretrained_parameters(model).items()}
    selection = Selection(partial={WEIGHT: torch.tensor(chosen)})
    prepare(model, selection, {WEIGHT: None, OTHER: None}, numels, "test")
    return theta0, numels


def test_reassign_keeps_what_stays_and_returns_dropped_entries_to_theta0(tiny_model):
    model, _ = tiny_model
    theta0, _ = _prepared(model)
    module, attr, delta = sparse_deltas(model)[WEIGHT]
    with torch.no_grad():
        delta.values.copy_(torch.tensor([0.5, -0.25, 1.0]))
    kept = reassign(delta, module.parametrizations[attr].original, torch.tensor([11, 2, 3]))
    assert kept == 2
    flat = module.weight.detach().reshape(-1)
    base = theta0[WEIGHT].reshape(-1)
    assert flat[3] == base[3] + 0.5 and flat[11] == base[11] + 1.0  # kept: its learned value
    assert flat[2] == base[2] and flat[7] == base[7]  # new starts at theta0; dropped is theta0 again
    changed = (flat != base).nonzero().reshape(-1).tolist()
    assert changed == [3, 11] and delta.entries_changed() == 3


def test_merged_scores_theta_plus_delta_and_leaves_theta0_bit_identical(tiny_model):
    model, _ = tiny_model
    theta0, _ = _prepared(model)
    _, _, delta = sparse_deltas(model)[WEIGHT]
    with torch.no_grad():
        delta.values.copy_(torch.tensor([0.5, -0.25, 1.0]))
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with merged(model):
        params = pretrained_parameters(model)
        assert not sparse_deltas(model) and all(p.requires_grad for p in params.values())
        flat = params[WEIGHT].detach().reshape(-1)
        assert flat[7] == theta0[WEIGHT].reshape(-1)[7] - 0.25
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)  # the trained model, merged
    assert set(sparse_deltas(model)) == {WEIGHT, OTHER}
    original = sparse_deltas(model)[WEIGHT][0].parametrizations.weight.original
    assert torch.equal(original, theta0[WEIGHT]) and not original.requires_grad
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert all(p.grad is None for p in model.parameters())


def test_swap_parameter_replaces_it_in_the_optimizer_with_fresh_moments(tiny_model):
    model, _ = tiny_model
    _prepared(model)
    _, _, delta = sparse_deltas(model)[WEIGHT]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    delta.values.grad = torch.ones(3)
    optimizer.step()
    old = delta.values
    assert old in optimizer.state
    module, attr, _ = sparse_deltas(model)[WEIGHT]
    reassign(delta, module.parametrizations[attr].original, torch.tensor([1, 2, 3, 4]))
    swap_parameter(optimizer, params, old, delta.values)
    listed = [p for g in optimizer.param_groups for p in g["params"]]
    assert any(p is delta.values for p in listed) and not any(p is old for p in listed)
    assert old not in optimizer.state and any(p is delta.values for p in params)
    delta.values.grad = torch.ones(4)
    optimizer.step()  # a resized entry set trains on


@pytest.mark.parametrize("method, reason", [("lora", "apply is overridden"), ("diffpruning", "apply is overridden"),
                                            ("bitfit", "no budget"), ("childtuning-f", "hooks")])
def test_a_method_without_a_mask_to_move_is_refused_by_name(method, reason):
    with pytest.raises(UsageError, match=f"{method!r} cannot re-select.*{reason}"):
        check_reselectable(registry.create(method), method)


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow", "skeletonization", "sam", "fish", "random",
                                    "magpruning", "childtuning-d"])
def test_score_and_select_methods_can_be_reselected(method):
    check_reselectable(registry.create(method), method)


def test_reselect_every_is_a_non_negative_setting_left_out_of_fingerprints_at_0():
    with pytest.raises(UsageError, match="reselect_every"):
        train_config({"reselect_every": -1})
    with pytest.raises(UsageError, match="reselect_every"):
        train_config({"reselect_every": "50"})
    assert "reselect_every" not in fingerprinted({"reselect_every": 0, "lr": 1e-3})
    assert fingerprinted({"reselect_every": 50})["reselect_every"] == 50


def test_a_snapshot_restores_the_mask_it_was_taken_with(tiny_model):
    model, _ = tiny_model
    _prepared(model)
    module, attr, delta = sparse_deltas(model)[WEIGHT]
    with torch.no_grad():
        delta.values.copy_(torch.tensor([0.5, -0.25, 1.0]))
    saved = Reselection.snapshot(model)
    weight = module.weight.detach().clone()
    reassign(delta, module.parametrizations[attr].original, torch.tensor([0, 1, 2, 3, 4]))
    assert not torch.equal(module.weight, weight)
    Reselection.restore(model, saved)
    assert torch.equal(module.weight.detach(), weight) and delta.indices.tolist() == [3, 7, 11]


@pytest.mark.slow
def test_a_dynamic_run_keeps_its_budget_and_moves_its_mask(tiny_model_dir, tmp_path):
    """End to end: SNIP re-selected every 2 steps on RTE rows; the count is the budget after
    every re-selection, the runner's frozen-entries check passes (theta0 bit-identical outside
    the mask), the mask moves, and the static run is the one it always was (no record, and the
    fingerprint of reselect_every 0 is that of a config without it)."""
    from peftbench.sweep.spec import cell_config
    from peftbench.training.experiment import RunConfig, run_experiment

    results = {}
    for every in (0, 2):
        config = RunConfig(method="snip", task="rte", budget="0.01", model=tiny_model_dir, limit=16,
                           method_params={"batches": 2},
                           train=TrainConfig(epochs=1, batch_size=4, max_length=48, lr=1e-2,
                                             reselect_every=every),
                           output_dir=str(tmp_path / str(every)))
        _, run_dir = run_experiment(config, progress=False)
        seed = run_dir / "seed-0"
        results[every] = (json.loads((seed / "result.json").read_text()),
                          json.loads((seed / "selection.json").read_text()), torch.load(seed / "mask.pt"),
                          cell_config(config))
    static, dynamic = results[0], results[2]
    assert static[0]["reselections"] is None
    k = dynamic[0]["budget_entries"]
    steps = [r["step"] for r in dynamic[0]["reselections"]]
    assert steps == [2] and dynamic[0]["steps"] == 4  # 16 rows at batch 4: none after the last step
    assert all(r["entries"] == k for r in dynamic[0]["reselections"])
    assert dynamic[0]["trainable"]["encoder"] == k == static[0]["trainable"]["encoder"]
    assert sum(len(v) for v in dynamic[2]["partial"].values()) == k
    assert all(len(v) for v in dynamic[2]["partial"].values())  # no empty entry for a tensor left out
    first = {n: set(v.tolist()) for n, v in static[2]["partial"].items()}  # the same first selection
    last = {n: set(v.tolist()) for n, v in dynamic[2]["partial"].items()}
    assert first != last
    assert dynamic[0]["reselections"][0]["kept"] < k
    assert static[3] != dynamic[3]
    assert "reselect_every" not in json.dumps(static[3])


def test_the_run_command_takes_reselect_every_and_refuses_what_cannot_reselect(capsys, tiny_model_dir, tmp_path):
    """`peftbench run --reselect-every N`: a bad N and a method with no mask to move are refused
    in one line before any run folder is written."""
    from conftest import one_line_error

    common = ["--task", "rte", "--model", tiny_model_dir, "--limit", "8", "--output-dir", str(tmp_path)]
    msg = one_line_error(capsys, "run", "--method", "snip", "--reselect-every", "-1", *common)
    assert "reselect_every" in msg and "-1" in msg
    msg = one_line_error(capsys, "run", "--method", "lora", "--reselect-every", "5", *common)
    assert "'lora' cannot re-select its mask" in msg
    assert not any(tmp_path.iterdir())


def test_a_method_that_scores_nothing_has_nothing_to_reselect_by(tiny_model):
    model, _ = tiny_model
    numels = {n: p.numel() for n, p in pretrained_parameters(model).items()}
    with pytest.raises(UsageError, match="'bitfit' scores nothing"):
        prepare(model, Selection(), None, numels, "bitfit")

"""Training touches nothing outside the selection; counts are uniform; state is ∝ trainable."""
import math

import pytest
import torch

from peftbench.contract import registry
from peftbench.contract.settings import TrainConfig
from peftbench.data.encode import tokenize
from peftbench.data.tasks import load_task
from peftbench.modeling.models import head_parameters, pretrained_parameters
from peftbench.modeling.sparse import count_trainable, effective_weight
from peftbench.training.trainer import pick_device, train


@pytest.fixture(scope="module")
def rte_small():
    return load_task("rte"), load_task("rte").load_splits(limit=48)


@pytest.mark.parametrize("method", ["random", "magpruning", "bitfit"])
def test_frozen_entries_are_bit_identical_after_training(tiny_model, rte_small, tmp_path, method):
    model, tokenizer = tiny_model
    task, splits = rte_small
    params = pretrained_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    numels = {n: p.numel() for n, p in params.items()}
    head_names = set(head_parameters(model))
    selector = registry.create(method)
    k = math.floor(0.02 * sum(numels.values()))
    selection = selector.select(model, selector.score(model, None), k, torch.Generator().manual_seed(0))
    model = selector.apply(model, selection)
    counts = count_trainable(model, set(params), head_names)
    assert counts["encoder"] == selection.count(numels) and counts["new"] == 0
    assert counts["head"] == sum(p.numel() for p in head_parameters(model).values())

    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_ratio=0.0, max_steps=4)
    train(model, selector, task, tokenize(task, tokenizer, splits, 64), tokenizer, config,
          seed=0, device=pick_device("cpu"), run_dir=tmp_path, progress=False)

    changed = 0
    for name in params:
        after = effective_weight(model, name).detach()
        mask = selection.mask(name, after.shape)
        assert torch.equal(after[~mask], before[name][~mask]), f"{name} moved outside the mask"
        changed += int((after != before[name]).sum())
    assert 0 < changed <= selection.count(numels)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_optimizer_state_grows_with_trainable_count(tiny_model, rte_small, tmp_path):
    """Only the sparse values (k entries) and the head are optimizer parameters."""
    model, tokenizer = tiny_model
    selector = registry.create("random")
    model = selector.apply(model, selector.select(model, None, 100, torch.Generator()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 100 + sum(p.numel() for p in head_parameters(model).values())


@pytest.mark.parametrize("method", ["random", "diffpruning"])
def test_head_lr_sets_the_heads_rate_and_nothing_else(tiny_model_dir, method):
    """The head (new output layer, and a pooler the checkpoint did not train) learns at
    `head_lr`; the selection at the run's lr; a method's own rates (DiffPruning's gates) win."""
    from peftbench.modeling.models import load_model
    from peftbench.modeling.sparse import decay_plan
    from peftbench.training.trainer import optimizer_and_schedule

    model, _ = load_model(tiny_model_dir, 2)
    selector = registry.create(method, **({"alpha_lr": 0.1, "w_lr": 1e-5} if method == "diffpruning" else {}))
    model = selector.apply(model, selector.select(model, None, 500, torch.Generator().manual_seed(0)))
    head = set(head_parameters(model))
    assert any("pooler" in n for n in head) and any("classifier" in n for n in head)
    own = {n for n in selector.learning_rates(model, 1e-2, 0)}
    decay, no_decay, _ = decay_plan(model)
    for head_lr in (None, 5e-4):
        config = TrainConfig(lr=1e-2, head_lr=head_lr, warmup_ratio=0.0)
        optimizer, _ = optimizer_and_schedule(model, selector, decay, no_decay, config, [0, 10])
        rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            if p.requires_grad and name not in own:
                assert rate[id(p)] == (head_lr if head_lr and name in head else 1e-2), name
        assert all(rate[id(p)] in (0.1, 1e-5) for n, p in model.named_parameters() if n in own)


def test_training_is_reproducible_from_the_seed(tiny_model_dir, rte_small, tmp_path):
    from peftbench.modeling.models import load_model
    from peftbench.training.trainer import set_seed

    task, splits = rte_small
    outs = []
    for run in range(2):
        set_seed(3)
        model, tokenizer = load_model(tiny_model_dir, 2)
        selector = registry.create("random")
        model = selector.apply(model, selector.select(model, None, 500, torch.Generator().manual_seed(3)))
        (tmp_path / str(run)).mkdir()
        out = train(model, selector, task, tokenize(task, tokenizer, splits, 64), tokenizer,
                    TrainConfig(epochs=1, batch_size=8, max_steps=3), seed=3,
                    device=pick_device("cpu"), run_dir=tmp_path / str(run), progress=False)
        outs.append(out["test"])
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_bench_step_reports_ratios_and_state_grows_with_trainable_count(tiny_model_dir):
    """Each variant in its own process; the ratios are to the floor and to full tuning of the
    same run; AdamW keeps 2 moments per trainable entry, so sparse state is ~p of full."""
    from peftbench.bench.step import step_cost

    out = step_cost(tiny_model_dir, ("floor", "fulltuning", "random-tensor", "bitfit"), steps=1,
                    rounds=1, batch_size=2, length=16)["variants"]
    assert out["fulltuning"]["step_vs_fulltuning"] == 1.0 and out["floor"]["memory_vs_floor"] == 1.0
    full = out["fulltuning"]["optimizer_state_bytes"]
    for variant in ("random-tensor", "bitfit"):
        ratio = out[variant]["optimizer_state_bytes"] / full
        expected = out[variant]["optimizer_params"] / out["fulltuning"]["optimizer_params"]
        assert ratio == pytest.approx(expected, rel=0.05) and ratio < 0.05
    assert all(v["peak_memory_bytes"] > 0 and len(v["step_s_rounds"]) == 1 for v in out.values())
    assert all(0 < v["step_memory_growth_bytes"] < v["peak_memory_bytes"] for v in out.values())


def test_a_bf16_variant_runs_the_same_step_under_autocast(tiny_model_dir, capsys):
    """`+bf16` after a variant's name times its step with the forward in bfloat16 (autocast):
    the logits come out in bfloat16 (fp32 without it); a name that is not a variant is refused
    by name."""
    import torch

    from peftbench.bench.step import prepare_step
    from peftbench.cli.main import main

    dtypes = {}
    for variant in ("random-global", "random-global+bf16"):
        one_step, model = prepare_step(variant, tiny_model_dir, batch_size=2, length=16)
        captured = []
        model.register_forward_hook(lambda m, i, out: captured.append(out.logits.dtype))
        one_step()
        dtypes[variant] = captured[0]
    assert dtypes == {"random-global": torch.float32, "random-global+bf16": torch.bfloat16}
    assert main(["bench", "step", "--model", tiny_model_dir, "--variants", "random-global+bf32"]) == 2
    assert "unknown variants ['random-global+bf32']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "lora"])
def test_gradient_checkpointing_saves_memory_not_numbers(tiny_model_dir, tmp_path, method):
    """Recomputing activations in the backward gives the same run (CPU, same seed) through the
    sparse step and through peft's LoRA; it is left out of a cell's fingerprint."""
    import json

    from peftbench.sweep.spec import cell_config
    from peftbench.training.experiment import RunConfig, run_experiment

    results = []
    for checkpointing in (False, True):
        config = RunConfig(method=method, task="rte", budget="0.01", model=tiny_model_dir, limit=16,
                           method_params={"r": 2} if method == "lora" else {},
                           train=TrainConfig(epochs=1, batch_size=4, max_length=48, lr=1e-2,
                                             gradient_checkpointing=checkpointing),
                           output_dir=str(tmp_path / str(checkpointing)))
        _, run_dir = run_experiment(config, progress=False)
        results.append({**json.loads((run_dir / "seed-0" / "result.json").read_text()),
                        "losses": [json.loads(line)["step_losses"] for line in
                                   (run_dir / "seed-0" / "metrics.jsonl").read_text().splitlines()]})
        if checkpointing:
            assert cell_config(config) == cell_config(RunConfig(**{**config.__dict__, "train": TrainConfig(
                epochs=1, batch_size=4, max_length=48, lr=1e-2)}))
    assert results[0]["test"] == results[1]["test"] and results[0]["validation"] == results[1]["validation"]
    assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"][0]) == 4  # step for step

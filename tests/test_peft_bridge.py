"""Selections out to peft and peft's sparse tuners in (`peftbench.modeling.peftsparse`): an exported
adapter trains exactly the selected entries, as peftbench's own sparse step does, step for step;
what peft's SHiRA cannot express is listed; SHiRA and Super-Tuning are counted by the one rule."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from peftbench.contract import registry
from peftbench.modeling import peftsparse
from peftbench.modeling.models import head_parameters, pretrained_parameters
from peftbench.modeling.selection import Selection
from peftbench.modeling.sparse import apply_selection, count_trainable, effective_weight
from peftbench.training import export


def _linear_weights(model) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and f"{n}.weight" in pretrained_parameters(model)}


def _random_selection(model, fraction=0.02, seed=0) -> Selection:
    """Random entries of every encoder Linear weight, plus one bias (which SHiRA cannot take)."""
    params = pretrained_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    selection = Selection()
    for name in sorted(_linear_weights(model)):
        count = max(1, int(fraction * params[name].numel()))
        selection.partial[name] = torch.randperm(params[name].numel(), generator=generator)[:count].sort().values
    selection.partial["bert.encoder.layer.0.output.dense.bias"] = torch.tensor([0, 3, 5])
    return selection


def _batches(n=3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(1000, 20000, (4, 16), generator=generator),
             torch.randint(0, 2, (4,), generator=generator)) for _ in range(n)]


def _train(model, batches, lr=1e-2):
    """The user's own loop: AdamW (no weight decay) over whatever requires grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for ids, labels in batches:
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_an_exported_adapter_trains_the_selected_entries_as_peftbench_does(tiny_model, tmp_path):
    model, _ = tiny_model
    model.eval()  # no dropout: both engines see the same function
    selection = _random_selection(model)
    before = {n: p.detach().clone() for n, p in pretrained_parameters(model).items()}
    report = export.export_selection(model, selection, tmp_path / "adapter")
    assert report.left_out == {"bert.encoder.layer.0.output.dense.bias": 3}  # listed, not dropped
    assert report.expressed == sum(len(i) for n, i in selection.partial.items() if n.endswith("weight"))
    assert not report.from_pretrained  # counts per layer differ: peft's one r cannot size them
    assert "3 entries" in report.summary() and "layer.0.output.dense.bias: 3" in report.summary()
    manifest = json.loads((tmp_path / "adapter" / export.MANIFEST).read_text())
    assert manifest["left_out"] == report.left_out
    assert all(torch.equal(p, before[n]) for n, p in pretrained_parameters(model).items())  # untouched

    ours = apply_selection(copy.deepcopy(model), Selection(
        partial={n: i for n, i in selection.partial.items() if n.endswith("weight")}))
    theirs = export.load(copy.deepcopy(model), tmp_path / "adapter")
    theirs.eval()
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    batches = _batches()
    torch.testing.assert_close(_train(theirs, batches), _train(ours, batches), rtol=1e-5, atol=1e-6)

    inner = theirs.base_model.model
    for name, w0 in before.items():
        module_name, _, attr = name.rpartition(".")
        module = inner.get_submodule(module_name)
        weight = peftsparse.effective_weight(module) if attr == "weight" else None
        weight = getattr(module, attr).detach() if weight is None else weight
        mask = selection.mask(name, w0.shape) if name in selection.partial and attr == "weight" \
            else torch.zeros_like(w0, dtype=torch.bool)
        assert torch.equal(weight[~mask], w0[~mask]), f"{name}: an entry outside the selection moved"
        if mask.any():
            assert (weight[mask] != w0[mask]).all(), f"{name}: a selected entry did not train"
            torch.testing.assert_close(weight, effective_weight(ours, name).detach(), rtol=1e-5,
                                       atol=1e-6, msg=name)


def test_the_two_engines_give_the_same_gradients_on_the_same_mask(tiny_model, tmp_path):
    model, _ = tiny_model
    model.eval()
    selection = _random_selection(model)
    del selection.partial["bert.encoder.layer.0.output.dense.bias"]
    export.export_selection(model, selection, tmp_path / "adapter")
    ours = apply_selection(copy.deepcopy(model), selection)
    theirs = export.load(copy.deepcopy(model), tmp_path / "adapter")
    ids, labels = _batches(1)[0]
    for net in (ours, theirs):
        torch.nn.functional.cross_entropy(net(input_ids=ids).logits, labels).backward()
    ours_grads = {n.replace(".parametrizations.weight.0.values", ".weight"): p.grad
                  for n, p in ours.named_parameters() if n.endswith(".values")}
    theirs_grads = {f"{name}.weight": values.grad for name, values, _ in
                    peftsparse.sparse_layers(theirs.base_model.model)}
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) == len(selection.partial)
    for name, grad in ours_grads.items():  # both in the selection's (row-major) order
        torch.testing.assert_close(theirs_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shira_own_selection_loads_with_bare_peft(tiny_model, tmp_path):
    from peft import PeftModel

    model, _ = tiny_model
    shira = registry.create("shira", r=2)
    selection = shira.select(model, None, 0, torch.Generator().manual_seed(0))
    report = export.export_selection(model, selection, tmp_path / "adapter")
    assert report.from_pretrained and report.r == 2 and not report.left_out
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    flat = {f"{n}.weight": f.sort().values for n, _, f in peftsparse.sparse_layers(loaded.base_model.model)}
    assert flat.keys() == selection.partial.keys()
    assert all(torch.equal(flat[n], selection.partial[n]) for n in flat)


@pytest.mark.parametrize("method, params", [("shira", {"r": 2}), ("supertuning", {})])
def test_peft_sparse_methods_count_their_entries_as_pretrained_entries(tiny_model, method, params):
    model, _ = tiny_model
    pretrained, heads = set(pretrained_parameters(model)), set(head_parameters(model))
    selector = registry.create(method, **params)
    numel = sum(p.numel() for p in pretrained_parameters(model).values())
    selection = selector.select(model, None, numel // 100, torch.Generator().manual_seed(0))
    trained = selector.apply(model, selection)
    counts = count_trainable(trained, pretrained, heads)
    assert counts["new"] == 0 and counts["encoder"] == sum(len(i) for i in selection.partial.values())


def test_supertuning_takes_the_largest_entries_of_each_layer_at_one_share(tiny_model):
    model, _ = tiny_model
    selection = registry.create("supertuning").select(model, None, 4000, torch.Generator())
    total = selection.notes["target_entries"]
    assert sum(len(i) for i in selection.partial.values()) <= 4000
    for name, indices in selection.partial.items():
        weight = dict(model.named_parameters())[name].detach().abs().flatten()
        assert len(indices) == int(weight.numel() * 4000 / total) or \
            len(indices) == int(weight.numel() * (1 - selection.notes["sparsity"]))
        assert weight[indices].min() >= weight[~selection.mask(name, weight.shape)].max()


def test_supertuning_refuses_a_budget_above_its_layers(tiny_model):
    from peftbench.core.errors import UsageError

    model, _ = tiny_model
    with pytest.raises(UsageError, match="more than the .* entries of its target layers"):
        registry.create("supertuning").select(model, None, 10**7, torch.Generator())


@pytest.mark.slow
def test_export_cli_on_a_run_and_its_bad_input(tmp_path, capsys, tiny_model_dir):
    from conftest import one_line_error

    from peftbench.cli.main import main

    assert main(["run", "--method", "random", "--task", "sst2", "--model", tiny_model_dir,
                 "--max-steps", "1", "--limit", "16", "--budget", "0.01", "--quiet",
                 "--output-dir", str(tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    capsys.readouterr()
    assert main(["export", str(run_dir), "--to", "peft", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "train through SHiRA" in out and "not expressible" in out and "embeddings" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "not a run directory" in one_line_error(capsys, "export", str(tmp_path), "--to", "peft",
                                                   str(tmp_path / "x"))
    assert "no finished seed 7" in one_line_error(capsys, "export", str(run_dir), "--seed", "7",
                                                  "--to", "peft", str(tmp_path / "x"))
    # the same folder again is ours (its manifest); a folder of the user's is refused, untouched
    assert main(["export", str(run_dir), "--to", "peft", str(tmp_path / "adapter")]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "adapter_config.json").write_text("{}")
    assert "holds files peftbench did not write" in one_line_error(capsys, "export", str(run_dir), "--to", "peft",
                                                                  str(mine))
    assert (mine / "adapter_config.json").read_text() == "{}" and len(list(mine.iterdir())) == 1
    board = tmp_path / "board"
    board.mkdir()
    (board / "spec.yaml").write_text("name: b\n")
    assert "a board's or a cell's folder" in one_line_error(capsys, "export", str(run_dir), "--to", "peft", str(board))
    assert sorted(p.name for p in board.iterdir()) == ["spec.yaml"]


@pytest.mark.slow
def test_bench_races_peft_shira_on_peftbench_mask(tiny_model_dir):
    """`bench step`'s race: the two engines train the same entries (same optimizer size)."""
    from peftbench.bench.step import step_cost

    out = step_cost(tiny_model_dir, ("sparse-tensor-linear", "shira-tensor-linear"), steps=1,
                    rounds=1, batch_size=2, length=16)["variants"]
    assert out["sparse-tensor-linear"]["optimizer_params"] == out["shira-tensor-linear"]["optimizer_params"]
    assert all(v["step_s_min"] > 0 and v["peak_memory_bytes"] > 0 for v in out.values())


@pytest.mark.slow
def test_a_run_saved_with_its_trained_values_loads_through_peft_as_it_was_tested(tmp_path, capsys, tiny_model_dir):
    """`run --save-trained` then `export`: the adapter holds the run's trained entries and head,
    so the model loaded through peft scores the run's own test metric (Super-Tuning: every
    selected entry is in a Linear weight, so nothing is left out)."""
    from peftbench.cli.main import main
    from peftbench.data.encode import tokenize
    from peftbench.data.tasks import load_task
    from peftbench.modeling.models import load_model
    from peftbench.training.evaluation import evaluate
    from peftbench.training.record import RunRecord
    from peftbench.training.trainer import make_loader, pick_device

    assert main(["run", "--method", "supertuning", "--task", "rte", "--model", tiny_model_dir,
                 "--epochs", "1", "--max-steps", "4", "--limit", "64", "--budget", "0.005", "--lr", "0.01", "--quiet",
                 "--save-trained", "--output-dir", str(tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    capsys.readouterr()
    assert main(["export", str(run_dir), "--to", "peft", str(tmp_path / "adapter")]) == 0
    assert "the run's trained entries and head" in capsys.readouterr().out
    task = load_task("rte")
    base, tokenizer = load_model(tiny_model_dir, task.num_labels)
    model = export.load(base, tmp_path / "adapter", is_trainable=False)
    data = tokenize(task, tokenizer, task.load_splits(limit=64), 128)
    scored = evaluate(model, make_loader(data["test"], tokenizer, task, 8, False, 0), task, pick_device("cpu"))
    record = RunRecord.read(run_dir / "seed-0" / "result.json")
    assert scored["main"] == pytest.approx(record.test["main"])
    from safetensors.torch import load_file

    from peftbench.core.safeload import load_pt

    saved, mask = load_file(str(run_dir / "seed-0" / "trained.safetensors")), load_pt(run_dir / "seed-0" / "mask.pt")
    inner, fresh = model.base_model.model, load_model(tiny_model_dir, task.num_labels)[0]
    moved = 0
    for name, indices in mask["partial"].items():  # the run's trained values, entry for entry
        weight = peftsparse.effective_weight(inner.get_submodule(name.rpartition(".")[0])).reshape(-1)
        torch.testing.assert_close(weight[indices.long()], saved[f"encoder/{name}"], rtol=1e-6, atol=1e-6)
        moved += int((saved[f"encoder/{name}"] != fresh.get_parameter(name).detach().reshape(-1)[indices.long()]).sum())
    assert moved > 0  # training moved entries, and the adapter carries them
    head = {k.removeprefix("head/"): v for k, v in saved.items() if k.startswith("head/")}
    for name, value in head.items():
        assert torch.equal(model.get_parameter(f"base_model.model.{name.replace('classifier.', 'classifier.modules_to_save.default.')}"), value)

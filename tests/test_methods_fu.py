"""Fu et al.'s method set: each method's defining property, on a tiny model and real RTE rows."""
import math
import shutil

import pytest
import torch
from torch import nn

from peftbench.contract import registry
from peftbench.contract.scoring import ScoringData
from peftbench.contract.selector import top_k
from peftbench.contract.settings import TrainConfig
from peftbench.data.encode import tokenize
from peftbench.data.tasks import load_task
from peftbench.modeling.compute import forward, loss_fn
from peftbench.modeling.models import head_parameters, load_model, pretrained_parameters
from peftbench.modeling.sparse import count_trainable, effective_weight
from peftbench.training.trainer import make_loader, pick_device, train

CPU = pick_device("cpu")


@pytest.fixture(scope="module")
def rte():
    task = load_task("rte")
    return task, task.load_splits(limit=24)


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _scoring(task, tokenized, tokenizer, batch_size=4):
    return ScoringData(make_loader(tokenized["train"], tokenizer, task, batch_size, False, 0), task, CPU)


def test_sam_scores_equal_brute_force_and_make_no_update(tiny_model_dir, rte):
    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    _no_dropout(model)
    data = _scoring(task, tokenize(task, tokenizer, splits, 64), tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam = registry.create("sam", burnin=3)
    scores = sam.score(model, data)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), "SAM scoring changed the model"

    brute = {n: torch.zeros_like(p) for n, p in pretrained_parameters(model).items()}
    for batch in list(data.batches())[:3]:
        model.zero_grad()
        loss_fn(forward(model, batch, task), batch["labels"], task).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        for n in brute:
            brute[n] += dict(model.named_parameters())[n].grad
    for n in brute:
        torch.testing.assert_close(scores[n], brute[n].abs(), rtol=1e-5, atol=1e-8)
    k = 1000
    chosen = sam.select(model, scores, k, torch.Generator().manual_seed(0))
    expected = top_k({n: b.abs() for n, b in brute.items()}, k, "tensor", torch.Generator().manual_seed(0))
    for n in brute:
        assert torch.equal(chosen.mask(n, brute[n].shape), expected.mask(n, brute[n].shape))


def test_fish_equals_mean_of_per_example_squared_gradients(tiny_model_dir, rte):
    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    tokenized = tokenize(task, tokenizer, splits, 64)
    data = _scoring(task, tokenized, tokenizer)
    scores = registry.create("fish", num_samples=6).score(model, data)

    model.eval()
    params = pretrained_parameters(model)
    brute = {n: torch.zeros_like(p) for n, p in params.items()}
    single = make_loader(tokenized["train"], tokenizer, task, 1, False, 0)
    for batch, _ in zip(single, range(6)):  # one unpadded example at a time, plain loop
        model.zero_grad()
        loss_fn(forward(model, batch, task), batch["labels"], task).backward()
        for n, p in params.items():
            brute[n] += p.grad.square() / 6
    for n in brute:
        torch.testing.assert_close(scores[n], brute[n], rtol=1e-4, atol=1e-9)


def test_childtuning_d_is_mean_of_per_tensor_clipped_squares(tiny_model_dir, rte):
    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    _no_dropout(model)
    data = _scoring(task, tokenize(task, tokenizer, splits, 64), tokenizer)
    scores = registry.create("childtuning-d", clip=0.01).score(model, data)
    params = pretrained_parameters(model)
    brute = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = list(data.batches())
    for batch in batches:
        model.zero_grad()
        loss_fn(forward(model, batch, task), batch["labels"], task).backward()
        for n, p in params.items():
            g = p.grad * min(1.0, 0.01 / (p.grad.norm() + 1e-6))
            brute[n] += g.square() / len(batches)
    for n in brute:
        torch.testing.assert_close(scores[n], brute[n], rtol=1e-4, atol=1e-12)


def test_childtuning_f_masks_change_every_step_and_scale_by_1_over_p(tiny_model):
    model, _ = tiny_model
    method = registry.create("childtuning-f", p=0.25)
    method.apply(model, method.select(model, None, 0, torch.Generator().manual_seed(0)))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    param = dict(model.named_parameters())[name]
    kept = []
    for step in range(2):
        grad = torch.randn_like(param)
        param.grad = grad.clone()
        method.before_step(model, step)
        nonzero = param.grad != 0
        torch.testing.assert_close(param.grad[nonzero], grad[nonzero] / 0.25)
        assert abs(nonzero.float().mean().item() - 0.25) < 0.02
        kept.append(nonzero)
    assert not torch.equal(kept[0], kept[1])


def test_diffpruning_l0_formula_and_exact_projection(tiny_model_dir, rte, tmp_path):
    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    params = pretrained_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    k = 777
    method = registry.create("diffpruning", burnin=3, lam=2.0, stretch=3.0)
    model = method.apply(model, method.select(model, None, k, torch.Generator().manual_seed(0)))
    alphas = torch.cat([g.alpha.detach().flatten() for g in method._gates.values()])
    expected = 2.0 * torch.sigmoid(alphas - math.log(3.0 / 3.0)).sum() / total
    torch.testing.assert_close(method.loss_term(model, 0), expected)
    assert method.loss_term(model, 3) is None
    train(model, method, task, tokenize(task, tokenizer, splits, 64), tokenizer,
          TrainConfig(epochs=2, batch_size=4, lr=1e-2, max_steps=8), seed=0, device=CPU,
          run_dir=tmp_path, progress=False)
    assert int(sum(g.mask.sum() for g in method._gates.values())) == k
    assert all(g.projected for g in method._gates.values())
    changed = sum(int((effective_weight(model, n) != before[n]).sum()) for n in params)
    assert 0 < changed <= k
    counts = count_trainable(model, set(params), set(head_parameters(model)))
    assert counts["trainable"] == k


def test_lora_counts_and_leaves_base_weights_identical(tiny_model_dir, rte, tmp_path):
    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    params = pretrained_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    lora = registry.create("lora", r=4)
    model = lora.apply(model, lora.select(model, None, 0, torch.Generator()))
    counts = count_trainable(model, set(params), set(head_parameters(model)))
    # hidden 32, intermediate 64, 2 layers: q,k,v,attn-out 4 x 4(32+32), intermediate 4(32+64),
    # the head: the classifier and the untrained pooler (32 x 32 + 32),
    # output 4(64+32)
    assert counts == {"encoder": 0, "new": 2 * (4 * 4 * 64 + 2 * 4 * 96), "head": 66 + 32 * 32 + 32,
                      "trainable": 2 * (4 * 4 * 64 + 2 * 4 * 96), "total": 2 * (4 * 4 * 64 + 2 * 4 * 96) + 66 + 32 * 32 + 32}
    train(model, lora, task, tokenize(task, tokenizer, splits, 64), tokenizer,
          TrainConfig(epochs=1, batch_size=4, lr=1e-2, max_steps=3), seed=0, device=CPU,
          run_dir=tmp_path, progress=False)
    for n in params:
        assert torch.equal(effective_weight(model, n), before[n])
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_mixout_training_forward_follows_lee_et_al():
    from peftbench.methods.mixout import MixoutWeight

    u = torch.randn(3, 5)
    w = u + torch.randn(3, 5)
    mix = MixoutWeight(u, p=0.6, mode="train", generator=torch.Generator().manual_seed(1))
    out = mix(w)
    keep = (torch.rand(5, generator=torch.Generator().manual_seed(1)) >= 0.6).float()
    torch.testing.assert_close(out, ((1 - keep) * u + keep * w - 0.6 * u) / 0.4)
    mix.eval()
    assert torch.equal(mix(w), w)
    # expectation over masks is w (unbiased mixing)
    mix.train()
    mean = torch.stack([mix(w) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, w, atol=0.15, rtol=0)


def test_mixout_eval_mode_resets_with_probability_p():
    from peftbench.methods.mixout import MixoutWeight

    u, w = torch.zeros(100, 100), torch.ones(100, 100)
    mix = MixoutWeight(u, p=0.3, mode="eval", generator=torch.Generator().manual_seed(0))
    assert torch.equal(mix(w), w)  # training: plain fine-tuning
    mix.eval()
    assert abs((mix(w) == 0).float().mean().item() - 0.3) < 0.02
    assert torch.equal(mix(w), mix(w))  # deterministic across evaluations


@pytest.mark.parametrize("method, params", [
    ("sam", {"burnin": 2}), ("fish", {"num_samples": 4}), ("childtuning-d", {"batches": 2}),
    ("random", {}), ("magpruning", {}), ("bitfit", {})])
def test_frozen_entries_bit_identical_and_count_matches_mask(tiny_model_dir, rte, tmp_path,
                                                             method, params):
    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    tokenized = tokenize(task, tokenizer, splits, 64)
    pre = pretrained_parameters(model)
    before = {n: p.detach().clone() for n, p in pre.items()}
    numels = {n: p.numel() for n, p in pre.items()}
    selector = registry.create(method, **params)
    data = _scoring(task, tokenized, tokenizer) if selector.needs_data else None
    selection = selector.select(model, selector.score(model, data), 2000, torch.Generator())
    model = selector.apply(model, selection)
    counts = count_trainable(model, set(pre), set(head_parameters(model)))
    assert counts["encoder"] == selection.count(numels)
    train(model, selector, task, tokenized, tokenizer,
          TrainConfig(epochs=1, batch_size=4, lr=1e-2, weight_decay=0.1, max_steps=3), seed=0,
          device=CPU, run_dir=tmp_path, progress=False)
    for n in pre:
        after = effective_weight(model, n)
        mask = selection.mask(n, after.shape)
        assert torch.equal(after[~mask], before[n][~mask]), f"{method}: {n} moved outside the mask"


def test_adapter_starts_at_the_pretrained_function_and_keeps_base_identical(tiny_model_dir, rte, tmp_path):
    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    model.eval()
    tokenized = tokenize(task, tokenizer, splits, 64)
    batch = next(iter(make_loader(tokenized["test"], tokenizer, task, 4, False, 0)))
    reference = forward(model, batch, task).detach()
    params = pretrained_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    adapter = registry.create("adapter", reduction_factor=8)
    model = adapter.apply(model, adapter.select(model, None, 0, torch.Generator()))
    model.eval()
    torch.testing.assert_close(forward(model, batch, task), reference)
    counts = count_trainable(model, set(params), set(head_parameters(model)))
    # 2 layers x 2 adapters, hidden 32 -> bottleneck 4: down 32*4+4, up 4*32+32
    assert counts["new"] == 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32) and counts["encoder"] == 0
    train(model, adapter, task, tokenized, tokenizer,
          TrainConfig(epochs=1, batch_size=4, lr=1e-2, max_steps=3), seed=0, device=CPU,
          run_dir=tmp_path, progress=False)
    for n in params:
        assert torch.equal(effective_weight(model, n), before[n])


def test_fish_batched_per_example_fisher_equals_the_one_example_loop(tiny_model_dir):
    """The CUDA path (hooks over a padded batch) gives each example's own gradient: the same
    empirical Fisher as scoring one trimmed example at a time (position embeddings, which are
    broadcast over the batch, included)."""
    from peftbench.contract.scoring import ScoringData
    from peftbench.data.encode import tokenize
    from peftbench.data.tasks import load_task
    from peftbench.methods import fish
    from peftbench.modeling.models import load_model
    from peftbench.training.trainer import make_loader, pick_device

    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir, 2)
    model.eval()
    data = tokenize(task, tokenizer, task.load_splits(limit=16), 64)
    scoring = lambda: ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task,
                                  pick_device("cpu"))  # the same shuffle for both
    assert fish.per_example_supported(model)
    batched, n_batched = fish.per_example_fisher(model, scoring(), 10)  # 2.5 batches: cut to 10
    loop, n_loop = fish._loop_fisher(model, scoring(), 10)
    assert n_batched == n_loop == 10 and batched.keys() == loop.keys()
    scale = max(f.abs().max() for f in loop.values())
    for name, f in loop.items():
        torch.testing.assert_close(batched[name], f, rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert all(p.requires_grad for p in model.bert.parameters())  # left as found


def test_fish_uses_each_row_once_when_asked_for_more_examples_than_rows(tiny_model_dir):
    """As the reference: its loop over the loader stops at N or at the end of the data, so with
    fewer training rows than `num_samples` every row is used once (not cycled)."""
    from peftbench.methods import fish

    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir, 2)
    model.eval()
    data = tokenize(task, tokenizer, task.load_splits(limit=10), 64)
    scoring = lambda: ScoringData(make_loader(data["train"], tokenizer, task, 4, False, 0), task, CPU)
    for fisher_of in (fish._loop_fisher, fish.per_example_fisher):
        _, seen = fisher_of(model, scoring(), 100)
        assert seen == 10
    many = registry.create("fish", num_samples=100).score(model, scoring())
    exact = registry.create("fish", num_samples=10).score(model, scoring())
    for name in exact:
        torch.testing.assert_close(many[name], exact[name])


def test_diffpruning_guo_recipe_rates_restart_and_magnitude_projection(tiny_model_dir, rte, tmp_path):
    """Guo et al.'s options: alpha at its own rate, w at a dense-phase rate that gives way to the
    run's rate at the projection, the schedule's warm-up restarting there, and a global
    magnitude projection of the learned delta; the health record and validation on both sides."""
    from peftbench.modeling.sparse import decay_plan
    from peftbench.training.trainer import optimizer_and_schedule

    task, splits = rte
    model, tokenizer = load_model(tiny_model_dir, 2)
    method = registry.create("diffpruning", burnin=4, alpha_init=5.0, stretch=1.5, alpha_lr=0.1,
                             w_lr=1e-5, projection="magnitude", scope="global")
    model = method.apply(model, method.select(model, None, 300, torch.Generator().manual_seed(0)))
    gate = next(iter(method._gates.values()))
    assert torch.all(gate.alpha == 5.0)
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-2, max_steps=10, warmup_ratio=0.25)
    decay, no_decay, _ = decay_plan(model)
    optimizer, scheduler = optimizer_and_schedule(model, method, decay, no_decay, config, [0, 4, 10])

    def rate(param):
        return next(g["lr"] for g in optimizer.param_groups if any(p is param for p in g["params"]))

    head = next(iter(head_parameters(model).values()))
    seen = []
    for step in range(10):
        seen.append((rate(gate.alpha), rate(gate.w), rate(head)))
        optimizer.step()
        scheduler.step()
    # phase 1: steps 0-3, warm-up ceil(0.25 * 4) = 1; phase 2: steps 4-9, warm-up ceil(1.5) = 2
    assert seen[0] == (0.0, 0.0, 0.0) and seen[4] == (0.0, 0.0, 0.0)
    assert seen[1] == pytest.approx((0.1, 1e-5, 1e-2))
    assert seen[5] == pytest.approx((0.05, 0.5e-2, 0.5e-2))  # half-way through the new warm-up
    assert seen[6] == pytest.approx((0.1, 1e-2, 1e-2))

    with torch.no_grad():  # a learned delta to project: global top-300 of |z * w|
        for g in method._gates.values():
            g.w.copy_(torch.randn(g.w.shape, generator=torch.Generator().manual_seed(g.w.numel())))
    delta = {n: (g.noise_free() * g.w).detach().abs() for n, g in method._gates.items()}
    expected = top_k(delta, 300, "global", torch.Generator().manual_seed(0))
    method.after_step(model, 3)
    for name, g in method._gates.items():
        assert torch.equal(g.mask.bool(), expected.mask(name, g.mask.shape))
    record = method.training_record()
    assert record["projection"] == "magnitude" and 0 < record["delta_kept"] < 1
    assert record["spearman_alpha_final_initial"] is None  # every gate started at 5: no ranking to keep

    fresh, _ = load_model(tiny_model_dir, 2)
    method = registry.create("diffpruning", burnin=3, alpha_lr=1e-9)  # the gates cannot move
    fresh = method.apply(fresh, method.select(fresh, None, 300, torch.Generator().manual_seed(0)))
    out = train(fresh, method, task, tokenize(task, tokenizer, splits, 64), tokenizer,
                TrainConfig(epochs=1, batch_size=4, lr=1e-2, max_steps=6), seed=0, device=CPU,
                run_dir=tmp_path, progress=False)
    assert [p["step"] for p in out["phases"]] == [3]
    assert {"validation_before", "validation_after"} <= set(out["phases"][0])
    assert method.training_record()["flags"] == ["mask did not learn (Spearman(|alpha_T|, |alpha_0|) > 0.5)"]


def test_one_phase_schedule_is_hfs_linear_warmup():
    from transformers import get_linear_schedule_with_warmup

    from peftbench.contract.selector import Selector
    from peftbench.training.trainer import optimizer_and_schedule

    net = nn.Linear(3, 2)
    config = TrainConfig(lr=3e-3, warmup_ratio=0.1, weight_decay=0.01)
    ours, schedule = optimizer_and_schedule(net, Selector(), [net.weight], [net.bias], config, [0, 37])
    hf_opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))]}], lr=3e-3)
    hf = get_linear_schedule_with_warmup(hf_opt, 4, 37)
    for _ in range(37):
        assert [g["lr"] for g in ours.param_groups] == [hf_opt.param_groups[0]["lr"]] * 2
        ours.step(), schedule.step(), hf_opt.step(), hf.step()


def test_a_pooler_the_checkpoint_did_not_train_is_head_for_every_method(tiny_model_dir, tmp_path):
    """The evidence (bias exactly 0; or missing from the checkpoint) moves the pooler out of
    the budgeted encoder into the head; a trained pooler stays pre-trained."""
    from safetensors.torch import load_file, save_file

    from peftbench.modeling.models import pretrained_size, untrained_pre_head

    model, _ = load_model(tiny_model_dir, 2)
    assert model.peftbench_untrained == {"bert.pooler.dense": "bias exactly 0 in all 32 entries"}
    assert "bert.pooler.dense.weight" in head_parameters(model)
    assert not any("pooler" in n for n in pretrained_parameters(model))
    assert pretrained_size(tiny_model_dir, 2)[0] == sum(p.numel() for p in pretrained_parameters(model).values())
    assert untrained_pre_head(model, {"bert.pooler.dense.weight"}) == {
        "bert.pooler.dense": "missing from the checkpoint (bert.pooler.dense.weight)"}

    trained = tmp_path / "trained-pooler"
    shutil.copytree(tiny_model_dir, trained)
    weights = load_file(trained / "model.safetensors")
    key = next(k for k in weights if k.endswith("pooler.dense.bias"))
    weights[key] = torch.full_like(weights[key], 0.01)
    save_file(weights, trained / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(str(trained), 2)
    assert model.peftbench_untrained == {}
    assert "bert.pooler.dense.weight" in pretrained_parameters(model)

"""Fu et al.'s method set: each method's defining property, on a tiny model and real RTE rows."""
import math

import pytest
import torch
from torch import nn

from peftbench import registry
from peftbench.data import load_task, tokenize
from peftbench.models import head_parameters, load_model, pretrained_parameters
from peftbench.scoring import ScoringData
from peftbench.selector import top_k
from peftbench.sparse import count_trainable, effective_weight
from peftbench.trainer import (TrainConfig, forward, loss_fn, make_loader,
                               pick_device, train)

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
    # output 4(64+32)
    assert counts == {"encoder": 0, "new": 2 * (4 * 4 * 64 + 2 * 4 * 96), "head": 66,
                      "trainable": 2 * (4 * 4 * 64 + 2 * 4 * 96), "total": 2 * (4 * 4 * 64 + 2 * 4 * 96) + 66}
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
    from peftbench.data import load_task, tokenize
    from peftbench.methods import fish
    from peftbench.models import load_model
    from peftbench.scoring import ScoringData
    from peftbench.trainer import make_loader, pick_device

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

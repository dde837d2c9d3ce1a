"""Paths that used to change or corrupt a result silently (issue 'Every number right')."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from peftbench.contract import registry
from peftbench.contract.settings import TrainConfig
from peftbench.core.errors import UsageError
from peftbench.training.cache import ScoreCache
from peftbench.training.experiment import RunConfig, run_experiment

# light scoring so every data-reading method runs in seconds on the tiny model
LIGHT = {"sam": {"burnin": 3}, "fish": {"num_samples": 4}, "childtuning-d": {"batches": 2},
         "ggm": {"batches": 2, "rank": 2, "important": 4, "max_iter": 5},
         "adapeft": {"probe_steps": 4, "fit_batches": 1}, "spectral": {"batches": 2, "neighbours": 3}}


def _config(model, tmp_path, method, **extra):
    train = extra.pop("train", {})
    return RunConfig(method=method, task="rte", budget="0.02", seeds=[0], model=model, device="cpu",
                     method_params=extra.pop("params", LIGHT.get(method, {})),
                     train=TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 1e-3, "max_steps": 4,
                                          "max_length": 48, **train}),
                     limit=16, output_dir=str(tmp_path), **extra)


def _outcome(run_dir: Path) -> tuple:
    seed = run_dir / "seed-0"
    losses = [json.loads(l)["step_losses"] for l in (seed / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((seed / "result.json").read_text())
    return losses, result["test"], result["validation"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(n for n, i in registry.methods().items()
                                          if i.selector_class and i.selector_class.needs_data))
def test_training_is_bit_identical_without_cache_on_a_miss_and_on_a_hit(tiny_model_dir, tmp_path, method):
    """Scoring (dropout on) consumed the global random stream that training's dropout reads, so
    a cache hit trained with other dropout masks than a miss."""
    plain = _outcome(run_experiment(_config(tiny_model_dir, tmp_path / "plain", method), progress=False)[1])
    cache = ScoreCache(tmp_path / "scores")
    miss = _outcome(run_experiment(_config(tiny_model_dir, tmp_path / "miss", method), progress=False,
                                   score_cache=cache)[1])
    hit = _outcome(run_experiment(_config(tiny_model_dir, tmp_path / "hit", method), progress=False,
                                  score_cache=cache)[1])
    assert cache.misses == 1 and cache.hits == 1
    assert plain == miss == hit


def test_cache_key_follows_the_weights_not_the_path(tiny_model_dir, tmp_path):
    """A different checkpoint saved at the same path must not reuse the old model's scores."""
    import shutil

    from transformers import AutoModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    cache = ScoreCache(tmp_path / "scores")
    run_experiment(_config(str(model_dir), tmp_path / "a", "sam"), progress=False, score_cache=cache)
    net = AutoModel.from_pretrained(model_dir)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.save_pretrained(model_dir)
    run_experiment(_config(str(model_dir), tmp_path / "b", "sam"), progress=False, score_cache=cache)
    assert cache.misses == 2 and cache.hits == 0


def test_cache_key_follows_the_method_code_and_environment(monkeypatch, tiny_model_dir):
    from peftbench.training import cache as cache_module
    from peftbench.training import identity as fingerprint

    args = ("sam", {"burnin": 3}, tiny_model_dir, [], 0, {"device": "cpu"})
    key, about = cache_module.score_key(*args)
    assert about["code"]["distribution"] == "peftbench" and about["code"]["source"]
    assert about["environment"]["torch"] == torch.__version__
    assert cache_module.score_key("sam", {"burnin": 3}, tiny_model_dir, [], 0, {"device": "cuda"})[0] != key
    real = fingerprint.code_identity
    monkeypatch.setattr(cache_module, "code_identity", lambda m: {**real(m), "source": "edited"})
    assert cache_module.score_key(*args)[0] != key
    monkeypatch.setattr(cache_module, "environment", lambda: {"torch": "9.9", "transformers": "x"})
    monkeypatch.setattr(cache_module, "code_identity", real)
    assert cache_module.score_key(*args)[0] != key


def test_corrupted_cache_file_is_recomputed(tmp_path):
    cache = ScoreCache(tmp_path)
    cache.get_or_compute("k", lambda: {"w": torch.ones(3)})
    cache.path("k").write_bytes(b"truncated")
    scores, _, cached, _ = cache.get_or_compute("k", lambda: {"w": torch.zeros(3)})
    assert not cached and torch.equal(scores["w"], torch.zeros(3))
    assert cache.get_or_compute("k", lambda: None)[2]  # rewritten whole


def test_cache_list_and_clear(tmp_path, capsys):
    from peftbench.cli.main import main

    cache = ScoreCache(tmp_path)
    cache.get_or_compute("e" * 64, lambda: {"w": torch.ones(3)}, {"method": "sam", "seed": 0})
    assert main(["cache", "list", str(tmp_path)]) == 0
    assert "sam" in capsys.readouterr().out
    assert main(["cache", "clear", str(tmp_path)]) == 0
    assert "1 cached" in capsys.readouterr().out and not list(tmp_path.glob("*.pt"))


# --- DiffPruning ---------------------------------------------------------------------------

def test_diffpruning_burnin_at_or_above_the_steps_is_refused(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, "diffpruning", params={"burnin": 4})
    with pytest.raises(UsageError, match="burnin=4 is not below the run's 4 training steps"):
        run_experiment(config, progress=False)


def test_diffpruning_tested_model_is_a_validated_projected_one(tiny_model_dir, tmp_path):
    """Epochs before the projection cannot be the checkpoint; the count, the mask and what
    moved agree after training."""
    config = _config(tiny_model_dir, tmp_path, "diffpruning", params={"burnin": 5},
                     train={"epochs": 3, "max_steps": None, "lr": 1e-2})
    _, run_dir = run_experiment(config, progress=False)
    seed = run_dir / "seed-0"
    records = [json.loads(l) for l in (seed / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint_ready"] for r in records] == [False, True, True]  # 4 steps per epoch
    result = json.loads((seed / "result.json").read_text())
    assert result["best_epoch"] in (2, 3)
    best = records[result["best_epoch"] - 1]
    assert result["validation"] == best["validation"]
    mask = torch.load(seed / "mask.pt")
    assert not mask["full"]
    assert sum(len(i) for i in mask["partial"].values()) == result["trainable"]["encoder"] \
        == result["budget_entries"]


@pytest.mark.slow
def test_every_method_saves_its_effective_trained_mask(tiny_model_dir, tmp_path):
    """mask.pt is written after training from what can differ: DiffPruning's projected mask,
    ChildTuning-F / MixOut / FullTuning the whole encoder, LoRA nothing pre-trained."""
    sizes = {}
    for method, params in (("diffpruning", {"burnin": 2}), ("childtuning-f", {}), ("lora", {"r": 2}),
                           ("random", {})):
        _, run_dir = run_experiment(_config(tiny_model_dir, tmp_path / method, method, params=params),
                                    progress=False)
        mask = torch.load(run_dir / "seed-0" / "mask.pt")
        result = json.loads((run_dir / "seed-0" / "result.json").read_text())
        numels = {n: v[1] for n, v in json.loads((run_dir / "seed-0" / "selection.json").read_text())
                  ["per_tensor"].items()}
        sizes[method] = sum(numels[n] for n in mask["full"]) + sum(len(i) for i in mask["partial"].values())
        assert sizes[method] == result["trainable"]["encoder"]
    assert sizes["diffpruning"] == sizes["random"] > 0
    assert sizes["lora"] == 0 and sizes["childtuning-f"] > 10 * sizes["random"]


# --- divergence and the constant predictor ----------------------------------------------------

@pytest.mark.slow
def test_diverged_run_is_recorded_not_reported_as_a_result(tiny_model_dir, tmp_path, capsys):
    from peftbench.cli.main import main

    code = main(["run", "--method", "random", "--task", "rte", "--budget", "0.05", "--model",
                 tiny_model_dir, "--limit", "16", "--epochs", "1", "--batch-size", "4",
                 "--lr", "1e6", "--output-dir", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "DIVERGED: seed 0 at step" in out
    run_dir = Path(out.strip().splitlines()[-1].split(": ", 1)[1])
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    assert result["diverged"]["step"] >= 1 and math.isnan(result["test"]["main"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isnan(summary["test_main_mean"]) and "0" in summary["diverged_seeds"]


@pytest.mark.slow
def test_constant_predictor_is_shown_and_flagged(tiny_model_dir, tmp_path, capsys):
    from peftbench.cli.main import main
    from peftbench.data.metrics import constant_predictor
    from peftbench.data.tasks import load_task

    task = load_task("rte")
    baseline = constant_predictor(task, task.load_splits())
    assert baseline["test"]["accuracy"] == pytest.approx(146 / 277) or \
        baseline["test"]["accuracy"] == pytest.approx(131 / 277)
    code = main(["run", "--method", "random", "--task", "rte", "--budget", "0.001", "--model",
                 tiny_model_dir, "--limit", "16", "--epochs", "1", "--lr", "1e-9",
                 "--output-dir", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "constant predictor" in out and "did not measurably learn" in out


def test_near_constant_rule():
    from peftbench.data.metrics import near_constant

    assert near_constant(0.5235, 0.0217, 0.527, 277, seeds=5)
    assert not near_constant(0.70, 0.01, 0.527, 277, seeds=5)
    assert near_constant(0.58, 0.01, 0.527, 277, seeds=5)  # 0.053 < 1/sqrt(277) = 0.060
    assert near_constant(0.58, float("nan"), 0.527, 277, seeds=1)
    assert not near_constant(0.70, float("nan"), 0.527, 277, seeds=1)


def test_a_cell_whose_seeds_split_between_learning_and_collapsing_learned():
    """The noise is the mean's (2 standard errors over seeds), not the seeds' spread: three
    seeds at 0.80 and two collapsed to the majority class (0.51) average well above the
    predictor (the rule before, 2 std, flagged all-methods-cpu's SST-2 Adapter, mean 0.754);
    one learned seed among four collapsed does not lift the mean out of the noise."""
    import scipy.stats

    from peftbench.data.metrics import near_constant

    def flagged(scores):
        scores = np.array(scores)
        return near_constant(scores.mean(), scores.std(), 0.51, 872, seeds=len(scores))

    assert not flagged([0.80, 0.80, 0.80, 0.51, 0.51])  # mean 0.684: 2 std 0.284 > 0.174
    assert flagged([0.80, 0.51, 0.51, 0.51, 0.51])  # mean 0.568: 2 se 0.116 > 0.058
    # the standard error as scipy computes it (ddof=1)
    scores = np.array([0.80, 0.51, 0.51, 0.51, 0.52])
    se = scipy.stats.sem(scores)
    gap = scores.mean() - 0.51
    assert near_constant(scores.mean(), scores.std(), 0.51, 10**6, seeds=5) == (gap < 2 * se)


# --- metrics ------------------------------------------------------------------------------------

def test_cb_macro_f1_averages_all_three_classes_as_jiant():
    """Fu et al.'s CB validation file has no 'contradiction' (class 1): jiant still averages
    over 3 classes; scikit-learn's default macro average would skip it."""
    from sklearn.metrics import f1_score

    from peftbench.data.metrics import compute

    y = np.array([0, 0, 2, 2, 2, 0])
    p = np.array([0, 2, 2, 2, 0, 0])
    out = compute(["accuracy", "macro_f1"], ["accuracy", "macro_f1"], p, y, num_classes=3)
    per_class = f1_score(y, p, labels=[0, 1, 2], average=None, zero_division=0)
    assert out["macro_f1"] == pytest.approx(per_class.sum() / 3)
    assert out["macro_f1"] < f1_score(y, p, average="macro")


@pytest.mark.parametrize("task, metrics, main", [
    ("cb", ["accuracy", "macro_f1"], ["accuracy", "macro_f1"]), ("mrpc", ["accuracy", "f1"], ["accuracy", "f1"]),
    ("stsb", ["pearson", "spearman"], ["pearson", "spearman"]), ("cola", ["mcc"], ["mcc"]),
    ("rte", ["accuracy"], ["accuracy"]), ("copa", ["accuracy"], ["accuracy"]), ("wsc", ["accuracy"], ["accuracy"])])
def test_every_task_uses_jiants_major_metric(task, metrics, main):
    from peftbench.data.tasks import load_task

    spec = load_task(task)
    assert spec.main_metric == main and set(metrics) <= set(spec.metrics)


# --- precision -------------------------------------------------------------------------------------

def test_bf16_checkpoint_loads_fp32_master_weights(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoModel

    from peftbench.modeling.models import load_model

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, folder)
    AutoModel.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(folder)
    model, _ = load_model(str(folder), 2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# --- one weight-decay rule --------------------------------------------------------------------------

def test_weight_decay_rule_is_the_same_for_whole_and_partial_tensors(tiny_model):
    from peftbench.modeling.sparse import SparseDelta, decay_exempt, decay_plan

    model, _ = tiny_model
    name_b = "bert.encoder.layer.0.attention.self.query.bias"
    name_w = "bert.encoder.layer.0.attention.self.query.weight"
    name_ln = "bert.encoder.layer.0.attention.output.LayerNorm.weight"
    selector = registry.create("random")
    selection = selector.select(model, None, 0, torch.Generator())
    selection.partial = {name_b: torch.tensor([0, 3]), name_w: torch.tensor([1, 5, 9]),
                         name_ln: torch.tensor([2])}
    model = selector.apply(model, selection)
    decay, no_decay, deltas = decay_plan(model)
    assert len(deltas) == 1 and len(deltas[0].values) == 3  # only the weight's delta decays
    assert decay_exempt("bert.encoder.layer.0.attention.self.query.parametrizations.bias.0.values")
    assert decay_exempt("bert.encoder.layer.0.attention.self.query.bias")
    assert not decay_exempt("bert.encoder.layer.0.attention.self.query.parametrizations.weight.0.values")
    # the sparse entries' values decay towards 0, not towards W0
    delta = deltas[0]
    w0 = delta.base_values.clone()
    delta.decay_(0.5)
    torch.testing.assert_close(w0 + delta.values.detach(), 0.5 * w0)
    assert isinstance(delta, SparseDelta)


def test_childtuning_f_masks_after_clipping():
    """The reference masks inside the optimizer step, i.e. after the global clip."""
    from peftbench.contract.selector import Selector
    from peftbench.methods.childtuning_f import ChildTuningF

    assert ChildTuningF.before_step is not Selector.before_step
    assert ChildTuningF.after_backward is Selector.after_backward


def test_a_score_that_moves_the_weights_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """A scoring pass that fine-tunes and forgets to restore theta0 reported 'trainable 0.1%'
    while every entry had moved: the runner now refuses it, naming the method."""
    from peftbench.methods.magpruning import MagPruning

    original = MagPruning.score

    def moving_score(self, model, data):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return original(self, model, data)

    monkeypatch.setattr(MagPruning, "score", moving_score)
    with pytest.raises(UsageError, match="method 'magpruning' changed the model in score"):
        run_experiment(_config(tiny_model_dir, tmp_path, "magpruning"), progress=False)

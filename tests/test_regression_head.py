"""A regression task starts where its labels are: the head's output bias is the
training label mean, for every method alike, before scoring; otherwise a method that trains
few entries spends a short schedule closing the offset and collapses to one prediction."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from peftbench.contract import registry
from peftbench.contract.settings import TrainConfig
from peftbench.core.errors import UsageError
from peftbench.data.encode import tokenize
from peftbench.data.tasks import load_task
from peftbench.modeling.compute import forward
from peftbench.modeling.models import init_head, load_model, output_layer, pretrained_parameters
from peftbench.training.trainer import make_loader, pick_device, train


@pytest.fixture
def offset_task(tmp_path):
    """STS-B rows with labels moved to mean ~50 (+ 47.5): a far offset, real text."""
    folder = load_task("stsb").path.parent / "data" / "fu2023" / "stsb"
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        rows = [json.loads(line) for line in open(folder / f"{name}.jsonl")][:96]
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps({**row, "label": float(row["label"]) + 47.5}) + "\n")
    (tmp_path / "offset.yaml").write_text(
        "name: offset\nkind: regression\ndata:\n  files:\n    train: train.jsonl\n"
        "    validation: validation.jsonl\n    test: test.jsonl\ntext: [text_a, text_b]\n"
        "metrics: [pearson, spearman]\nmain_metric: [pearson, spearman]\n")
    return load_task(str(tmp_path / "offset.yaml"))


def _predictions(model, task, tokenized, tokenizer):
    model.eval()
    with torch.no_grad():
        return torch.cat([forward(model, {k: v for k, v in b.items()}, task)
                          for b in make_loader(tokenized["validation"], tokenizer, task, 32, False, 0)]).numpy()


def _train_offset(task, tmp_path, start_at_mean: bool):
    """Random 1% on the packaged MiniLM (a random tiny encoder's features barely vary across
    inputs, so no head could spread them in a few steps), 24 steps at 1e-2; the validation
    predictions before and after."""
    splits = task.load_splits()
    model, tokenizer = load_model("default", 1)
    if start_at_mean:
        init_head(model, task, splits["train"]["label"])
    tokenized = tokenize(task, tokenizer, splits, 32)
    before = _predictions(model, task, tokenized, tokenizer)
    selector = registry.create("random")
    numels = {n: p.numel() for n, p in pretrained_parameters(model).items()}
    k = math.floor(0.01 * sum(numels.values()))
    model = selector.apply(model, selector.select(model, None, k, torch.Generator().manual_seed(0)))
    (tmp_path / str(start_at_mean)).mkdir()
    config = TrainConfig(epochs=4, batch_size=16, lr=1e-2, warmup_ratio=0.0, max_length=32)
    train(model, selector, task, tokenized, tokenizer, config, seed=0,
          device=pick_device("cpu"), run_dir=tmp_path / str(start_at_mean), progress=False)
    return before, _predictions(model, task, tokenized, tokenizer)


@pytest.mark.slow
def test_few_entries_reach_a_spread_around_a_far_label_mean(offset_task, tmp_path):
    labels = np.array(offset_task.load_splits()["train"]["label"], dtype=float)
    assert labels.mean() > 49
    before, after = _train_offset(offset_task, tmp_path, start_at_mean=True)
    assert before.mean() == pytest.approx(labels.mean(), abs=0.5)  # starts at the labels
    # centred on the labels, and not one value for every pair (a collapse to one value)
    assert abs(after.mean() - labels.mean()) < labels.std()
    assert after.std() > 0.2 * labels.std()
    # HF's zero start, for contrast: the same entries spend the steps closing the offset
    _, zero_start = _train_offset(offset_task, tmp_path, start_at_mean=False)
    print(f"spread with the mean start {after.std():.4f}, zero start {zero_start.std():.4f}, "
          f"mean {after.mean():.2f} vs {zero_start.mean():.2f} (labels {labels.mean():.2f})")
    assert abs(zero_start.mean() - labels.mean()) > abs(after.mean() - labels.mean())


def test_only_regression_heads_move_and_a_bias_free_head_is_refused(tiny_model_dir):
    cb = load_task("cb")
    model, _ = load_model(tiny_model_dir, cb.num_labels)
    before = output_layer(model, cb.num_labels).bias.detach().clone()
    assert init_head(model, cb, ["entailment"] * 3) == {}
    assert torch.equal(output_layer(model, cb.num_labels).bias, before)
    stsb = load_task("stsb")
    model, _ = load_model(tiny_model_dir, 1)
    model.classifier = torch.nn.Linear(model.classifier.in_features, 1, bias=False)
    with pytest.raises(UsageError, match="no output bias"):
        init_head(model, stsb, [1.0, 2.0])

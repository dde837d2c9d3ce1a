"""What a run forgets (`peftbench.training.forgetting`): the probe against an independent computation on
the pre-trained default model, and the drift it measures after training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch


@pytest.mark.slow
def test_the_probe_on_the_default_model_equals_mean_pooled_cosine_by_hand():
    from transformers import AutoModel, AutoTokenizer

    from peftbench.modeling.models import load_model, resolve_model_path
    from peftbench.training import forgetting

    model, tokenizer = load_model("default", 2)
    got = forgetting.retention(model, tokenizer, torch.device("cpu"))
    path = resolve_model_path("default")  # by hand: the bare encoder, sentence-transformers' pooling
    encoder, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    a, b, gold = forgetting.probe_pairs()

    def embed(sentences):
        with torch.no_grad():
            x = tok(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
            mask = x["attention_mask"].unsqueeze(-1).float()
            return (encoder(**x).last_hidden_state * mask).sum(1) / mask.sum(1)

    cosine = torch.nn.functional.cosine_similarity(embed(a), embed(b)).numpy()
    assert got == pytest.approx(scipy.stats.spearmanr(cosine, gold).statistic, abs=1e-6)
    assert len(a) == 495 and 0.75 < got < 0.85  # all-MiniLM-L6-v2 zero-shot on SICK-R TRIAL: 0.7999


def test_full_fine_tuning_moves_the_representation_more_than_a_handful_of_entries(tiny_model_dir, tmp_path):
    from peftbench.contract.settings import TrainConfig
    from peftbench.training.experiment import RunConfig, run_experiment

    changes = {}
    for method, budget in (("fulltuning", "1"), ("random", "0.00001")):
        config = RunConfig(method=method, task="rte", budget=budget, model=tiny_model_dir, limit=32,
                           train=TrainConfig(epochs=1, batch_size=8, max_length=32, lr=3e-2, max_steps=4),
                           output_dir=str(tmp_path / "runs"))
        _, run_dir = run_experiment(config, progress=False)
        record = json.loads((run_dir / "seed-0" / "result.json").read_text())["forgetting"]
        assert record["probe"] == "sick-r-trial" and record["change"] == pytest.approx(record["after"] - record["before"])
        changes[method] = record["change"]
    assert abs(changes["fulltuning"]) > 10 * abs(changes["random"])
    assert np.isfinite(list(changes.values())).all()


def test_the_accuracy_vs_retention_figure_is_drawn_from_the_cells_that_measured_it(tmp_path):
    import pandas as pd

    from peftbench.rendering import plots

    rows = [{"task": t, "method": m, "budget": "0.005", "seed": s, "metric": 0.8 - 0.01 * s,
             "retention_after": 0.8, "retention_change": -0.01 * (i + 1)}
            for t in ("sst2", "stsb") for i, m in enumerate(("random", "fulltuning")) for s in range(3)]
    assert plots.retention_png(pd.DataFrame(rows), tmp_path / "r.png") == tmp_path / "r.png"
    assert (tmp_path / "r.png").stat().st_size > 10_000
    unmeasured = pd.DataFrame(rows).assign(retention_change=float("nan"))
    assert plots.retention_png(unmeasured, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()

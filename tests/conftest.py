"""Shared fixtures: offline settings and a tiny randomly-initialised BERT saved to disk, with the
default model's real tokenizer, so every path (loading by path included) runs in seconds."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftbench.modeling.models import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh tiny classifier (2 labels) and its tokenizer."""
    from peftbench.modeling.models import load_model

    return load_model(tiny_model_dir, num_labels=2)


@pytest.fixture
def no_tasks_path(monkeypatch):
    monkeypatch.delenv("PEFTBENCH_TASKS_PATH", raising=False)


def copy_task(tmp_path, name: str) -> str:
    """A copy of a built-in task YAML in tmp_path, with data paths made absolute."""
    from peftbench.data.tasks import load_task

    spec = load_task(name)
    text = spec.path.read_text().replace("data/", str(spec.path.parent / "data") + "/")
    target = tmp_path / f"{name}.yaml"
    target.write_text(text)
    return str(target)


def one_line_error(capsys, *argv) -> str:
    """Run the CLI on `argv`; assert exit 2 with one 'peftbench: error:' line and no traceback;
    return that line."""
    from peftbench.cli.main import main

    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("peftbench: error: "), err
    assert "Traceback" not in err
    return lines[0]

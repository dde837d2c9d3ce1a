"""Decoder models (GPT-2, Llama, Qwen2 layouts), built tiny from configs with the packaged
tokenizer: every method runs end to end with the same counting and contract; methods that name
modules find them in `peftbench.modeling.architectures` (issue: decoder LLMs)."""
from __future__ import annotations

import pytest
import torch

from peftbench.contract.settings import TrainConfig
from peftbench.core.errors import UsageError
from peftbench.sweep import grid, state
from peftbench.sweep import spec as sweep_spec
from peftbench.training.experiment import RunConfig, run_experiment


def _save(folder, config, model_cls, tokenizer_dir):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def decoder_dir(request, tmp_path_factory, tiny_model_dir):
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
        Qwen2Config,
        Qwen2Model,
    )

    vocab = AutoTokenizer.from_pretrained(tiny_model_dir).vocab_size
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128, vocab_size=vocab)
    config, cls = {"gpt2": (GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128), GPT2Model),
                   "llama": (LlamaConfig(**small), LlamaModel),
                   "qwen2": (Qwen2Config(**small), Qwen2Model)}[request.param]
    return _save(tmp_path_factory.mktemp(request.param), config, cls, tiny_model_dir)


def _run(model, method, tmp_path, **params):
    config = RunConfig(method=method, task="rte", budget="0.01", seeds=[0], model=model, method_params=params,
                       train=TrainConfig(epochs=1, batch_size=4, max_length=48), limit=16,
                       output_dir=str(tmp_path))
    return run_experiment(config, progress=False)


@pytest.mark.parametrize("method", ["random", "magpruning"])
def test_a_method_that_names_no_module_runs_on_a_decoder(decoder_dir, method, tmp_path):
    """(Module-naming methods are covered below: adapter through the architecture table.)"""
    import json

    summary, run_dir = _run(decoder_dir, method, tmp_path)
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    assert 0 < result["trainable"]["encoder"] <= result["budget_entries"]
    assert result["padding"]["model_pad_token_id"] == result["padding"]["pad_token_id"] is not None


def test_lora_targets_each_architectures_own_layers(decoder_dir, tmp_path):
    """Fu et al.'s layers named per architecture (GPT-2's fused c_attn and Conv1D projections,
    Llama's q/k/v/o and gate/up/down): only LoRA's matrices and the head train."""
    import json

    _, run_dir = _run(decoder_dir, "lora", tmp_path, r=2)
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    selection = json.loads((run_dir / "seed-0" / "selection.json").read_text())
    assert result["trainable"]["encoder"] == 0 and result["trainable"]["new"] > 0
    assert selection["notes"]["targets"][-1] in ("mlp.c_proj", "mlp.down_proj")


def test_adapters_sit_where_each_architecture_names_its_output_projections(decoder_dir, tmp_path):
    """Placed from `peftbench.modeling.architectures` (GPT-2's Conv1D c_proj, Llama's o_proj/down_proj),
    two per block; only adapters and the head train."""
    import json

    _, run_dir = _run(decoder_dir, "adapter", tmp_path)
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    assert result["trainable"]["encoder"] == 0 and result["trainable"]["new"] > 0


def test_an_architecture_without_a_layout_is_refused_by_name():
    from types import SimpleNamespace

    from peftbench.modeling.architectures import layout

    with pytest.raises(UsageError, match=r"architecture .mamba. has no module layout .* \(known: bert"):
        layout(SimpleNamespace(config=SimpleNamespace(model_type="mamba")))


def test_ggm_finds_each_architectures_query_key_value(decoder_dir, tmp_path):
    """GGM's nodes (principal components of q/k/v, projection biases) from the architecture
    table: components of GPT-2's fused c_attn or Llama's q/k/v_proj, no silent empty graph."""
    import json

    _, run_dir = _run(decoder_dir, "ggm", tmp_path, rank=2, batches=4, important=3, max_iter=10)
    selection = json.loads((run_dir / "seed-0" / "selection.json").read_text())
    components = selection["notes"]["components"]
    assert selection["notes"]["nodes"] > 0 and components
    assert all(n.endswith(("c_attn.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight")) for n in components)


# what a built-in cannot do on an architecture, with the reason (checked to fail as declared)
DECODER_REFUSALS = {("gpt2", "shira"): "peft's SHiRA wraps nn.Linear layers only",
                    ("gpt2", "supertuning"): "peft's Super-Tuning wraps nn.Linear layers only",
                    ("gpt2", "peft-sized"): "peft's AdamssConfig cannot adapt this model"}


def _builtins() -> list[str]:
    from peftbench.contract import registry

    return sorted(name for name, info in registry.methods().items() if info.package == "peftbench")


@pytest.mark.slow
@pytest.mark.parametrize("method", _builtins())
def test_every_builtin_passes_the_conformance_suite_on_each_decoder(decoder_dir, method):
    """The public conformance suite (`peftbench.testing`) for every built-in on tiny GPT-2,
    Llama and Qwen2; a built-in that cannot run on an architecture is refused with its reason
    (GPT-2's projections are Conv1D, which peft's sparse tuners do not wrap)."""
    import json
    from pathlib import Path

    from peftbench.testing import check_method

    arch = json.loads((Path(decoder_dir) / "config.json").read_text())["model_type"]
    outcomes = check_method(method, model_dir=decoder_dir)
    failed = {o.check: o.detail for o in outcomes if not o.passed}
    reason = DECODER_REFUSALS.get((arch, method))
    if reason is None:
        assert not failed, f"{method} on {arch}: {failed}"
    else:
        assert failed and all(reason in detail for detail in failed.values()), (method, failed)


def test_bench_step_floor_runs_on_a_decoder(decoder_dir):
    """The floor (frozen encoder, input gradients only) hooks the input embeddings by
    transformers' own accessor, not BERT's `embeddings` attribute."""
    from peftbench.bench.step import prepare_step

    one_step, model = prepare_step("floor", decoder_dir, batch_size=2, length=8)
    one_step()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]


@pytest.mark.slow
def test_a_sweep_and_its_report_on_a_decoder_classifier(tiny_model_dir, tmp_path):
    """The same sweeps and reports on a decoder sequence classifier (tiny Llama): a grid of two
    methods x two seeds on RTE (real data), then the report's table of cells."""
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from peftbench.rendering import report

    vocab = AutoTokenizer.from_pretrained(tiny_model_dir).vocab_size
    decoder_dir = _save(tmp_path / "llama", LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=128, vocab_size=vocab), LlamaModel, tiny_model_dir)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "decoder", "model": decoder_dir, "tasks": ["rte"],
        "methods": {"random": {}, "lora": {"r": 2}}, "budgets": [0.01], "seeds": 2, "limit": 16,
        "train": {"epochs": 1, "batch_size": 4, "max_length": 48},
        "output_dir": str(tmp_path / "out")}))
    spec = sweep_spec.load_spec(path)
    grid.run_grid(spec, log=lambda *a: None)
    frame = state.finished_frame(spec)
    assert len(frame) == 4 and set(frame.method) == {"random", "lora"}
    text = report.build_report(frame, tmp_path / "report")
    assert "rte" in text and (tmp_path / "report" / "cells.csv").is_file()

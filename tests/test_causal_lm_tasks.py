"""The causal-LM task kind (issue: decoder LLMs): prompt and answer templates, an extraction for
exact match, metrics that only it can use; the synthetic arithmetic task that ships with it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peftbench.core.errors import UsageError
from peftbench.data import metrics
from peftbench.data.tasks import load_task
from peftbench.sweep import grid, state
from peftbench.sweep import spec as sweep_spec

ARITH = Path(__file__).parents[1] / "tasks" / "arith.yaml"


def test_the_arithmetic_task_reads_prompt_answer_and_its_extraction():
    task = load_task(str(ARITH))
    assert task.kind == "causal_lm" and task.fields() == ["question", "answer"]
    splits = task.load_splits()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [400, 100, 100]
    row = splits["test"][0]
    a, op, b, _, result = row["answer"].split("\n")[0].split()
    assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]  # computed
    assert task.prompt_text(row).startswith("Question: What is") and task.prompt_text(row).endswith("Answer:")
    assert task.extract_answer(task.answer_text(row)) == result
    assert task.extract_answer("so it is 12 #### -7 then") == "-7" and task.extract_answer("no number") == ""
    questions = [set(splits[s]["question"]) for s in ("train", "validation", "test")]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])


def test_the_generator_reproduces_the_files(tmp_path):
    import shutil
    import subprocess
    import sys

    source = ARITH.parent / "data" / "arith"
    shutil.copy(source / "generate.py", tmp_path)
    subprocess.run([sys.executable, str(tmp_path / "generate.py")], check=True)
    for split in ("train", "validation", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (source / f"{split}.jsonl").read_bytes()


def _task(tmp_path, **change):
    import yaml

    spec = yaml.safe_load(ARITH.read_text())
    spec["data"]["files"] = {s: str(ARITH.parent / f) for s, f in spec["data"]["files"].items()}
    spec.update(change)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize("change, expected", [
    ({"prompt": None}, "needs 'prompt' and 'answer'"),
    ({"extract": "(a)(b)"}, "give at most one"),
    ({"extract": "(unclosed"}, "is not a regular expression"),
    ({"metrics": ["accuracy"], "main_metric": "accuracy"}, "cannot score a causal_lm task"),
    ({"kind": "classification", "labels": ["a", "b"], "text": ["question"], "metrics": ["accuracy"],
      "main_metric": "accuracy"}, "belong to a causal_lm task"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_causal_lm_task_files_are_refused_by_name(tmp_path, change, expected):
    with pytest.raises(UsageError, match=expected):
        load_task(_task(tmp_path, **change))


def test_causal_lm_metrics_take_one_prediction_array_each():
    out = metrics.compute(["exact_match", "answer_loglik"], ["exact_match"],
                          {"exact_match": ["3", "4", ""], "answer_loglik": [-1.0, -2.0, -3.0]},
                          ["3", "5", "6"])
    assert out == {"exact_match": pytest.approx(1 / 3), "answer_loglik": -2.0, "main": pytest.approx(1 / 3)}


@pytest.fixture(scope="module")
def tiny_causal_dirs(tmp_path_factory, tiny_model_dir):
    """Tiny random GPT-2 and Llama language models (tied and untied LM heads) with the
    packaged tokenizer, built from configs (no download)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = {}
    for kind in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                           n_positions=128)) if kind == "gpt2" else \
            LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=128))
        folder = tmp_path_factory.mktemp(f"causal-{kind}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[kind] = str(folder)
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_loss_is_on_answer_tokens_only(tiny_causal_dirs, side):
    """Whatever side the tokenizer pads on by default (Llama's and Qwen's pad on the left), a
    training batch is padded on the right, so the token labels line up with the tokens."""
    from peftbench.data.encode import Collator, tokenize
    from peftbench.modeling.models import load_model

    task = load_task(str(ARITH))
    _, tokenizer = load_model(tiny_causal_dirs["llama"], 1, causal=True)
    tokenizer.padding_side = side
    data = tokenize(task, tokenizer, task.load_splits(limit=64), 64)
    by_length = {len(row["input_ids"]): row for row in data["train"]}
    assert len(by_length) >= 2  # rows of different lengths, so the batch pads
    rows = list(by_length.values())[:4]
    batch = Collator(tokenizer, task)(rows)
    for i, row in enumerate(rows):
        prompt = row["prompt_length"]
        assert batch["input_ids"][i, :len(row["input_ids"])].tolist() == row["input_ids"]  # labels line up
        assert (batch["labels"][i, :prompt] == -100).all()
        answer = batch["labels"][i, prompt:len(row["input_ids"])]
        assert answer.tolist() == row["input_ids"][prompt:] and (answer != -100).all()
        assert (batch["labels"][i, len(row["input_ids"]):] == -100).all()  # padding
    assert tokenizer.decode(rows[0]["input_ids"][rows[0]["prompt_length"]:], skip_special_tokens=True) \
        .replace(" ", "").endswith(rows[0]["gold"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["random", "lora"])
def test_a_causal_lm_run_end_to_end(tiny_causal_dirs, tmp_path, kind, method):
    """Every parameter of a causal LM is pre-trained (its LM head too, tied or not) and budgeted;
    no head is added; the run reports exact match and the answer's log-likelihood."""
    import json
    import math

    from peftbench.contract.settings import TrainConfig
    from peftbench.modeling.models import load_model
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(method=method, task=str(ARITH), budget="0.01", model=tiny_causal_dirs[kind], limit=16,
                       method_params={"r": 2} if method == "lora" else {},
                       train=TrainConfig(epochs=1, batch_size=4, max_length=48, lr=1e-2),
                       output_dir=str(tmp_path))
    _, run_dir = run_experiment(config, progress=False)
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    model, _ = load_model(tiny_causal_dirs[kind], 1, causal=True)
    total = sum(p.numel() for p in model.parameters())  # a tied head counted once
    assert result["pretrained_entries"] == total and result["trainable"]["head"] == 0
    if method == "random":
        assert result["trainable"]["encoder"] == int(0.01 * total)
    assert 0 <= result["test"]["exact_match"] <= 1 and math.isfinite(result["test"]["answer_loglik"])
    assert result["test"]["main"] == result["test"]["exact_match"]
    assert isinstance(result["constant_predictor"]["prediction"], str)
    kept = result["test_predictions"]  # the generated answers, kept for paired tests
    assert len(kept["labels"]) == len(kept["predictions"]["exact_match"]) == result["constant_predictor"]["test_rows"]
    assert np.mean([a == g for a, g in zip(kept["predictions"]["exact_match"], kept["labels"])]) == \
        pytest.approx(result["test"]["exact_match"])


@pytest.mark.slow
def test_fine_tuning_raises_the_answers_likelihood(tiny_causal_dirs, tmp_path):
    """Full fine-tuning on the answers makes them more likely than at the start (lr 0)."""
    from peftbench.contract.settings import TrainConfig
    from peftbench.training.experiment import RunConfig, run_experiment

    logliks = []
    for lr in (1e-12, 1e-2):
        config = RunConfig(method="fulltuning", task=str(ARITH), model=tiny_causal_dirs["gpt2"], limit=32,
                           train=TrainConfig(epochs=2, batch_size=8, max_length=48, lr=lr),
                           output_dir=str(tmp_path / str(lr)))
        summary, _ = run_experiment(config, progress=False)
        logliks.append(summary["test_answer_loglik_mean"])
    assert logliks[1] > logliks[0] + 0.5  # measured: -10.22 -> -9.28 nats per answer token


@pytest.mark.slow
def test_a_sweep_and_its_report_on_a_causal_lm_task(tiny_causal_dirs, tmp_path):
    """The same sweeps and reports: a grid over two methods and two seeds on tiny Llama."""
    import yaml

    from peftbench.rendering import report

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "causal", "model": tiny_causal_dirs["llama"], "tasks": [str(ARITH)],
        "methods": {"random": {}, "lora": {"r": 2}}, "budgets": [0.01], "seeds": 2, "limit": 16,
        "train": {"epochs": 1, "batch_size": 4, "max_length": 48, "lr": 1e-2},
        "output_dir": str(tmp_path / "out")}))
    spec = sweep_spec.load_spec(path)
    grid.run_grid(spec, log=lambda *a: None)
    frame = state.finished_frame(spec)
    assert len(frame) == 4 and set(frame.metric_name) == {"exact_match"}
    text = report.build_report(frame, tmp_path / "report")
    assert "arith" in text and (tmp_path / "report" / "cells.csv").is_file()


@pytest.mark.parametrize("method, expected", [
    ("bitfit", "leaves nothing to train"),  # Llama has no biases, a causal LM no new head
])
def test_what_cannot_run_on_a_causal_lm_task_is_refused_by_name(tiny_causal_dirs, tmp_path, method, expected):
    from peftbench.contract.settings import TrainConfig
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(method=method, task=str(ARITH), budget="0.01", model=tiny_causal_dirs["llama"], limit=8,
                       train=TrainConfig(epochs=1, batch_size=4, max_length=48), output_dir=str(tmp_path))
    with pytest.raises(UsageError, match=expected):
        run_experiment(config, progress=False)


def test_fish_on_a_causal_lm_task_squares_each_examples_answer_loss_gradient(tiny_causal_dirs):
    """FISH's Fisher on a causal-LM task: the mean over examples of the squared gradient of each
    example's answer loss, checked against transformers' own causal-LM loss (`labels=`), one
    unpadded example at a time."""
    import torch

    from peftbench.contract import registry
    from peftbench.contract.scoring import ScoringData
    from peftbench.data.encode import tokenize
    from peftbench.modeling.models import load_model
    from peftbench.training.trainer import make_loader

    task = load_task(str(ARITH))
    model, tokenizer = load_model(tiny_causal_dirs["llama"], 1, causal=True)
    rows = tokenize(task, tokenizer, task.load_splits(limit=3), 48)["train"]
    data = ScoringData(make_loader(rows, tokenizer, task, 2, False, 0), task, torch.device("cpu"))
    scores = registry.create("fish", num_samples=3).score(model, data)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in rows:
        model.zero_grad()
        model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square() / 3
    for n, value in expected.items():
        torch.testing.assert_close(scores[n], value, rtol=1e-4, atol=1e-9)


COPA = ARITH.parent / "copa.yaml"


def test_multiple_choice_reads_a_decoders_lm_head_and_an_encoders_new_head(tiny_causal_dirs, tiny_model_dir):
    from peftbench.modeling.models import uses_lm_head

    assert uses_lm_head(tiny_causal_dirs["llama"], "multiple_choice")
    assert uses_lm_head(tiny_causal_dirs["gpt2"], "multiple_choice")
    assert not uses_lm_head(tiny_model_dir, "multiple_choice")  # BERT: a head per choice
    assert not uses_lm_head(tiny_causal_dirs["llama"], "classification")  # a new head, last token
    assert uses_lm_head(tiny_causal_dirs["gpt2"], "causal_lm")  # an encoder is refused (below)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_choices_score_is_its_tokens_log_likelihood_given_the_context(tiny_causal_dirs, kind):
    """lm-evaluation-harness's multiple choice: each choice's score is the summed
    log-probability of its tokens after the context, computed here by hand on each (context,
    choice) sequence alone, unpadded, and compared with the padded batch's [B, C] scores."""
    import torch

    from peftbench.data.encode import Collator, tokenize
    from peftbench.data.spec import render
    from peftbench.modeling.compute import forward
    from peftbench.modeling.models import load_model

    task = load_task(str(COPA))
    model, tokenizer = load_model(tiny_causal_dirs[kind], 1, causal=True)
    tokenizer.padding_side = "left"  # the batch pads on the right all the same
    splits = task.load_splits(limit=3)
    rows = [tokenize(task, tokenizer, splits, 64, lm_head=True)["train"][i] for i in range(3)]
    model.eval()
    with torch.no_grad():
        scores = forward(model, Collator(tokenizer, task)(rows), task)
        assert scores.shape == (3, 2)
        for i, raw in enumerate(splits["train"]):
            context = tokenizer(render(task.context, raw))["input_ids"]
            for c, choice in enumerate(task.choices):
                ending = tokenizer(" " + raw[choice], add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([context + ending])).logits[0], -1)
                by_hand = sum(logp[len(context) + j - 1, t].item() for j, t in enumerate(ending))
                assert scores[i, c].item() == pytest.approx(by_hand, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "fish"])
def test_a_multiple_choice_run_on_a_decoder_end_to_end(tiny_causal_dirs, tmp_path, method):
    """COPA (real data) on tiny GPT-2, scored by the choices' log-likelihoods: no head is added,
    every parameter is pre-trained and budgeted, accuracy is the argmax choice's."""
    import json

    from peftbench.contract.settings import TrainConfig
    from peftbench.modeling.models import load_model
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(method=method, task=str(COPA), budget="0.01", model=tiny_causal_dirs["gpt2"], limit=12,
                       method_params={"num_samples": 8} if method == "fish" else {},
                       train=TrainConfig(epochs=1, batch_size=4, max_length=48, lr=1e-2),
                       output_dir=str(tmp_path))
    _, run_dir = run_experiment(config, progress=False)
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    model, _ = load_model(tiny_causal_dirs["gpt2"], 1, causal=True)
    total = sum(p.numel() for p in model.parameters())
    assert result["pretrained_entries"] == total and result["trainable"]["head"] == 0
    assert result["trainable"]["encoder"] == int(0.01 * total)
    assert 0 <= result["test"]["accuracy"] <= 1 and result["test"]["main"] == result["test"]["accuracy"]
    from peftbench.training.export import export_run

    with pytest.raises(UsageError, match="trained a language model's own head"):
        export_run(run_dir, tmp_path / "adapter")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the CUDA path needs a GPU (none here)")
@pytest.mark.parametrize("task, method", [(ARITH, "random"), (ARITH, "lora"), (COPA, "fish")])
def test_a_decoder_run_on_cuda_with_bf16_autocast_and_gradient_checkpointing(tiny_causal_dirs, tmp_path,
                                                                             task, method):
    """The GPU path on a decoder: fp32 master weights under bf16 autocast, activations
    recomputed, peak memory as CUDA's max allocated; the same counts as on CPU."""
    import json
    import math

    from peftbench.contract.settings import TrainConfig
    from peftbench.training.experiment import RunConfig, run_experiment

    config = RunConfig(method=method, task=str(task), budget="0.01", model=tiny_causal_dirs["llama"], limit=12,
                       device="cuda", method_params={"r": 2} if method == "lora" else
                       {"num_samples": 8} if method == "fish" else {},
                       train=TrainConfig(epochs=1, batch_size=4, max_length=48, lr=1e-2, gradient_checkpointing=True),
                       output_dir=str(tmp_path))
    _, run_dir = run_experiment(config, progress=False)
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    assert result["peak_memory"]["kind"] == "cuda_max_allocated" and result["peak_memory"]["training_bytes"] > 0
    assert all(math.isfinite(v) for v in result["test"].values()) and result["trainable"]["head"] == 0
    if method == "random":
        assert result["trainable"]["encoder"] == int(0.01 * result["pretrained_entries"])


def test_an_extract_that_finds_no_gold_answer_is_refused_at_load(tmp_path):
    """'' == '' would score every generation as correct: the pattern must find the gold answer."""
    task = load_task(_task(tmp_path, extract="ANSWER: (\\d+)"))
    with pytest.raises(UsageError, match="finds no answer in the gold answer"):
        task.load_splits()


def test_a_causal_lm_task_on_an_encoder_is_refused(tiny_model_dir):
    from peftbench.modeling.models import uses_lm_head

    with pytest.raises(UsageError, match="needs a causal language model.*bert encoder"):
        uses_lm_head(tiny_model_dir, "causal_lm")


def test_a_prompt_that_leaves_no_room_for_its_answer_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    from peftbench.data.encode import encode_causal

    task = load_task(str(ARITH))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = task.load_splits(limit=1)["train"][0]
    with pytest.raises(UsageError, match="leaves no room for its answer within max_length 4"):
        encode_causal(task, tokenizer, row, 4)


@pytest.mark.slow
def test_a_causal_lm_forgets_by_its_held_out_next_token_loss(tiny_causal_dirs, tmp_path):
    """The probe equals the model's own shifted loss sentence by sentence (HF shifts labels
    itself), "before" is the base model, and full fine-tuning at a high rate moves it more than a
    handful of entries."""
    import json

    import torch

    from peftbench.contract.settings import TrainConfig
    from peftbench.modeling.models import load_model
    from peftbench.training import forgetting
    from peftbench.training.experiment import RunConfig, run_experiment

    model, tokenizer = load_model(tiny_causal_dirs["gpt2"], 1, causal=True)
    a, b, _ = forgetting.probe_pairs()
    sentences = sorted(set(a + b))
    total = count = 0
    with torch.no_grad():
        for s in sentences:
            ids = torch.tensor([tokenizer(s, truncation=True, max_length=128)["input_ids"]])
            if ids.shape[1] > 1:
                total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    base = forgetting.retention(model, tokenizer, torch.device("cpu"), causal=True)
    assert base == pytest.approx(total / count, rel=1e-5)

    changes = {}
    for method, budget in (("fulltuning", "1"), ("random", "0.00001")):
        config = RunConfig(method=method, task=str(ARITH), budget=budget, model=tiny_causal_dirs["gpt2"], limit=32,
                           train=TrainConfig(epochs=1, batch_size=8, max_length=48, lr=3e-2, max_steps=6),
                           output_dir=str(tmp_path / method))
        _, run_dir = run_experiment(config, progress=False)
        record = json.loads((run_dir / "seed-0" / "result.json").read_text())["forgetting"]
        assert record["statistic"] == "next_token_loss" and record["before"] == pytest.approx(base)
        assert record["change"] == pytest.approx(record["after"] - record["before"])
        changes[method] = record["change"]
    assert abs(changes["fulltuning"]) > 10 * abs(changes["random"])


def test_a_catastrophic_extract_pattern_ends_by_name_within_its_time_bound():
    """`(a|aa)+$` on 40 a's and a b backtracks for hours under Python's re; the bounded engine
    stops it and names the pattern."""
    import time

    from peftbench.data.spec import EXTRACT_TIMEOUT_S

    task = load_task(str(ARITH)).model_copy(update={"extract": r"(a|aa)+$"})
    assert task.extract_answer("aaaa") == "a"  # an ordinary answer: the first group, as before
    started = time.monotonic()
    with pytest.raises(UsageError, match=r"extract '\(a\|aa\)\+\$' ran over .* catastrophically"):
        task.extract_answer("a" * 40 + "b")
    assert time.monotonic() - started < 10 * EXTRACT_TIMEOUT_S + 5


def test_length_ordered_evaluation_of_a_causal_lm_keeps_the_splits_order(tiny_causal_dirs):
    """`eval_order: length` on a causal-LM split: the answers' log-likelihoods and the greedy
    answers come back row by row as the given order's (to float rounding)."""
    import torch

    from peftbench.contract.settings import TrainConfig
    from peftbench.data.encode import tokenize
    from peftbench.modeling.models import load_model
    from peftbench.training.evaluation import evaluate
    from peftbench.training.trainer import make_loader

    task = load_task(str(ARITH))
    model, tokenizer = load_model(tiny_causal_dirs["gpt2"], 1, causal=True)
    data = tokenize(task, tokenizer, task.load_splits(limit=24), 64, lm_head=True)
    loader = make_loader(data["validation"], tokenizer, task, 8, False, 0)
    kept = {order: evaluate(model, loader, task, torch.device("cpu"), keep=True,
                            config=TrainConfig(eval_order=order))[1] for order in ("given", "length")}
    assert kept["given"]["labels"] == kept["length"]["labels"]
    assert kept["given"]["predictions"]["answer_loglik"] == pytest.approx(
        kept["length"]["predictions"]["answer_loglik"], abs=1e-4)
    assert None not in kept["length"]["predictions"]["exact_match"]

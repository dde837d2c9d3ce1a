"""Every registered method honours the Selector contract, on a RoBERTa-style encoder too.

Parametrised over the registry (as timm tests every registered model), so a new built-in method
is tested with no edit here: score -> select -> apply -> train a few steps, then the uniform count
bounds what actually moved.
"""
import pytest
import torch

from peftbench import registry
from peftbench.data import load_task, tokenize
from peftbench.experiment import trainable_by_tensor
from peftbench.models import head_parameters, load_model, pretrained_parameters
from peftbench.sparse import count_trainable, effective_weight
from peftbench.trainer import ScoringData, TrainConfig, make_loader, pick_device, train

# light settings so each method runs in seconds on a tiny model
LIGHT = {"sam": {"burnin": 2}, "fish": {"num_samples": 4}, "childtuning-d": {"batches": 2},
         "diffpruning": {"burnin": 2}, "ggm": {"rank": 2, "batches": 4, "important": 3},
         "adapeft": {"batches": 2}, "spectral": {"batches": 3, "neighbours": 3}, "lora": {"r": 2}}
DENSE = {"fulltuning", "mixout", "childtuning-f"}  # every encoder entry may move
NATURAL = {"bitfit", "lora", "adapter"}  # their own count, the budget unused


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-roberta")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # a BERT vocabulary is fine here
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                           type_vocab_size=2, max_position_embeddings=130)
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).roberta.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", sorted(registry.methods()))
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_method_contract(method, arch, tiny_model_dir, tiny_roberta_dir, tmp_path):
    task = load_task("rte")
    model, tokenizer = load_model(tiny_model_dir if arch == "bert" else tiny_roberta_dir, 2)
    data = tokenize(task, tokenizer, task.load_splits(limit=12), 48)
    pre = pretrained_parameters(model)
    before = {n: p.detach().clone() for n, p in pre.items()}
    selector = registry.create(method, **LIGHT.get(method, {}))
    scoring = ScoringData(make_loader(data["train"], tokenizer, task, 4, True, 0), task,
                          pick_device("cpu")) if selector.needs_data else None
    selection = selector.select(model, selector.score(model, scoring), 3000, torch.Generator().manual_seed(0))
    model = selector.apply(model, selection)
    counts = count_trainable(model, set(pre), set(head_parameters(model)))
    assert counts["head"] == sum(p.numel() for p in head_parameters(model).values())
    out = train(model, selector, task, data, tokenizer,
                TrainConfig(epochs=1, batch_size=4, lr=1e-2, max_steps=3), seed=0,
                device=pick_device("cpu"), run_dir=tmp_path, progress=False)
    assert 0 <= out["test"]["accuracy"] <= 1
    counts = count_trainable(model, set(pre), set(head_parameters(model)))  # after: DiffPruning projected
    moved = sum(int((effective_weight(model, n) != before[n]).sum()) for n in pre)
    spend = trainable_by_tensor(model, set(pre), set(head_parameters(model)))
    assert sum(spend.values()) == count_trainable(model, set(pre), set(head_parameters(model)))["trainable"]
    per_tensor = {n: int((effective_weight(model, n) != before[n]).sum()) for n in pre}
    if counts["new"] == 0:  # subset methods: what moved in each tensor is within its count
        assert all(per_tensor[n] <= spend.get(n, 0) for n in pre)
    if method in DENSE:
        assert counts["encoder"] == sum(p.numel() for p in pre.values())
        return
    if counts["new"] == 0:  # pure subset methods: what moved is within what was counted
        assert 0 < moved <= counts["encoder"]
    if method not in NATURAL:
        assert counts["trainable"] <= 3000

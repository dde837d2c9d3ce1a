"""Every registered method passes the public conformance suite (`peftbench.testing`), as timm
tests every registered model: a new built-in is checked with no edit here. The suite runs on a
tiny BERT; the training check runs on a RoBERTa-style encoder too."""
import pytest
import torch

from peftbench.contract import registry
from peftbench.testing import BUILTIN_CHECK_PARAMS, parametrize_with_checks, run_check

METHODS = sorted(registry.methods())


@parametrize_with_checks([(name, BUILTIN_CHECK_PARAMS.get(name, {})) for name in METHODS])
def test_builtin_method_conforms(check):
    check()


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


@pytest.mark.parametrize("method", METHODS)
def test_training_keeps_frozen_entries_on_roberta(method, tiny_roberta_dir):
    outcome = run_check(method, "training_keeps_frozen_entries", BUILTIN_CHECK_PARAMS.get(method, {}),
                        model_dir=tiny_roberta_dir)
    assert outcome.passed, outcome.detail


def test_an_expected_failure_must_fail():
    outcome = run_check("random", "select_is_deterministic",
                        expected_failures={"select_is_deterministic": "declared for the test"})
    assert outcome.passed and not outcome.ok

"""Any peft tuner by its config: counted by peftbench's one rule, sized to a budget by its knob."""
from __future__ import annotations

import pytest
import torch

from peftbench.contract import registry
from peftbench.core.errors import UsageError
from peftbench.modeling.models import head_parameters, load_model, pretrained_parameters
from peftbench.modeling.sparse import count_trainable


def _counts(model, method):
    pre, head = set(pretrained_parameters(model)), set(head_parameters(model))
    selection = method.select(model, None, 4000, torch.Generator())
    return count_trainable(method.apply(model, selection), pre, head), selection


def test_ln_tuning_trains_copies_of_every_layernorm_counted_as_new_entries(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, 2)
    norms = sum(p.numel() for n, p in pretrained_parameters(model).items() if "LayerNorm" in n)
    counts, selection = _counts(model, registry.create("peft", config="LNTuningConfig"))
    assert counts["encoder"] == 0 and counts["new"] == norms == selection.notes["entries"]


def test_a_sized_tuner_takes_the_largest_knob_within_the_budget(tiny_model_dir):
    from peftbench.methods.peft_tuner import config_for, new_entries

    model, _ = load_model(tiny_model_dir, 2)
    options = {"target_modules": ["query", "value"]}
    method = registry.create("peft-sized", config="LoraConfig", options=options, knob="r")
    counts, selection = _counts(model, method)
    r = selection.notes["r"]
    assert counts["trainable"] == selection.notes["entries"] <= 4000 and not selection.notes["saturated"]
    assert new_entries(model, config_for(model, "LoraConfig", {**options, "r": r + 1})) > 4000
    assert r == 4000 // (2 * 2 * (32 + 32))  # query and value of 2 layers, r (32 + 32) each

    saturating = registry.create("peft-sized", config="AdamssConfig",  # r stops growing it on 32-wide layers
                                 options={"num_subspaces": 2, "subspace_rank": 1}, knob="r")
    _, selection = _counts(load_model(tiny_model_dir, 2)[0], saturating)
    assert selection.notes["saturated"] and selection.notes["entries"] <= 4000


def test_an_unknown_config_or_option_is_refused_by_name():
    with pytest.raises(UsageError, match="'Nope' is not a peft config class"):
        registry.create("peft", config="Nope")
    with pytest.raises(UsageError, match="LNTuningConfig"):
        registry.create("peft", config="LNTuningConfig", options={"nonsense": 1})

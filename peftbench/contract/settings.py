"""The run's training settings (`TrainConfig`): one typed record, read by the trainer and by
a method's `score`; which settings enter a cell's fingerprint at their defaults."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Annotated, Literal

from pydantic import (
    ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from peftbench.core.errors import UsageError


@pydantic_dataclass(config=ConfigDict(strict=True, allow_inf_nan=False))
class TrainConfig:
    """Training settings, validated on construction (strict types, finite positive values):
    build one from user input with `train_config`, which names the bad key."""

    epochs: PositiveInt = 3
    batch_size: PositiveInt = 16
    eval_batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-4  # Fu et al.'s learning rate, for every method
    weight_decay: NonNegativeFloat = 0.01  # not on biases and LayerNorm, as Fu et al.
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_grad_norm: PositiveFloat = 1.0
    max_length: PositiveInt = 128
    max_steps: PositiveInt | None = None  # stop early (quick runs, tests)
    # recompute activations in the backward instead of keeping them (transformers'
    # gradient_checkpointing_enable, non-reentrant): less memory for large models, same numbers
    gradient_checkpointing: bool = False
    # compute under bfloat16 autocast on CPU as well (CUDA always does; master weights stay
    # float32): a faster step where the CPU has bf16 arithmetic, and other numbers, so a board
    # that wants it declares it in its spec's `train:`
    bf16: bool = False
    # "length": evaluation batches made of rows of similar length (less padding, fewer tokens;
    # the predictions are put back in the split's order). Padding changes the last bits of a
    # row's logits, so this too is a declared setting, not a silent speed-up
    eval_order: Literal["given", "length"] = "given"
    # SPEFT's dynamic masks: every N steps the method scores and selects again at the current
    # weights, within the same budget (`peftbench.training.reselect`); 0 keeps the mask static
    reselect_every: NonNegativeInt = 0
    # the head's rate (the new output layer and the pre-head layers the checkpoint did not train,
    # `modeling.models.head_parameters`); None: the run's lr. Why: the head is trained by every
    # method, so under one rate a method's tuned lr also sets how its head learns (at Random's
    # tuned 0.1% rate of 3e-2 the untrained pooler is overwritten); a board that compares
    # selections can hold the head's rate fixed across methods
    head_lr: PositiveFloat | None = None


#: settings that cannot change a number: a cell's fingerprint leaves them out (`sweep.spec.cell_config`)
NUMERICALLY_NEUTRAL = ("gradient_checkpointing",)


#: settings added after cells were committed: at these values they are left out of a cell's
#: fingerprint, so a cell fingerprinted before the setting existed stays current
OMITTED_AT = {"bf16": False, "eval_order": "given", "reselect_every": 0, "head_lr": None}


def fingerprinted(train: dict) -> dict:
    """The training settings that enter a cell's fingerprint (`train`: TrainConfig's fields)."""
    return {k: v for k, v in train.items()
            if k not in NUMERICALLY_NEUTRAL and not (k in OMITTED_AT and v == OMITTED_AT[k])}


def train_config(values: dict, where: str = "train", base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from user values (over `base`'s), or a UsageError naming the key, the
    value, what was wrong and the allowed settings."""
    allowed = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown train settings {unknown}; allowed: {sorted(allowed)}")
    try:
        return TrainConfig(**{**(asdict(base) if base else {}), **values})
    except ValidationError as err:
        problem = err.errors()[0]
        key = ".".join(str(x) for x in problem["loc"])
        raise UsageError(f"{where}.{key} = {problem.get('input')!r}: {problem['msg']}") from None

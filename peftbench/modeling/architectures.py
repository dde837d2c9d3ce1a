"""Module names per architecture: where a method that names modules (LoRA's targets, adapters'
placement, GGM's query/key/value components) finds them, from one table.

Keyed by `config.model_type`. `block`: the pattern of a transformer block's module path;
`qkv`: the attention input projections (GPT-2: one fused `c_attn`); `attention_out`: the
attention output projection; `ffn_in`: the feed-forward input projection(s); `ffn_out`: its
output projection. An architecture not in the table is refused with the known ones named,
never silently matched to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.core.errors import UsageError


@dataclass(frozen=True)
class Layout:
    block: str  # regex of a block's path inside the base model, e.g. r"layer\.\d+"
    qkv: tuple[str, ...]
    attention_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str


_BERT = Layout(block=r"layer\.\d+", qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
               attention_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense")
_LLAMA = Layout(block=r"layers\.\d+", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                attention_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj")

LAYOUTS: dict[str, Layout] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "camembert": _BERT, "electra": _BERT,
    "gpt2": Layout(block=r"h\.\d+", qkv=("attn.c_attn",), attention_out="attn.c_proj",
                   ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj"),
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA, "qwen3": _LLAMA,
}


def layout(model) -> Layout:
    """The module layout of `model` (a transformers model), or a UsageError naming the known
    architectures."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in LAYOUTS:
        raise UsageError(f"architecture {kind!r} has no module layout in peftbench.modeling.architectures "
                         f"(known: {', '.join(sorted(LAYOUTS))}): a method that names modules "
                         "cannot place itself; add the architecture's names there")
    return LAYOUTS[kind]


def block_modules(model, suffixes: list[str]) -> list[str]:
    """Full names of the modules `<... block>.<suffix>` of every transformer block of `model`
    (e.g. each layer's `attention.self.query`), or a UsageError when a suffix matches none."""
    import re

    block = layout(model).block
    found = []
    for suffix in suffixes:
        pattern = re.compile(rf"(.*\.)?{block}\.{re.escape(suffix)}")
        names = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
        if not names:
            raise UsageError(f"target {suffix!r} matches no module inside the blocks of this "
                             f"{model.config.model_type} model; name modules inside a block, "
                             f"e.g. {layout(model).qkv[0]}")
        found += names
    return sorted(found)

"""Any tuner peft ships, as a method, by its config class: `--param config=LNTuningConfig
--param options='{"...": ...}'` (AdaMSS: `AdamssConfig`, BEFT: `BeftConfig`, LN tuning:
`LNTuningConfig`, IA3, ...).

The config is built as `peft.<config>(**options)` and injected into the model in place
(`peft.inject_adapter_in_model`: the model keeps its class and parameter names); peft fills the
target modules from its own per-architecture tables when `options` name none. What trains is
what peft leaves trainable (its adapter's parameters) and the task head; every pre-trained tensor
is frozen and must stay bit-identical (the runner checks). The count follows peftbench's one
rule (`peftbench.sparse.count_trainable`): the tuner's parameters are new entries, whatever they
are called, so LN tuning's trained copies of the LayerNorms count as many entries as the
LayerNorms have.

`peft` runs at the tuner's natural count (its options decide its size). `peft-sized` takes a
budget: `knob` names an integer option of the config that sets the tuner's size (AdaMSS's `r`,
LoRA's `r`) and is set to the largest value whose count stays within the budget (bisection on a
copy of the model), so the tuner competes at the board's budgets.
"""
from __future__ import annotations

import copy

from peftbench.api import Selection, Selector, UsageError


def build_config(name: str, options: dict):
    """`peft.<name>(**options)`, or a one-line UsageError naming what peft has."""
    import peft

    cls = getattr(peft, name, None)
    from peft import PeftConfig

    if not (isinstance(cls, type) and issubclass(cls, PeftConfig)) or name == "PeftConfig":
        known = sorted(n for n in dir(peft) if n.endswith("Config") and n != "PeftConfig")
        raise UsageError(f"config {name!r} is not a peft config class: e.g. {', '.join(known[:8])} ...")
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise UsageError(f"peft's {name}({options}): {str(err).splitlines()[0][:300]}") from None


def config_for(model, name: str, options: dict):
    """`build_config`, with LN tuning's targets filled from the model (peft has no table for
    BERT-style models): every normalisation layer of the encoder, by its leaf name."""
    if name == "LNTuningConfig" and "target_modules" not in options:
        from peftbench.api import pretrained_parameters

        prefix = model.base_model_prefix + "."
        names = {n.rsplit(".", 1)[0] for n in pretrained_parameters(model)}
        leaves = sorted({m.rsplit(".", 1)[-1] for m, module in model.named_modules()
                         if m in names and m.startswith(prefix)
                         and type(module).__name__.endswith(("LayerNorm", "RMSNorm"))})
        options = {**options, "target_modules": leaves}
    return build_config(name, options)


def inject(model, config):
    """The tuner injected in place: only its parameters and the task head train."""
    from peft import inject_adapter_in_model

    from peftbench.api import head_parameters, pretrained_parameters

    for p in pretrained_parameters(model).values():
        p.requires_grad_(False)
    before = {id(p) for p in model.parameters()}
    try:
        model = inject_adapter_in_model(config, model)
    except (ValueError, TypeError) as err:  # peft: no module matched, or a layer type it does not wrap
        raise UsageError(f"peft's {type(config).__name__} cannot adapt this model: "
                         f"{str(err).splitlines()[0][:300]}") from None
    for p in model.parameters():  # what peft added (and left trainable) trains; nothing pre-trained
        p.requires_grad_(id(p) not in before and p.requires_grad)
    for p in head_parameters(model).values():
        p.requires_grad_(True)
    return model


def new_entries(model, config) -> int:
    """The entries the tuner adds to a copy of `model` (its trainable count under peftbench's rule)."""
    trial = copy.deepcopy(model)
    before = {id(p) for p in trial.parameters()}
    trial = inject(trial, config)
    return sum(p.numel() for p in trial.parameters() if id(p) not in before and p.requires_grad)


class PeftTuner(Selector):
    """A peft tuner at its natural count (module docstring)."""

    description = "any peft tuner by its config class and options, at its natural count"
    uses_budget = False

    def __init__(self, config: str = "LNTuningConfig", options: dict | None = None):
        build_config(config, options or {})  # an unknown config or option: refused by name now
        self.config = config
        self.options = options

    def select(self, model, scores, budget: int, generator):
        config = config_for(model, self.config, self.options or {})  # a bad config: refused before training
        return Selection(notes={"peft_config": self.config, "options": self.options or {},
                                "entries": new_entries(model, config)})

    def apply(self, model, selection: Selection):
        return inject(model, config_for(model, self.config, self.options or {}))


class PeftSized(PeftTuner):
    """A peft tuner whose integer option `knob` is set from the budget (module docstring)."""

    description = "any peft tuner by its config class, its size option set to fit the budget"
    uses_budget = True

    def __init__(self, config: str = "AdamssConfig", options: dict | None = None, knob: str = "r"):
        super().__init__(config, options)
        self.knob = knob

    def select(self, model, scores, budget: int, generator):
        options = dict(self.options or {})

        def size(value: int) -> int:
            return new_entries(model, config_for(model, self.config, {**options, self.knob: value}))

        if size(1) > budget:
            raise UsageError(f"peft's {self.config} at {self.knob}=1 adds {size(1):,} entries, over the "
                             f"budget of {budget:,}: give a larger budget")
        low, high = 1, 2
        while size(high) <= budget and high < 1 << 16:
            if size(high) == size(low):  # the knob no longer grows the tuner: its smallest full size
                high = low + 1
                break
            low, high = high, high * 2
        while high - low > 1:  # largest value that fits: size(low) <= budget < size(high)
            middle = (low + high) // 2
            low, high = (middle, high) if size(middle) <= budget else (low, middle)
        self._value = low
        return Selection(notes={"peft_config": self.config, "options": options, self.knob: low,
                                "entries": size(low), "budget": budget,
                                "saturated": size(low + 1) == size(low) <= budget})

    def apply(self, model, selection: Selection):
        return inject(model, config_for(model, self.config, {**(self.options or {}), self.knob: self._value}))

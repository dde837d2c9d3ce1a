"""A run's selection as a peft adapter, to train it in any pipeline peft serves.

`export_selection` writes the mask as a peft SHiRA adapter: SHiRA's `(indices, values)` layer
is the peft layer that trains arbitrary single entries of a Linear weight, and it saves its
indices with the adapter. Why a loader (`load`) and not bare `PeftModel.from_pretrained`:
peft 0.21 sizes every SHiRA layer from one config value (r(m+n) entries, the same r
everywhere) and Super-Tuning from one sparsity, before reading the saved tensors, so a
selection with its own count per layer fits neither tuner's config; peft's set of tuner types is
a closed enum (`PeftType`), so no new tuner can be registered either. `load` builds peft's
SHiRA layers, resizes each to its saved count, then loads the adapter through peft's own
`set_peft_model_state_dict`: the result is a plain `PeftModel` (train it with
`transformers.Trainer` or TRL, save it with `save_pretrained`). An adapter whose every layer
has r(m+n) entries for one r (SHiRA's own selections) also loads with bare
`PeftModel.from_pretrained`; the export says which case it wrote.

What SHiRA cannot express (peft's SHiRA wraps `nn.Linear` only): entries of biases, LayerNorm
weights, embeddings, GPT-2's Conv1D. The export lists them with their count and share of the
selection; they are never dropped silently. Weight decay: an optimizer's decoupled decay pulls
SHiRA's values towards 0, i.e. the entries towards W0, where peftbench pulls the entries'
values W0[i] + v towards 0 (`peftbench.modeling.sparse`); train with no decay on them to match.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftbench.core.errors import UsageError
from peftbench.modeling.selection import Selection

MANIFEST = "peftbench_export.json"


@dataclass
class ExportReport:
    """What an export wrote and what it could not express."""

    layers: dict[str, int]  # Linear module -> entries trained through SHiRA
    left_out: dict[str, int]  # tensor -> selected entries SHiRA cannot express
    head_modules: list[str]
    selected: int
    from_pretrained: bool  # loads with bare PeftModel.from_pretrained (one r fits every layer)
    r: int
    trained_values: bool = False  # the adapter holds the run's trained values (else zeros)
    notes: list[str] = field(default_factory=list)

    @property
    def expressed(self) -> int:
        return sum(self.layers.values())

    def summary(self) -> str:
        lines = [f"{self.expressed} of {self.selected} selected entries "
                 f"({self.expressed / max(self.selected, 1):.1%}) train through SHiRA in "
                 f"{len(self.layers)} Linear layers; task head as modules_to_save: "
                 f"{', '.join(self.head_modules) or 'none'}"]
        if not self.trained_values:
            lines.append("values: zero, the pre-trained model (run with --save-trained to export the trained values)")
        elif self.left_out:
            lines.append("values: the run's trained entries and head, except the entries listed below, "
                         "which keep their pre-trained values: not the run's model exactly")
        else:
            lines.append("values: the run's trained entries and head (the fine-tuned model)")
        if self.left_out:
            lost = sum(self.left_out.values())
            lines.append(f"not expressible in peft SHiRA (nn.Linear weights only): {lost} entries "
                         f"({lost / max(self.selected, 1):.1%} of the selection) in "
                         f"{len(self.left_out)} tensors:")
            lines += [f"  {name}: {count}" for name, count in sorted(self.left_out.items())]
        lines.append("load: " + ("PeftModel.from_pretrained(base_model, DIR) or "
                                 "peftbench.training.export.load(base_model, DIR)" if self.from_pretrained
                                 else "peftbench.training.export.load(base_model, DIR) (the layers' "
                                 "counts differ; peft's SHiRA config holds one r)"))
        return "\n".join(lines)


def _head_modules(model: nn.Module) -> list[str]:
    """The modules that hold the task head (peft's modules_to_save): the top-level modules
    outside the encoder, and the pre-head layers that count as head (`untrained_pre_head`)."""
    from peftbench.modeling.models import head_parameters

    prefix = model.base_model_prefix
    return sorted({name.rpartition(".")[0] if name.startswith(prefix + ".") else name.split(".")[0]
                   for name in head_parameters(model)})


def shira_model(model: nn.Module, selection: Selection, trained: dict | None = None):
    """(a `PeftModel` wrapping `model` in place, the ExportReport): peft SHiRA layers on every
    nn.Linear weight with selected entries, each sized to its count, and the task head as
    `modules_to_save`. Values: zero (the pre-trained function), or with `trained` (a run's
    `trained.safetensors`, `training.experiment.save_trained`) the run's trained entries and head."""
    from peft import ShiraConfig, get_peft_model

    from peftbench.modeling.models import pretrained_parameters

    params = pretrained_parameters(model)
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    layers, left_out, flat = {}, {}, {}
    for name in sorted(selection.full | set(selection.partial)):
        module_name, _, attr = name.rpartition(".")
        idx = (torch.arange(params[name].numel()) if name in selection.full
               else selection.partial[name].long())
        if attr == "weight" and module_name in linear:
            layers[module_name] = len(idx)
            flat[module_name] = idx
        else:
            left_out[name] = len(idx)
    selected = sum(layers.values()) + sum(left_out.values())
    if not layers:
        raise UsageError("the selection has no entry in an nn.Linear weight: nothing for peft "
                         f"SHiRA to train ({len(left_out)} other tensors selected)")
    sizes = {m: sum(model.get_submodule(m).weight.shape) for m in layers}
    one_r = {layers[m] // sizes[m] for m in layers}
    fits = len(one_r) == 1 and all(layers[m] % sizes[m] == 0 for m in layers)
    r = one_r.pop() if fits else 1
    heads = _head_modules(model)
    if trained is not None:
        with torch.no_grad():
            for name, value in trained.items():
                if name.startswith("head/"):  # copied into modules_to_save by peft below
                    model.get_parameter(name.removeprefix("head/")).copy_(value)
    config = ShiraConfig(r=r, target_modules=sorted(layers), modules_to_save=heads or None,
                         init_weights=True, task_type="SEQ_CLS")
    config.mask_fn = _first_entries  # placeholder layers, resized below to the selection
    peft_model = get_peft_model(model, config)
    columns = {m: model.get_submodule(m).base_layer.weight.shape[1] for m in layers}
    _resize(peft_model, {m: torch.stack([i // columns[m], i % columns[m]]).int() for m, i in flat.items()})
    if trained is not None:
        _set_values(peft_model, {m: _entry_values(trained, f"{m}.weight", i, selection)
                                 - params[f"{m}.weight"].detach().reshape(-1)[i].float()
                                 for m, i in flat.items()})
    return peft_model, ExportReport(layers=layers, left_out=left_out, head_modules=heads,
                                    selected=selected, from_pretrained=fits, r=r)


def _entry_values(trained: dict, name: str, indices: torch.Tensor, selection: Selection) -> torch.Tensor:
    """A tensor's trained values at `indices` (its whole tensor, or its saved masked entries)."""
    value = trained[f"encoder/{name}"]
    return value.reshape(-1)[indices].float() if name in selection.full else value.float()


def _set_values(peft_model: nn.Module, deltas: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Each SHiRA layer's values (trained value - W0 at its indices)."""
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in deltas and hasattr(module, "shira_weight"):
                module.shira_weight[adapter].copy_(deltas[key].to(module.shira_weight[adapter].device))


def linear_part(model: nn.Module, selection: Selection) -> Selection:
    """The entries of `selection` that peft's SHiRA can train (those of nn.Linear weights)."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return Selection(full=selection.full & linear,
                     partial={n: i for n, i in selection.partial.items() if n in linear})


def export_selection(model: nn.Module, selection: Selection, out_dir: Path,
                     trained: dict | None = None) -> ExportReport:
    """Write `selection` (of `model`'s pre-trained entries) to `out_dir` as a peft SHiRA adapter
    (`shira_model`; with `trained`, holding the run's trained values), plus a manifest
    (`peftbench_export.json`) of what was and was not expressed. `model` is left as it was."""
    from peft import get_peft_model_state_dict

    peft_model, report = shira_model(copy.deepcopy(model), selection, trained)
    report.trained_values = trained is not None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    (out_dir / MANIFEST).write_text(json.dumps(asdict(report), indent=1) + "\n")
    saved = get_peft_model_state_dict(peft_model)  # what `load` reads back holds every entry
    assert sum(v.numel() for k, v in saved.items() if "shira_weight" in k) == report.expressed
    return report


def _first_entries(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
    """A valid SHiRA mask (the first r(m+n) entries) for layers resized right after."""
    weight = base_layer.weight
    mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    mask[: r * sum(weight.shape)] = 1
    return mask.view_as(weight)


def _resize(peft_model: nn.Module, indices: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Give each SHiRA layer (by its name in the base model) its own count: zero values at
    `indices` [2, k]."""
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        key = name.removeprefix(prefix)
        if key in indices and hasattr(module, "shira_weight"):
            idx = indices[key]
            device = module.base_layer.weight.device
            module.shira_weight[adapter] = nn.Parameter(torch.zeros(idx.shape[1], device=device))
            module.shira_indices[adapter] = idx.to(device)


def load(base_model: nn.Module, adapter_dir: str | Path, is_trainable: bool = True):
    """A `PeftModel` of `base_model` with the exported SHiRA adapter in `adapter_dir`: each
    layer sized to its saved count, then loaded by peft's `set_peft_model_state_dict`."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if type(config).__name__ != "ShiraConfig":
        raise UsageError(f"{adapter_dir} holds a {type(config).__name__}, not a SHiRA adapter "
                         "written by `peftbench export`")
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    shapes = {key.removeprefix("base_model.model.").removesuffix(".shira_indices"): value
              for key, value in state.items() if key.endswith(".shira_indices")}
    config.inference_mode = not is_trainable
    config.mask_fn = _first_entries
    peft_model = get_peft_model(base_model, config)
    _resize(peft_model, shapes)
    set_peft_model_state_dict(peft_model, state)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def export_run(run_dir: str | Path, out_dir: str | Path, seed: int | None = None) -> ExportReport:
    """`peftbench export RUN_DIR --to peft OUT_DIR`: the mask a run trained (its seed's
    `mask.pt`, the entries that could change), on the run's model, as a SHiRA adapter."""
    from peftbench.core import ownership
    from peftbench.core.safeload import load_pt
    from peftbench.data.tasks import load_task
    from peftbench.modeling.models import load_model, pretrained_parameters, uses_lm_head
    from peftbench.training.experiment import TRAINED
    from peftbench.training.record import read_json
    from peftbench.training.trainer import set_seed

    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    if (out_dir / "spec.yaml").exists() or (out_dir / "cell.json").exists():
        raise UsageError(f"export folder {out_dir} is a board's or a cell's folder: give another folder")
    ownership.check(out_dir, "adapter", lambda f: (f / MANIFEST).is_file(), "export folder")  # never over your files
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{run_dir} is not a run directory (no config.json): give a folder "
                         "written by `peftbench run` or a sweep's runs/<cell>")
    config = read_json(run_dir / "config.json")
    seeds = sorted(int(p.name.removeprefix("seed-")) for p in run_dir.glob("seed-*")
                   if (p / "mask.pt").is_file())
    if not seeds:
        raise UsageError(f"{run_dir} has no seed-*/mask.pt: the run has no finished seed to export")
    if seed is None:
        seed = seeds[0]
    elif seed not in seeds:
        raise UsageError(f"{run_dir} has no finished seed {seed}: seeds with a mask: {seeds}")
    saved = load_pt(run_dir / f"seed-{seed}" / "mask.pt")
    task = load_task(config["task"])
    set_seed(seed)
    if uses_lm_head(config["model"], task.kind):
        raise UsageError(f"{run_dir} trained a language model's own head ({task.kind} task on "
                         f"{config['model']!r}): export writes sequence-classification adapters only so far")
    model, _ = load_model(config["model"], task.num_labels)
    params = pretrained_parameters(model)
    unknown = sorted((set(saved["full"]) | set(saved["partial"])) - set(params))
    if unknown:
        raise UsageError(f"the mask names tensors the model {config['model']!r} does not have "
                         f"({unknown[:3]}): was it made on another model?")
    selection = Selection(full=set(saved["full"]),
                          partial={n: i.long() for n, i in saved["partial"].items()})
    trained = None
    if (run_dir / f"seed-{seed}" / TRAINED).is_file():
        from safetensors.torch import load_file

        trained = load_file(str(run_dir / f"seed-{seed}" / TRAINED))
    ownership.claim(out_dir, "adapter", lambda f: (f / MANIFEST).is_file(), "export folder")
    return export_selection(model, selection, out_dir, trained)

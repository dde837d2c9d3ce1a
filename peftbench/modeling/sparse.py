"""Training a subset of entries, with the rest frozen by construction.

A parameter trained in part becomes W = W0 + scatter(indices, values) through
`torch.nn.utils.parametrize`: W0 (the pre-trained tensor) never requires grad, and only the
k-vector `values` is an optimizer parameter. So

- frozen entries are bit-identical to the pre-trained ones (no weight-decay drift, unlike
  gradient-zeroing implementations such as Fu et al.'s reference code);
- optimizer state grows with the trainable count, not with the model size.

A parameter trained whole just keeps `requires_grad=True`.

Weight decay, one rule for every method (`decay_plan`): AdamW's decoupled decay pulls every
trained *pre-trained entry's value* towards 0, whether its tensor trains whole or in part, and
new parameters (LoRA, adapters, DiffPruning's w) towards 0; biases and normalisation weights are
exempt, judged by the pre-trained tensor's name (so a partially trained bias, whose optimizer
parameter is called `...bias.0.values`, is exempt like a whole one). For a sparse delta the
entry's value is W0[i] + v, so the trainer applies v <- v - lr wd (W0[i] + v) itself
(`SparseDelta.decay_`) instead of AdamW's v <- v - lr wd v, which would pull towards W0.

The step at the floor. Read through the parametrisation, W0 + delta is a dense tensor that
autograd differentiates densely: the full weight gradient (2Tmn multiply-adds for a Linear on T
tokens, as much as the forward) is computed and then gathered at k entries. For the two modules
that hold nearly every entry, `nn.Linear` (and GPT-2's `Conv1D`, its transpose) and
`nn.Embedding`, `apply_selection` replaces the module's forward by an autograd function
(`SparseLinearFunction`, `SparseEmbeddingFunction`)
whose backward computes the input gradient and only the k entries' gradient: for a Linear the
sampled product (gY^T X) at the (row, col) pairs, by `torch.sparse.sampled_addmm` (CPU and CUDA),
2Tk multiply-adds; for an embedding the trained rows' summed output gradients. The
parametrisation stays registered (names, counts, `module.weight`, the optimizer parameter are as
before) and remains the path for every other module (biases, LayerNorm, ...).
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from peftbench.modeling.models import head_parameters, pretrained_parameters
from peftbench.modeling.selection import Selection


class SparseDelta(nn.Module):
    """W = W0 + delta, where delta is zero outside `indices` and `values` on them."""

    def __init__(self, indices: torch.Tensor, base: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("indices", indices.to(torch.long))
        self.values = nn.Parameter(torch.zeros(len(indices)))
        # W0 at the trained entries (k floats): decay pulls W0[i] + v towards 0, see `decay_`
        base_values = base.detach().reshape(-1)[self.indices].float() if base is not None else \
            torch.zeros(len(indices))
        self.register_buffer("base_values", base_values)
        self._pattern = None  # see sampling_pattern

    @torch.no_grad()
    def decay_(self, amount: float) -> None:
        """Decoupled weight decay of the entries' values W0[i] + v towards 0 by `amount` = lr wd."""
        self.values.sub_(amount * (self.base_values + self.values))

    def changed_indices(self) -> torch.Tensor:
        """Flat indices of the entries this parametrisation can change (the saved mask)."""
        return self.indices

    def entries_changed(self) -> int:
        """Entries of W0 this parametrisation can change (see `count_trainable`)."""
        return len(self.indices)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base.reshape(-1).index_add(0, self.indices, self.values.to(base.dtype)).view_as(base)

    def sampling_pattern(self, shape: torch.Size) -> tuple:
        """(order, crow_indices, col_indices) of the k entries as a CSR pattern of a 2-D
        `shape`, computed once: `order` sorts the entries by flat index (row, then column)."""
        if self._pattern is None or self._pattern[1].device != self.indices.device:
            order = torch.argsort(self.indices)
            flat = self.indices[order]
            rows, cols = flat // shape[1], flat % shape[1]
            crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, device=rows.device))
            self._pattern = (order, crow, cols)
        return self._pattern


def sampled_gradient(grad_out: torch.Tensor, inputs: torch.Tensor, delta: SparseDelta,
                     shape: torch.Size) -> torch.Tensor:
    """(grad_out^T @ inputs) at the delta's k entries only, in the delta's order, in float32:
    the gradient of `values` for y = x W^T, without the dense m x n weight gradient.

    On CPU the tokens go in chunks of a few hundred: the kernel reads both operands token-minor
    and transposes them first, which for a whole batch (T x 1536 floats) leaves the caches and
    cost more than the product itself (measured: 2x slower unchunked)."""
    order, crow, cols = delta.sampling_pattern(shape)
    g2d = grad_out.reshape(-1, shape[0]).float()
    x2d = inputs.reshape(-1, shape[1]).float()
    tokens = len(g2d)
    chunk = tokens if g2d.is_cuda else max(64, 2**18 // (shape[0] + shape[1]))
    sampled = torch.zeros(len(cols), device=g2d.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we want
        warnings.simplefilter("ignore", UserWarning)
        for start in range(0, tokens, chunk):
            pattern = torch.sparse_csr_tensor(crow, cols, sampled, shape, check_invariants=False)
            sampled = torch.sparse.sampled_addmm(pattern, g2d[start:start + chunk].t(),
                                                 x2d[start:start + chunk]).values()
    grad = torch.empty_like(sampled)
    grad[order] = sampled
    return grad


class SparseLinearFunction(torch.autograd.Function):
    """y = x (W0 + delta)^T + b (nn.Linear, W stored [out, in]), or with `conv1d` y = x (W0 +
    delta) + b (GPT-2's Conv1D, W stored [in, out]), differentiated for x, b and the delta's
    values only. For Conv1D the k entries' gradient is (X^T gY) at their (in, out) pairs: the
    sampled product of `sampled_gradient` with the operands' roles swapped."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, values, delta, conv1d=False):
        ctx.delta, ctx.shape, ctx.conv1d = delta, weight.shape, conv1d
        ctx.save_for_backward(x, weight, values)
        if conv1d:  # as Conv1D.forward computes it
            out = torch.addmm(bias, x.reshape(-1, weight.shape[0]), delta.forward(weight))
            return out.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, delta.forward(weight), bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, values = ctx.saved_tensors
        need_x, _, need_bias, need_values = ctx.needs_input_grad[:4]
        grad_x = grad_bias = grad_values = None
        if need_x:  # the weight is rebuilt, not saved: O(mn) work, no O(mn) memory per layer
            w = ctx.delta.forward(weight).to(grad_out.dtype)
            grad_x = grad_out @ (w.t() if ctx.conv1d else w)
        if need_bias:
            grad_bias = grad_out.reshape(-1, ctx.shape[1 if ctx.conv1d else 0]).sum(0)
        if need_values:
            first, second = (x, grad_out) if ctx.conv1d else (grad_out, x)
            grad_values = sampled_gradient(first, second, ctx.delta, ctx.shape).to(values.dtype)
        return (grad_x, None, grad_bias, grad_values, None, None)[:len(ctx.needs_input_grad)]


class SparseEmbeddingFunction(torch.autograd.Function):
    """out = (W0 + delta)[ids] without building W0 + delta: a small table of the delta on the
    rows this batch looks up (at most T rows) is added to W0[ids]; the values' gradient is the
    output gradient summed per looked-up row, read at the k entries (zero for rows not looked
    up, and for `padding_idx`, as `F.embedding`)."""

    @staticmethod
    def forward(ctx, ids, weight, values, delta, padding_idx):
        order, crow, cols = delta.sampling_pattern(weight.shape)
        looked_up, inverse = torch.unique(ids, return_inverse=True)
        starts = crow[looked_up]
        counts = crow[looked_up + 1] - starts
        slot = torch.repeat_interleave(torch.arange(len(looked_up), device=ids.device), counts)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        sorted_pos = torch.arange(len(slot), device=ids.device) - first + starts[slot]
        entry, column = order[sorted_pos], cols[sorted_pos]
        table = torch.zeros(len(looked_up), weight.shape[1], dtype=weight.dtype, device=weight.device)
        table.view(-1).index_add_(0, slot * weight.shape[1] + column, values[entry].to(weight.dtype))
        kept = ids != padding_idx if padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        ctx.save_for_backward(inverse, kept, slot, column, entry)
        ctx.table_shape, ctx.k = table.shape, len(values)
        return F.embedding(ids, weight, padding_idx) + table[inverse]

    @staticmethod
    def backward(ctx, grad_out):
        inverse, kept, slot, column, entry = ctx.saved_tensors
        grad_table = torch.zeros(ctx.table_shape, dtype=torch.float32, device=grad_out.device)
        grad_table.index_add_(0, inverse[kept], grad_out[kept].float())
        grad_values = torch.zeros(ctx.k, dtype=torch.float32, device=grad_out.device)
        grad_values[entry] = grad_table[slot, column]
        return None, None, grad_values, None, None


def _sparse_delta(module: nn.Module) -> SparseDelta | None:
    """The module's weight delta when a SparseDelta is its weight's only parametrisation."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]
    return plist[0] if len(plist) == 1 and isinstance(plist[0], SparseDelta) else None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    delta = _sparse_delta(self)
    if delta is None or not torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    if not len(delta.indices):  # a dynamic mask's tensor with no entry now: W0 itself
        return F.linear(x, self.parametrizations.weight.original, self.bias)
    return SparseLinearFunction.apply(x, self.parametrizations.weight.original, self.bias,
                                      delta.values, delta)


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    delta = _sparse_delta(self)
    if delta is None or not torch.is_grad_enabled():
        from transformers.pytorch_utils import Conv1D

        return Conv1D.forward(self, x)
    if not len(delta.indices):
        w = self.parametrizations.weight.original
        return torch.addmm(self.bias, x.reshape(-1, w.shape[0]), w).view(*x.shape[:-1], w.shape[1])
    return SparseLinearFunction.apply(x, self.parametrizations.weight.original, self.bias,
                                      delta.values, delta, True)


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    delta = _sparse_delta(self)
    if delta is None or not torch.is_grad_enabled():
        return nn.Embedding.forward(self, ids)
    if not len(delta.indices):
        return F.embedding(ids, self.parametrizations.weight.original, self.padding_idx)
    return SparseEmbeddingFunction.apply(ids, self.parametrizations.weight.original,
                                         delta.values, delta, self.padding_idx)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D with its own forward (GPT-2's projections: y = x W + b, W stored
    [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D) and type(module).forward is Conv1D.forward \
        and module.bias is not None


def use_sparse_step(module: nn.Module) -> bool:
    """Route a Linear's, GPT-2 Conv1D's or plain Embedding's forward through the functions
    above (see the module docstring); False, leaving the parametrisation path, for any other
    module."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        module.forward = types.MethodType(_linear_forward, module)
        return True
    if _is_conv1d(module):
        module.forward = types.MethodType(_conv1d_forward, module)
        return True
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward \
            and module.max_norm is None and not module.sparse and not module.scale_grad_by_freq:
        module.forward = types.MethodType(_embedding_forward, module)
        return True
    return False


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def apply_selection(model: nn.Module, selection: Selection) -> nn.Module:
    """Freeze all pre-trained entries but the selection; the task head stays trainable."""
    params = pretrained_parameters(model)
    unknown = (selection.full | set(selection.partial)) - set(params)
    if unknown:
        raise ValueError(f"selection names parameters outside the encoder: {sorted(unknown)[:3]}")
    for name, param in params.items():
        param.requires_grad_(name in selection.full)
    for param in head_parameters(model).values():
        param.requires_grad_(True)
    for name, indices in selection.partial.items():
        module, attr = _owner(model, name)
        delta = SparseDelta(indices, params[name]).to(params[name].device)
        parametrize.register_parametrization(module, attr, delta, unsafe=True)
        module.parametrizations[attr].original.requires_grad_(False)
        if attr == "weight" and params[name].dim() == 2 and \
                len(torch.unique(delta.indices)) == len(delta.indices):
            use_sparse_step(module)
    return model


def effective_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor the forward pass uses for parameter `name` (its pre-apply name)."""
    from peftbench.modeling.peftsparse import effective_weight as peft_weight

    module, attr = _owner(model, name)
    if attr == "weight" and (weight := peft_weight(module)) is not None:
        return weight
    return getattr(module, attr)


def canonical_name(name: str) -> str:
    """A parameter's pre-trained name, through parametrisations and peft's `base_layer`."""
    return (name.replace(".parametrizations.", ".").replace(".original", "")
            .replace(".base_layer.", "."))


def tensor_name(name: str) -> str:
    """The pre-trained tensor an optimizer parameter belongs to: '<m>.bias' for
    '<m>.parametrizations.bias.original' and '<m>.parametrizations.bias.0.values'."""
    module, sep, rest = name.partition(".parametrizations.")
    if sep:
        return f"{module}.{rest.split('.')[0]}"
    return name.replace(".base_layer.", ".")


def decay_exempt(name: str) -> bool:
    """Biases and normalisation weights get no weight decay (Fu et al., BERT), by tensor name."""
    tensor = tensor_name(name)
    owner = tensor.rpartition(".")[0].lower()
    return tensor.endswith("bias") or "layernorm" in owner or "layer_norm" in owner \
        or owner.endswith("norm")


def decay_plan(model: nn.Module) -> tuple[list, list, list[SparseDelta]]:
    """(AdamW parameters with decay, AdamW parameters without, sparse deltas the trainer decays
    itself): the one weight-decay rule of the module docstring."""
    from peftbench.modeling import peftsparse

    decay, no_decay, deltas = [], [], []
    delta_values = peftsparse.decays(model)  # peft's SHiRA / Super-Tuning values: the same rule
    for name, module in model.named_modules():
        if isinstance(module, SparseDelta):
            delta_values[id(module.values)] = module
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in delta_values:
            no_decay.append(param)  # AdamW must not pull v towards 0: the trainer decays it
            if not decay_exempt(name):
                deltas.append(delta_values[id(param)])
        else:
            (no_decay if decay_exempt(name) else decay).append(param)
    return decay, no_decay, deltas


def trainable_entries(model: nn.Module, pretrained_names: set[str], head_names: set[str]):
    """Yield (name, kind, count) for everything that trains: kind is `encoder` (pre-trained
    entries that may differ: whole tensors, or what a parametrisation module declares with
    `entries_changed()`, under its tensor's pre-trained name), `new` or `head`."""
    from peftbench.modeling.peftsparse import sparse_layers

    counted = set()
    for name, module in model.named_modules():
        if hasattr(module, "entries_changed"):  # e.g. '<m>.parametrizations.weight.0'
            yield canonical_name(name.rsplit(".", 1)[0]), "encoder", module.entries_changed()
            counted |= {id(p) for p in module.parameters()}
    for name, values, flat in sparse_layers(model):  # peft's SHiRA / Super-Tuning entries
        if values.requires_grad:
            yield canonical_name(f"{name}.weight"), "encoder", len(flat)
        counted.add(id(values))
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in counted:
            continue
        if name in head_names:
            yield name, "head", param.numel()
        elif canonical_name(name) in pretrained_names:
            yield canonical_name(name), "encoder", param.numel()
        else:
            yield name, "new", param.numel()


def effective_selection(model: nn.Module, pretrained_names: set[str],
                        head_names: set[str]) -> Selection:
    """What was actually trainable in the pre-trained tensors, read from the model after
    training (the mask a report compares): tensors that trained whole, and for a
    parametrisation its `changed_indices()` (a sparse delta's k entries, DiffPruning's projected
    mask). New parameters (LoRA, adapters) select no pre-trained entries. Measured with the same
    walk as `count_trainable`, so the mask's size is the encoder count."""
    from peftbench.modeling.peftsparse import sparse_layers

    selection = Selection()
    for name, module in model.named_modules():
        if hasattr(module, "entries_changed"):  # the protocol: entries_changed + changed_indices
            tensor = canonical_name(name.rsplit(".", 1)[0])
            changed = module.changed_indices().detach().cpu().to(torch.long)
            if len(changed):  # a dynamic mask's tensor holds no entry at the end: not in the mask
                selection.partial[tensor] = changed
    for name, values, flat in sparse_layers(model):
        if values.requires_grad:
            selection.partial[canonical_name(f"{name}.weight")] = flat.detach().cpu().sort().values
    for name, kind, count in trainable_entries(model, pretrained_names, head_names):
        if kind == "encoder" and name not in selection.partial and count:
            selection.full.add(name)
    return selection


def count_trainable(model: nn.Module, pretrained_names: set[str], head_names: set[str]) -> dict:
    """Count trainable parameters the same way for every method.

    - `encoder`: pre-trained entries that may differ from their pre-trained values: whole
      tensors trained, plus what each parametrisation module declares with `entries_changed()`
      (a sparse delta's k entries, DiffPruning's projected mask); such a module's own
      parameters are not counted again;
    - `new`: parameters that did not exist in the pre-trained model and are not the task head
      (LoRA matrices, adapters, ...);
    - `head`: the task head, trained by every method, reported on its own;
    - `trainable` = encoder + new: the figure a budget is compared with. `total` adds the head.

    `pretrained_names` / `head_names` are the parameter names before the method changed the model.
    """
    totals = {"encoder": 0, "new": 0, "head": 0}
    for _, kind, count in trainable_entries(model, pretrained_names, head_names):
        totals[kind] += count
    return {**totals, "trainable": totals["encoder"] + totals["new"],
            "total": totals["encoder"] + totals["new"] + totals["head"]}

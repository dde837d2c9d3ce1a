"""`peftbench bench`: selection cost and training-step cost, printed as JSON.

Figures are ratios against a baseline measured in the same run (full fine-tuning for steps),
never absolute thresholds: machines differ.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def selection_cost(seed: int = 0) -> dict:
    """GGM (SVD + BCD) and AdaPEFT (knapsack front) on a roberta-base-sized layout with random
    weights; global top-k at p = 0.005 over all entries as a reference point."""
    import importlib

    from transformers import RobertaConfig, RobertaForSequenceClassification

    from peftbench.contract import registry
    from peftbench.contract.selector import top_k
    from peftbench.modeling.models import pretrained_parameters

    # the methods' own solvers, reached through the registry (whatever is registered under the
    # name is what is timed), never by importing a method module directly
    ggm = importlib.import_module(registry.get("ggm").__module__)
    adapeft = importlib.import_module(registry.get("adapeft").__module__)
    enumerate_nodes, solve_ggm = ggm.enumerate_nodes, ggm.solve_ggm
    families, pareto_front = adapeft.families, adapeft.pareto_front

    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(RobertaConfig())
    params = pretrained_parameters(model)
    n_entries = sum(p.numel() for p in params.values())
    (nodes, _), svd_s = _timed(lambda: enumerate_nodes(model, 10))
    bias_nodes = [n for n in nodes if n[1] is None]
    # the authors' setting: 434 nodes (with the two head biases), ~78 samples (RTE, batch 32)
    rng = np.random.default_rng(seed)
    x = np.log(rng.gamma(0.5, size=(78, len(nodes))))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = np.cov(x, rowvar=False)
    important = list(np.argsort(-x.mean(0))[:30])
    (_, _, history), bcd_s = _timed(lambda: solve_ggm(s, important, lam=1000.0, tau=20.0, kind="lp", max_iter=100))
    out = {"layout": "roberta-base", "entries": n_entries, "tensors": len(params),
           "ggm": {"nodes": len(nodes), "bias_nodes": len(bias_nodes), "svd_s": svd_s,
                   "bcd_s": bcd_s, "bcd_iterations": len(history) - 1}}
    cands = families(model, registry.get("adapeft")().ranks)  # the method's own menu: LoRA ranks per kind, BitFit, LayerNorm
    values = list(rng.lognormal(0, 2, size=len(cands)))
    (front, exact), seconds = _timed(lambda: pareto_front(values, [f.cost for f in cands], [f.klass for f in cands]))
    out["adapeft"] = {"families": len(cands), "front_points": len(front), "exact": exact, "seconds": seconds}
    scores = {n: p.detach().abs() for n, p in params.items()}
    _, topk_s = _timed(lambda: top_k(scores, math.floor(0.005 * n_entries), "global", torch.Generator()))
    out["global_top_k_p0.005_s"] = topk_s
    return out


#: The variants `bench step` times: label -> (method, params, engine). `floor` is not a method:
#: the encoder is frozen but the input gradient still flows through it (forward + input-gradient
#: backward, no weight gradient), the least any subset method can cost per step. The race (issue
#: "selections out to peft"): `sparse-*-linear` and `shira-*-linear` train the very same mask
#: (Random at 0.5%, per tensor or global, kept to nn.Linear weights, the entries peft's SHiRA can
#: take), the first through peftbench's sparse step, the second through peft's SHiRA layers.
STEP_VARIANTS = {
    "floor": (None, {}, "peftbench"),
    "fulltuning": ("fulltuning", {}, "peftbench"),
    "random-tensor": ("random", {"scope": "tensor"}, "peftbench"),
    "random-global": ("random", {"scope": "global"}, "peftbench"),
    "magnitude-global": ("magpruning", {"scope": "global"}, "peftbench"),  # concentrated, like SAM's masks
    "bitfit": ("bitfit", {}, "peftbench"),
    "lora": ("lora", {"r": 16}, "peftbench"),
    "sparse-tensor-linear": ("random", {"scope": "tensor"}, "peftbench-linear"),
    "shira-tensor-linear": ("random", {"scope": "tensor"}, "peft-shira"),
    "sparse-global-linear": ("random", {"scope": "global"}, "peftbench-linear"),
    "shira-global-linear": ("random", {"scope": "global"}, "peft-shira"),
}
BF16 = "+bf16"  # a variant's name + this: the same step under CPU/CUDA autocast to bfloat16 (opt-in)


def known_variant(variant: str) -> bool:
    return variant.removesuffix(BF16) in STEP_VARIANTS


def prepare_step(variant: str, model_id: str = "default", budget: float = 0.005,
                 batch_size: int = 16, length: int = 128, device: str = "cpu"):
    """(one_step, model) for a variant of `STEP_VARIANTS` on random tokens; `one_step()` does
    forward, loss, backward, AdamW step and zero_grad as the trainer does."""
    from peftbench.contract import registry
    from peftbench.modeling.models import load_model, pretrained_parameters
    from peftbench.training import export

    autocast = variant.endswith(BF16)  # forward and loss in bfloat16 where the hardware has it
    method, params, engine = STEP_VARIANTS[variant.removesuffix(BF16)]
    device = torch.device(device)
    model, tokenizer = load_model(model_id, 2)
    if method is None:  # the floor
        for p in pretrained_parameters(model).values():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
    else:
        numel = sum(p.numel() for p in pretrained_parameters(model).values())
        selector = registry.create(method, **params)
        selection = selector.select(model, selector.score(model, None), math.floor(budget * numel),
                                    torch.Generator().manual_seed(0))
        if engine != "peftbench":
            selection = export.linear_part(model, selection)
        if engine == "peft-shira":
            model, _ = export.shira_model(model, selection)
        else:
            model = selector.apply(model, selection)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, length), generator=generator).to(device)
    labels = torch.randint(0, 2, (batch_size,), generator=generator).to(device)

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one_step.optimizer = optimizer
    return one_step, model


def _time_variant(variant: str, model_id: str, steps: int, device: str, batch_size: int,
                  length: int) -> dict:
    """One variant in this process: a warm-up step, then `steps` timed steps. Memory: the peak
    of the steps (the model and whatever the process still holds included), and the steps' own
    growth over the memory held before them (the allocator asked to return free pages first),
    which leaves out what selection left behind."""
    import gc

    from peftbench.training import memory

    one_step, model = prepare_step(variant, model_id, batch_size=batch_size, length=length,
                                   device=device)
    gc.collect()
    since_reset = memory.reset_peak(device)  # returns free heap pages first
    before = memory.current_bytes(device)
    one_step()
    times = [_timed(one_step)[1] for _ in range(steps)]
    optimizer = one_step.optimizer
    peak = memory.peak(device, since_reset)["bytes"]
    return {"step_s": times, "peak_memory_bytes": peak, "memory_before_steps_bytes": before,
            "step_memory_growth_bytes": peak - before,
            "optimizer_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                         for t in state.values() if torch.is_tensor(t))}


def step_cost(model_id: str = "default", variants=tuple(STEP_VARIANTS), steps: int = 4,
              rounds: int = 2, device: str = "cpu", batch_size: int = 16, length: int = 128,
              progress=None) -> dict:
    """Seconds per training step and peak memory per variant, each variant in a fresh Python
    process (no allocator or cache state carried over), rounds interleaved (every variant once
    per round) so a machine's drift hits all alike. Reports each variant's median over its
    steps per round, the best (min) and median of those over rounds, and ratios of the best to
    the floor and to full fine-tuning measured in the same run."""
    import json
    import subprocess
    import sys

    per_round = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants:
            code = ("import json, sys; from peftbench.bench.step import _time_variant; "
                    f"print(json.dumps(_time_variant({variant!r}, {model_id!r}, {steps}, {device!r}, "
                    f"{batch_size}, {length})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"bench step {variant}: {done.stderr.strip().splitlines()[-1:]}")
            per_round[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            if progress:
                progress(f"round {r + 1}/{rounds} {variant}: "
                         f"{np.median(per_round[variant][-1]['step_s']):.3f} s/step")
    results = {}
    for variant, runs in per_round.items():
        medians = [float(np.median(run["step_s"])) for run in runs]
        results[variant] = {"step_s_min": min(medians), "step_s_median": float(np.median(medians)),
                            "step_s_rounds": medians,
                            "peak_memory_bytes": max(run["peak_memory_bytes"] for run in runs),
                            "step_memory_growth_bytes": max(run["step_memory_growth_bytes"] for run in runs),
                            "optimizer_params": runs[0]["optimizer_params"],
                            "optimizer_state_bytes": runs[0]["optimizer_state_bytes"]}
    for base in ("floor", "fulltuning"):
        if base in results:
            for r in results.values():
                r[f"step_vs_{base}"] = r["step_s_min"] / results[base]["step_s_min"]
                r[f"memory_vs_{base}"] = r["peak_memory_bytes"] / results[base]["peak_memory_bytes"]
                r[f"growth_vs_{base}"] = (r["step_memory_growth_bytes"]
                                          / results[base]["step_memory_growth_bytes"])
    return {"model": model_id, "batch": [batch_size, length], "budget": 0.005, "device": device,
            "steps_per_round": steps, "rounds": rounds, "threads": torch.get_num_threads(),
            "variants": results}

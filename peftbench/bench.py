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
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from peftbench.methods.adapeft import group_key, pareto_front
    from peftbench.methods.ggm import enumerate_nodes, solve_ggm
    from peftbench.models import pretrained_parameters
    from peftbench.selector import top_k

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
    out["adapeft"] = {}
    for grouping in ("module", "layer_module", "tensor"):
        sizes = {}
        for name, p in params.items():
            key = group_key(name, grouping)
            sizes[key] = sizes.get(key, 0) + p.numel()
        values = list(rng.lognormal(0, 2, size=len(sizes)))
        (front, exact), seconds = _timed(lambda: pareto_front(values, list(sizes.values())))
        out["adapeft"][grouping] = {"groups": len(sizes), "front_points": len(front),
                                    "exact": exact, "seconds": seconds}
    scores = {n: p.detach().abs() for n, p in params.items()}
    _, topk_s = _timed(lambda: top_k(scores, math.floor(0.005 * n_entries), "global", torch.Generator()))
    out["global_top_k_p0.005_s"] = topk_s
    return out


def step_cost(model_id: str = "default", methods=("fulltuning", "random", "bitfit", "lora"),
              steps: int = 4, batch_size: int = 16, length: int = 128) -> dict:
    """Seconds per training step (median after one warm-up step) and optimizer-state bytes
    per method, with ratios to full fine-tuning measured in the same run."""
    from peftbench import registry
    from peftbench.models import load_model, pretrained_parameters

    results = {}
    for method in methods:
        model, tokenizer = load_model(model_id, 2)
        numel = sum(p.numel() for p in pretrained_parameters(model).values())
        selector = registry.create(method)
        selection = selector.select(model, selector.score(model, None), math.floor(0.005 * numel),
                                    torch.Generator().manual_seed(0))
        model = selector.apply(model, selection)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, 2, (batch_size,))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t))
        results[method] = {"step_s": float(np.median(times[1:])), "optimizer_state_bytes": state_bytes,
                           "trainable_tensors_numel": sum(p.numel() for p in params)}
    base = results.get("fulltuning")
    if base:
        for r in results.values():
            r["step_ratio_vs_full"] = r["step_s"] / base["step_s"]
            r["optimizer_state_ratio_vs_full"] = r["optimizer_state_bytes"] / base["optimizer_state_bytes"]
    return {"model": model_id, "batch": [batch_size, length], "device": "cpu", "methods": results}

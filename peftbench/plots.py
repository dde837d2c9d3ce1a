"""Plots: accuracy vs trainable parameters (Pareto), and where each method spends its budget.

PNGs come from matplotlib (no browser needed); the interactive version is plotly HTML
(`write_html` needs no Kaleido/Chrome, unlike plotly's PNG export).
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd


def pareto_points(points: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated rows: no other row has fewer-or-equal trainable and a higher-or-equal mean
    with one of them strict. Sorted by trainable."""
    keep = []
    for i, p in points.iterrows():
        dominated = ((points.trainable <= p.trainable) & (points["mean"] >= p["mean"]) &
                     ((points.trainable < p.trainable) | (points["mean"] > p["mean"]))).any()
        if not dominated:
            keep.append(i)
    return points.loc[keep].sort_values("trainable")


def _cells(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    g = frame[frame.task == task].groupby(["method", "budget"])
    return pd.DataFrame({"mean": g.metric.mean(), "std": g.metric.std(ddof=0),
                         "trainable": g.trainable.mean(), "seeds": g.metric.size()}).reset_index()


def _constant(frame: pd.DataFrame, task: str) -> float | None:
    """The task's constant-predictor test score, if the runs recorded it."""
    if "constant_metric" not in frame:
        return None
    values = frame.loc[frame.task == task, "constant_metric"].dropna()
    return float(values.iloc[0]) if len(values) else None


def pareto_png(frame: pd.DataFrame, path: str | Path, metric_name: str = "test metric") -> Path:
    """One panel per task: x = trainable parameters (log), y = metric mean with std error bars
    over seeds, one line per method across budgets, the Pareto front drawn in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(frame.task.unique())
    methods = sorted(frame.method.unique())
    colours = dict(zip(methods, plt.cm.tab20(np.linspace(0, 1, max(len(methods), 2)))))
    markers = dict(zip(methods, itertools.cycle("o s ^ D v P X * < > h p d 8 H".split())))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = _cells(frame, task)
        for method in methods:
            c = cells[cells.method == method].sort_values("trainable")
            if c.empty:
                continue
            ax.errorbar(c.trainable, 100 * c["mean"], yerr=100 * c["std"], label=method,
                        color=colours[method], marker=markers[method], capsize=3, lw=1.2, ms=5)
        baseline = _constant(frame, task)
        if baseline is not None:
            ax.axhline(100 * baseline, color="grey", ls=":", lw=1.2, label="constant predictor")
        front = pareto_points(cells)
        ax.step(front.trainable, 100 * front["mean"], where="post", color="black", lw=1, ls="--",
                zorder=0, label="Pareto front")
        ax.scatter(front.trainable, 100 * front["mean"], s=140, facecolors="none",
                   edgecolors="black", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale; head excluded)")
        ax.set_ylabel(f"{metric_name} x100 (mean ± std over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def pareto_html(frame: pd.DataFrame, path: str | Path) -> Path:
    """The same plot, interactive (hover shows method, budget, seeds, counts)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = sorted(frame.task.unique())
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks)
    for col, task in enumerate(tasks, start=1):
        cells = _cells(frame, task)
        for method in sorted(cells.method.unique()):
            c = cells[cells.method == method].sort_values("trainable")
            fig.add_trace(go.Scatter(
                x=c.trainable, y=100 * c["mean"], error_y={"type": "data", "array": 100 * c["std"]},
                mode="lines+markers", name=method, legendgroup=method, showlegend=col == 1,
                customdata=np.stack([c.budget, c.seeds], axis=1),
                hovertemplate=f"{method}<br>budget %{{customdata[0]}}<br>trainable %{{x:,}}"
                              "<br>metric %{y:.2f}<br>seeds %{customdata[1]}<extra></extra>"), row=1, col=col)
        baseline = _constant(frame, task)
        if baseline is not None:
            fig.add_trace(go.Scatter(
                x=[cells.trainable.min(), cells.trainable.max()], y=[100 * baseline] * 2, mode="lines",
                line={"dash": "dot", "color": "grey"}, name="constant predictor",
                legendgroup="constant", showlegend=col == 1,
                hovertemplate=f"constant predictor {100 * baseline:.2f}<extra></extra>"), row=1, col=col)
        front = pareto_points(cells)
        fig.add_trace(go.Scatter(x=front.trainable, y=100 * front["mean"], mode="lines",
                                 line={"dash": "dash", "color": "black", "shape": "hv"},
                                 name="Pareto front", legendgroup="front", showlegend=col == 1),
                      row=1, col=col)
        fig.update_xaxes(type="log", title_text="trainable parameters", row=1, col=col)
        fig.update_yaxes(title_text="test metric x100", row=1, col=col)
    path = Path(path)
    fig.write_html(path, include_plotlyjs="cdn")  # 10 kB instead of 4.7 MB; the PNG is offline
    return path


TYPES = [("query", "query"), ("key", "key"), ("value", "value"),
         ("attention.output.LayerNorm", "attn LayerNorm"), ("attention.output", "attn out"),
         ("intermediate", "FFN in"), ("output.LayerNorm", "FFN LayerNorm"), ("output", "FFN out"),
         ("embeddings", "embeddings"), ("pooler", "pooler")]


def group(name: str) -> str:
    """'layer 3|attention.self.query', 'embeddings|embeddings', ...: a tensor's place, for spend_png."""
    parts = name.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        kind = ".".join(p for p in parts[i + 2:] if p not in ("weight", "bias", "parametrizations",
                                                              "original", "base_layer"))
        return f"layer {parts[i + 1]}|{kind.split('.lora')[0].split('.0')[0] or 'other'}"
    for part in ("embeddings", "pooler"):
        if part in parts:
            return f"{part}|{part}"
    return "other|other"


def _kind(label: str) -> str:
    for needle, name in TYPES:
        if needle in label:
            return name
    return "other"


def spend_png(frame: pd.DataFrame, path: str | Path, budget: str | None = None) -> Path:
    """Two heat maps, one row per method: the share of its trainable parameters in each layer,
    and in each module type (from the `spend` column, mean over seeds and tasks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if budget is not None:
        frame = frame[(frame.budget == budget) | (frame.budget == "natural")]
    by_layer, by_kind = {}, {}
    for method, g in frame.groupby("method"):
        layer_total, kind_total = {}, {}
        for spend in g.spend:
            total = sum(spend.values()) or 1
            for name, count in spend.items():
                where, _, what = group(name).partition("|")
                layer_total[where] = layer_total.get(where, 0) + count / total / len(g)
                kind = where if where in ("embeddings", "pooler") else _kind(what)
                kind_total[kind] = kind_total.get(kind, 0) + count / total / len(g)
        by_layer[method], by_kind[method] = layer_total, kind_total
    layers = pd.DataFrame(by_layer).T.fillna(0)
    order = sorted(layers.columns, key=lambda c: (c != "embeddings", c in ("pooler", "other"),
                                                  c == "other", int(re.sub(r"\D", "", c) or 0)))
    layers = layers[order]
    kinds = pd.DataFrame(by_kind).T.fillna(0)
    kinds = kinds[[n for _, n in TYPES if n in kinds.columns] + [c for c in kinds.columns
                                                                 if c not in dict(TYPES).values()]]
    fig, axes = plt.subplots(1, 2, figsize=(16, 0.45 * len(layers) + 2.5))
    for ax, table, title in ((axes[0], layers, "share per layer"), (axes[1], kinds, "share per module type")):
        image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(table.columns)), table.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(table.index)), table.index)
        ax.set_title(f"Where the budget goes: {title}" + (f" (budget {budget})" if budget else ""))
        for (i, j), v in np.ndenumerate(table.to_numpy()):
            if v >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=axes, fraction=0.02)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

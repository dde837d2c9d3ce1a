"""Plots: accuracy vs trainable parameters (Pareto), and where each method spends its budget.

PNGs come from matplotlib (no browser needed); the interactive version is plotly HTML
(`write_html` needs no Kaleido/Chrome, unlike plotly's PNG export).
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

from peftbench.rendering.styles import (
    constant_score,
    dodge,
    legend_beside,
    method_style,
    metric_axis,
    pareto_points,
    save,
    styles,
    subtitle,
    task_cells,
    y_span,
)
from peftbench.training.record import NATURAL, at_budget


def curves_png(frame: pd.DataFrame, path: str | Path) -> Path:
    """Budget curves, one panel per task: test metric (mean over seeds and its 95% bootstrap
    interval as a band) against trainable entries (log x) for every budget-parameterised
    method; natural-count methods as points with their interval; full fine-tuning and the
    constant predictor as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftbench.analysis.statistics import cell_stats

    stats = cell_stats(frame)
    tasks = sorted(stats.task.unique())
    methods = sorted(stats.method.unique())
    style = styles(methods)
    fig, axes = plt.subplots(1, len(tasks), figsize=(8 * len(tasks), 6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = stats[stats.task == task]
        for method in methods:
            c = cells[cells.method == method].sort_values("trainable")
            if c.empty:
                continue
            colour, marker, line = style[method]
            if method == "fulltuning":
                ax.axhline(100 * c["mean"].iloc[0], color=colour, lw=1.5, label="full fine-tuning")
                ax.axhspan(100 * c.ci_low.iloc[0], 100 * c.ci_high.iloc[0], color=colour, alpha=0.12)
                continue
            if (c.budget == NATURAL).all():
                ax.errorbar(c.trainable, 100 * c["mean"], fmt=marker, color=colour, ms=7,
                            mec="black", mew=0.4, capsize=3, label=f"{method} (its count)",
                            yerr=[100 * (c["mean"] - c.ci_low), 100 * (c.ci_high - c["mean"])])
                continue
            ax.plot(c.trainable, 100 * c["mean"], color=colour, marker=marker, ms=6, mec="black",
                    mew=0.4, lw=1.3, ls=line, label=method)
            ax.fill_between(c.trainable, 100 * c.ci_low, 100 * c.ci_high, color=colour, alpha=0.15)
        baseline = constant_score(frame, task)
        low, high = y_span(cells, baseline)
        if baseline is not None and low <= baseline:
            ax.axhline(100 * baseline, color="grey", ls=":", lw=1.2, label="constant predictor")
        elif baseline is not None:  # far below every method: say it rather than squash the curves
            ax.annotate(f"constant predictor: {100 * baseline:.1f} (below the axis)",
                        xy=(0.99, 0.01), xycoords="axes fraction", ha="right", va="bottom",
                        fontsize=8, color="dimgrey")
        ax.set_ylim(100 * low, 100 * high)
        ax.set_xscale("log")
        ax.set_xlabel("trainable entries (log scale; head excluded)")
        ax.set_ylabel(metric_axis(frame, task).replace("mean ± std over seeds",
                                                       "mean, 95% interval over seeds"))
        ax.set_title(f"{task.upper()}: {subtitle(frame[frame.task == task])}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    legend_beside(axes[0])
    fig.tight_layout()
    path = Path(path)
    save(fig, path, dpi=160)
    plt.close(fig)
    return path


def pareto_png(frame: pd.DataFrame, path: str | Path) -> list[Path]:
    """One panel per task: x = trainable parameters (log), y = the task's metric (named on the
    axis) with std error bars over seeds, one line per method across budgets, the Pareto
    front circled and dashed, the constant predictor dotted, each budget level a vertical
    line (p x encoder entries). Methods with equal counts are dodged sideways by a few percent
    so none hides another. Written as PNG (200 dpi), PDF and SVG; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftbench.contract.selector import Budget

    tasks = sorted(frame.task.unique())
    methods = sorted(frame.method.unique())
    style = styles(methods)
    fig, axes = plt.subplots(1, len(tasks), figsize=(8 * len(tasks), 6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        cells = task_cells(frame, task)
        entries = frame.loc[frame.task == task, "pretrained_entries"].iloc[0]
        for budget in sorted({b for b in cells.budget if b != NATURAL}, key=float):
            x = Budget.parse(budget).entries(int(entries))
            ax.axvline(x, color="0.8", lw=0.8, ls="-", zorder=0)
            ax.annotate(f"budget {100 * float(budget):g}%", (x, 1), xycoords=("data", "axes fraction"),
                        xytext=(2, -10), textcoords="offset points", fontsize=7, color="0.4")
        shift = dodge(methods)
        for method in methods:
            c = cells[cells.method == method].sort_values("trainable")
            if c.empty:
                continue
            colour, marker, line = style[method]
            ax.errorbar(c.trainable * shift[method], 100 * c["mean"], yerr=100 * c["std"], label=method,
                        color=colour, marker=marker, capsize=3, lw=1.2, ms=6, mec="black", mew=0.4,
                        ls=line)
        baseline = constant_score(frame, task)
        if baseline is not None:
            ax.axhline(100 * baseline, color="grey", ls=":", lw=1.2, label="constant predictor")
        front = pareto_points(cells)
        ax.step(front.trainable, 100 * front["mean"], where="post", color="black", lw=1, ls="--",
                zorder=0, label="Pareto front")
        ax.scatter(front.trainable * front.method.map(shift), 100 * front["mean"], s=160,
                   facecolors="none", edgecolors="black", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale; head excluded; equal counts dodged x0.87-x1.15)")
        ax.set_ylabel(metric_axis(frame, task))
        ax.set_title(f"{task.upper()}: {subtitle(frame[frame.task == task])}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    legend_beside(axes[0])
    fig.tight_layout()
    path = Path(path)
    paths = [path, path.with_suffix(".pdf"), path.with_suffix(".svg")]
    for target in paths:
        save(fig, target, dpi=200)
    plt.close(fig)
    return paths


def cd_png(ranking: dict, path: str | Path) -> Path:
    """Critical-difference diagram (Demsar 2006) of one budget from `analysis.ranks.friedman_by_budget`
    (drawn only with enough tasks for its pairwise tests): mean ranks over tasks on the axis,
    methods that the Holm-adjusted pairwise Wilcoxon tests over tasks cannot tell apart (alpha
    0.05) joined by a bar, a dot on the bar at each of them. A bar says "not separated by these
    N tasks", not "equal": its length reflects N, not the size of an effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scikit_posthocs
    from scikit_posthocs import _plotting  # its clique finder, ordered below

    ranks = ranking["ranks"]
    found = _plotting._find_maximal_cliques

    def cliques(adjacency):
        # scikit-posthocs returns sets and stacks bars in that order, which follows Python's
        # per-process string hashing: the same cells drew another cd.png. Each bar as a list
        # in rank order, bars ordered by (lowest, highest rank, names): one file, always.
        bars = [sorted(c, key=lambda m: (ranks[m], m)) for c in found(adjacency)]
        return sorted(bars, key=lambda b: (ranks[b[0]], ranks[b[-1]], b))

    fig, ax = plt.subplots(figsize=(9, 0.28 * len(ranks) + 1.6))
    with mock.patch.object(_plotting, "_find_maximal_cliques", cliques):
        scikit_posthocs.critical_difference_diagram(
            ranks, ranking["pairwise"], ax=ax,
            color_palette={m: method_style(m)[0] for m in ranks.keys()},
            crossbar_props={"marker": "o", "markersize": 3})  # a dot per member: bars of one span differ
    ax.set_title(f"Budget {ranking['budget']}: mean rank over {ranking['n_tasks']} tasks, 1 = best; "
                 f"Iman-Davenport p = {ranking['p_iman_davenport']:.2g}; bars: Wilcoxon-Holm p >= 0.05 "
                 f"over the {ranking['n_tasks']} tasks", fontsize=9)
    path = Path(path)
    save(fig, path, dpi=160)
    plt.close(fig)
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
        frame = at_budget(frame, budget)
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
        ax.set_title(title)
        for (i, j), v in np.ndenumerate(table.to_numpy()):
            if v >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=axes, fraction=0.02)
    fig.suptitle("Where the budget goes" + (f" (budget {budget}; natural-count methods at their "
                                            "own count)" if budget else ""))
    path = Path(path)
    save(fig, path, dpi=110)
    plt.close(fig)
    return path


def retention_png(frame: pd.DataFrame, path: str | Path) -> Path | None:
    """Accuracy against what a run kept: per task, each (method, budget) cell's mean test
    metric against its mean retention change on the forgetting probe (x100, 0 = the pre-trained
    model's), with the seed std as error bars; None when no run measured retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftbench.analysis.checks import forgetting_table

    kept = forgetting_table(frame)
    if kept.empty:
        return None
    scores = frame.groupby(["task", "method", "budget"]).metric.agg(["mean", "std"]).reset_index()
    cells = kept.merge(scores, on=["task", "method", "budget"])
    tasks = sorted(cells.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    style = styles(sorted(cells.method.unique()))
    for ax, task in zip(axes[0], tasks):
        for method, g in cells[cells.task == task].groupby("method"):
            color, marker, _ = style[method]
            ax.errorbar(g.change, 100 * g["mean"], xerr=g.change_std, yerr=100 * g["std"].fillna(0),
                        fmt=marker, color=color, label=method, capsize=2, alpha=0.85)
            for row in g.itertuples():
                ax.annotate(str(row.budget), (row.change, 100 * row.mean), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.set_title(task)
        kinds = set(cells[cells.task == task].statistic)
        ax.set_xlabel("held-out next-token loss change (nats; 0 = pre-trained)" if kinds == {"next_token_loss"}
                      else "retention change on the probe (x100; 0 = pre-trained)")
        ax.set_ylabel("test metric (x100)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("Accuracy against what each cell kept (mean and std over seeds; labels: budget)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

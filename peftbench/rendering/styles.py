"""One look per method (colour, marker, line) in every figure, and the axes helpers the figures share."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from peftbench.training.record import NATURAL


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


def save(fig, path: Path, dpi: int) -> None:
    """savefig with no creation date or random ids in PDF/SVG, so a board rewritten from the
    same cells is the same file (a fresh clone's `leaderboard run` leaves git clean)."""
    import matplotlib

    suffix = Path(path).suffix.lower()
    metadata = {".pdf": {"CreationDate": None, "ModDate": None}, ".svg": {"Date": None}}.get(suffix)
    with matplotlib.rc_context({"svg.hashsalt": "peftbench"}):
        fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata=metadata)


def task_cells(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    g = frame[frame.task == task].groupby(["method", "budget"])
    return pd.DataFrame({"mean": g.metric.mean(), "std": g.metric.std(ddof=0),
                         "trainable": g.trainable.mean(), "seeds": g.metric.size(),
                         "scoring_time_s": g.scoring_time_s.mean(),
                         "train_time_s": g.train_time_s.mean(),
                         "peak_memory_mb": g.peak_memory_mb.max() if "peak_memory_mb" in frame else np.nan,
                         }).reset_index()


def constant_score(frame: pd.DataFrame, task: str) -> float | None:
    """The task's constant-predictor test score, if the runs recorded it."""
    if "constant_metric" not in frame:
        return None
    values = frame.loc[frame.task == task, "constant_metric"].dropna()
    return float(values.iloc[0]) if len(values) else None


# One look per method in every figure: Okabe & Ito's colour-blind-safe palette, and a marker
# and a line style so that methods sharing a colour (17 methods, 8 colours) still differ, and
# the figures read in grey. Fixed by name, so a method looks the same on every page; a plugin
# gets a look derived from its name (stable across runs and boards).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]


GREY = "#999999"


MARKERS = "o s ^ D v P X * < > h p d 8 H".split()


LINES = ["-", "--", ":"]


METHOD_STYLE: dict[str, tuple[str, str, str]] = {  # method: (colour, marker, line style)
    "fulltuning": ("#000000", "o", "-"),
    "random": (GREY, "X", "--"),
    "magpruning": ("#E69F00", "s", "-"),
    "sam": ("#D55E00", "^", "-"),
    "fish": ("#CC79A7", "D", "-"),
    "childtuning-d": ("#009E73", "v", "-"),
    "childtuning-f": ("#009E73", "<", "--"),
    "mixout": ("#56B4E9", ">", "-"),
    "diffpruning": ("#0072B2", "p", "-"),
    "bitfit": ("#F0E442", "P", "-"),
    "lora": ("#0072B2", "*", "--"),
    "adapter": ("#56B4E9", "h", "--"),
    "adapeft": ("#E69F00", "d", "--"),
    "spectral": ("#CC79A7", "8", "--"),
    "ggm": ("#D55E00", "H", "--"),
    "shira": ("#F0E442", "<", "--"),
    "supertuning": ("#000000", "s", "--"),
    "snip": ("#0072B2", "o", "-"),
    "synflow": ("#E69F00", "^", "-"),
    "grasp": ("#009E73", "D", "-"),
    "skeletonization": ("#D55E00", "o", ":"),
    "peft": ("#56B4E9", "o", ":"),
    "peft-sized": ("#CC79A7", "s", ":"),
}


DODGE = 0.12  # log10 units over which methods at the same x are spread (x 0.87 .. x 1.15)


def method_style(method: str) -> tuple[str, str, str]:
    """(colour, marker, line style) of `method`: the fixed table, or one derived from the name."""
    if method in METHOD_STYLE:
        return METHOD_STYLE[method]
    h = int(hashlib.sha256(method.encode()).hexdigest(), 16)
    return PALETTE[h % len(PALETTE)], MARKERS[(h // 8) % len(MARKERS)], LINES[2]  # dotted: a plugin


def styles(methods: list[str]) -> dict[str, tuple[str, str, str]]:
    """`method_style` of each method."""
    return {m: method_style(m) for m in methods}


def dodge(methods: list[str]) -> dict[str, float]:
    """A multiplicative x offset per method, spread evenly over `DODGE` decades."""
    n = len(methods)
    return {m: 10 ** (DODGE * (i / (n - 1) - 0.5)) if n > 1 else 1.0 for i, m in enumerate(methods)}


def subtitle(frame: pd.DataFrame) -> str:
    names = sorted({str(m) for m in frame.get("model", pd.Series(dtype=str)) if m})
    model = ", ".join("all-MiniLM-L6-v2 (default)" if m == "default" else m for m in names) or "model ?"
    seeds = frame.groupby(["task", "method", "budget"]).seed.nunique()
    budgets = sorted({b for b in frame.budget if b != NATURAL}, key=float)
    shown = (f"budget{'s' if len(budgets) > 1 else ''} {', '.join(f'{100 * float(b):g}%' for b in budgets)}"
             if budgets else "natural counts only")
    return (f"{model}; {seeds.min()}{'-' + str(seeds.max()) if seeds.max() != seeds.min() else ''} "
            f"seeds; {shown}")


def metric_axis(frame: pd.DataFrame, task: str) -> str:
    """'CB: (accuracy + macro-F1)/2 x 100 (test, mean ± std over seeds)'."""
    from peftbench.data.metrics import metric_label

    names = frame.loc[frame.task == task, "metric_name"].dropna().unique() if "metric_name" in frame else []
    label = metric_label(names[0]) if len(names) and names[0] else "test metric"
    return f"{task.upper()}: {label} x 100 (test, mean ± std over seeds)"


def y_span(cells: pd.DataFrame, baseline: float | None) -> tuple[float, float]:
    """The budget-curve panel's y range: every method's interval with a margin, reaching down to
    the constant predictor only when it lies within half that span below (STS-B's constant
    Pearson is 0, which would squash curves that all sit between 0.6 and 0.8 into a line)."""
    low = float(cells.ci_low.fillna(cells["mean"]).min())  # one seed: no interval, its mean
    high = float(cells.ci_high.fillna(cells["mean"]).max())
    margin = max(high - low, 0.01) * 0.08
    if baseline is not None and low - baseline <= 0.5 * (high - low):
        low = min(low, baseline)
    return low - margin, high + margin


def legend_beside(axes) -> None:
    """One legend right of the last panel naming everything drawn in any panel, each label
    once: a method that ran on one task only (a partial board, a plugin tried on one task) is
    named too, not just the last panel's lines."""
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes[-1].legend(list(handles.values()), list(handles), fontsize=8, loc="center left",
                    bbox_to_anchor=(1.01, 0.5))

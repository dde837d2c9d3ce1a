"""Every figure a report's runs support, drawn beside it, each as a section: the Pareto front
(static and interactive), a critical-difference diagram per budget where the tests allow one,
the budget curves, where each method spends its budget, and accuracy against retention. One
function for `peftbench report --html` and every board."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from peftbench.analysis.ranks import friedman_by_budget
from peftbench.analysis.statistics import budget_curves
from peftbench.rendering import interactive, plots
from peftbench.rendering.sections import Section

CD_NOTE = ("Mean ranks over tasks; a bar joins the methods dotted on it, which no Holm-adjusted "
           "Wilcoxon test over the tasks separates: not separated, not equal.")
CURVES_NOTE = (
    "Test metric against trainable entries (log), mean and 95% interval per method. Reaches = the "
    "smallest budget whose mean reaches 95% of full fine-tuning on the chance-normalised scale "
    "(constant predictor 0, full FT 1; target_x100 is that score); earliest / surely = the smallest "
    "budget whose 95% interval (seeds + test set) reaches it / lies wholly above it. '<= 0.1%': "
    "already at the smallest budget tried (censored); '> 2%': not within the budgets tried. Only "
    "cells that keep to their budget count (curves.csv).")


def figure_sections(frame: pd.DataFrame, folder: Path, plotly_js: str | None = None,
                    spend_budget: str | None = None) -> tuple[list[Section], str]:
    """Draw every figure of `frame` into `folder`; return their sections and the path of
    plotly.min.js the page loads (`plotly_js`, relative to the page; written beside it when None).
    A critical-difference diagram the current evidence no longer supports is removed."""
    folder = Path(folder)
    if plotly_js is None:
        interactive.write_plotly_js(folder)
        plotly_js = interactive.PLOTLY_JS
    plots.pareto_png(frame, folder / "pareto.png")
    interactive.pareto_html(frame, folder / "pareto.html", plotly_js=plotly_js)
    sections = [Section(
        "Accuracy vs trainable parameters", figure="pareto.png",
        note="Each cell's mean test metric against its trainable entries; the Pareto front joined "
             "([PDF](pareto.pdf), [SVG](pareto.svg), [interactive](pareto.html)).",
        html=interactive.pareto_figure(frame).to_html(full_html=False, include_plotlyjs=False, div_id="pareto"))]
    for stale in folder.glob("cd*.png"):
        stale.unlink()
    for ranking in friedman_by_budget(frame):
        if ranking["pairwise"] is not None:
            name = f"cd-b{ranking['budget']}.png"
            plots.cd_png(ranking, folder / name)
            sections.append(Section(f"Critical-difference diagram, budget {ranking['budget']}",
                                    note=CD_NOTE, figure=name))
    curves = budget_curves(frame)
    if not curves.empty:  # several budgets: the accuracy-vs-budget question, as curves
        plots.curves_png(frame, folder / "curves.png")
        sections.append(Section("Budget curves: the budget that reaches 95% of full fine-tuning",
                                note=CURVES_NOTE, table=curves, csv="curves.csv", floatfmt=".2f",
                                figure="curves.png"))
    plots.spend_png(frame, folder / "spend.png", budget=spend_budget)
    sections.append(Section("Where each method spends its budget", figure="spend.png",
                            note="The share of each method's trainable parameters in each layer and in "
                                 "each module type, mean over seeds and tasks"
                                 + (f", budget {spend_budget}." if spend_budget else ".")))
    if plots.retention_png(frame, folder / "retention.png") is not None:
        sections.append(Section("Accuracy against retention", figure="retention.png",
                                note="Each cell's mean test metric against its mean retention change on "
                                     "the forgetting probe (forgetting.csv)."))
    return sections, plotly_js

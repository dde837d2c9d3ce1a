"""A report as one list of sections, rendered the same way on the README (Markdown) and the page
(HTML): each section holds its title, its note (how to read it, written once), its table and
the CSV that table is saved as, and its figure. A new statistic adds one section; nothing reads
a CSV back by its name to show it."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Section:
    title: str
    level: int = 2
    note: str = ""  # Markdown: what the section shows and how to read it
    table: pd.DataFrame | None = None  # shown on the README and the page
    index: bool = False  # the table's index is its first column (Table 1's methods)
    floatfmt: str | tuple = ".3g"
    csv: str | None = None  # the file the table (or `data`) is saved as, beside the report
    data: pd.DataFrame | None = None  # what the CSV holds when it differs from the table shown
    after: str = ""  # Markdown after the table (a list, the next paragraph)
    figure: str | None = None  # an image beside the report
    html: str = ""  # what the page shows instead of `figure` (the interactive Pareto figure)

    def write(self, folder: Path) -> None:
        """The section's CSV, when it has one."""
        saved = self.data if self.data is not None else self.table
        if self.csv and saved is not None:
            saved.to_csv(Path(folder) / self.csv, index=self.index)

    def markdown(self) -> str:
        parts = ["#" * self.level + " " + self.title]
        if self.note:
            parts.append(self.note)
        if self.table is not None and not self.table.empty:
            parts.append(_markdown_table(self.table, self.index, self.floatfmt))
        if self.figure:
            parts.append(f"[![{self.title}]({self.figure})]({self.figure})")
        if self.after:
            parts.append(self.after)
        return "\n\n".join(parts) + "\n"

    def page(self) -> str:
        from peftbench.rendering.pages import prose, table_html

        parts = [f"<h{self.level}>{html.escape(self.title)}</h{self.level}>"]
        if self.note:
            parts.append(prose(self.note, css="note"))
        if self.table is not None and not self.table.empty:
            parts.append(table_html(self.table, self.csv or "", self.index, self.floatfmt))
        if self.html:
            parts.append(self.html)
        elif self.figure:
            parts.append(f'<img src="{html.escape(self.figure)}" alt="{html.escape(self.title)}">')
        if self.after:
            parts.append(prose(self.after))
        return "\n".join(parts)


def _markdown_table(table: pd.DataFrame, index: bool, floatfmt) -> str:
    """A table in Markdown, its index as leading columns; a value not there (a setting not
    tried for a row) left blank."""
    table = table.reset_index() if index else table
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=floatfmt, missingval="")


def markdown(sections: list[Section]) -> str:
    return "\n".join(s.markdown() for s in sections)


def write_all(sections: list[Section], folder: Path) -> None:
    for section in sections:
        section.write(folder)

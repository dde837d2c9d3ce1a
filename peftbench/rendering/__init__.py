"""Rendering: the report's sections as Markdown and HTML, figures, and pages."""

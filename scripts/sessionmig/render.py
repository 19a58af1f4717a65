"""Render an executed notebook to a self-contained HTML page with nbconvert."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

from .params import redact

TEMPLATES = Path(__file__).parent / "templates" / "nbconvert"


def notebook_to_html(notebook: Path, html_path: Path) -> Path:
    """Write ``html_path`` from ``notebook``: inputs, outputs and inline PNG figures, with no
    script or style fetched from the network (the ``offline`` template)."""
    node = nbformat.read(notebook, as_version=4)
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATES)])
    exporter.embed_images = True
    body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": notebook.stem}})
    html_path.write_text(redact(body), encoding="utf-8")
    return html_path

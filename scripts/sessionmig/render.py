"""Render an executed notebook to a self-contained HTML page with nbconvert."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

from . import mask

TEMPLATES = Path(__file__).parent / "templates" / "nbconvert"


def scrub_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Text with every DSN password and every known secret value replaced."""
    return mask.redact(text, secrets)


def scrub_notebook(notebook: Path, secrets: tuple[str, ...] = (), dest: Path | None = None) -> Path:
    """Write ``notebook`` (to ``dest``, else in place) with secrets removed from everything it
    holds: cell sources, outputs and tracebacks (a failing cell's exception text is not ours to
    trust), and the metadata where papermill keeps parameters and the exception."""
    node = nbformat.read(notebook, as_version=4)
    clean = nbformat.from_dict(mask.scrub(dict(node), secrets))
    out = dest or notebook
    nbformat.write(clean, out)
    return out


def notebook_to_html(notebook: Path, html_path: Path) -> Path:
    """Write ``html_path`` from ``notebook``: inputs, outputs and inline PNG figures, with no
    script or style fetched from the network (the ``offline`` template)."""
    node = nbformat.read(notebook, as_version=4)
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATES)])
    exporter.embed_images = True
    body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": notebook.stem}})
    html_path.write_text(mask.redact_html(body), encoding="utf-8")
    return html_path

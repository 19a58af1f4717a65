"""Render an executed notebook to a self-contained HTML page with nbconvert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
from nbconvert import HTMLExporter

from .params import redact

TEMPLATES = Path(__file__).parent / "templates" / "nbconvert"


def scrub_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Text with every DSN password and every known secret value replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact(text)


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    return value


def scrub_notebook(notebook: Path, secrets: tuple[str, ...] = ()) -> None:
    """Rewrite an executed notebook with secrets removed from every cell's source and outputs,
    tracebacks included — a failing cell's exception text is not ours to trust."""
    node = nbformat.read(notebook, as_version=4)
    for cell in node.cells:
        cell.source = scrub_text(cell.source, secrets)
        if cell.get("outputs"):
            cell.outputs = [nbformat.from_dict(_scrub(dict(o), secrets)) for o in cell.outputs]
    nbformat.write(node, notebook)


def notebook_to_html(notebook: Path, html_path: Path) -> Path:
    """Write ``html_path`` from ``notebook``: inputs, outputs and inline PNG figures, with no
    script or style fetched from the network (the ``offline`` template)."""
    node = nbformat.read(notebook, as_version=4)
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(TEMPLATES)])
    exporter.embed_images = True
    body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": notebook.stem}})
    html_path.write_text(redact(body), encoding="utf-8")
    return html_path

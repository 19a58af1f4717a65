"""Render an executed notebook, and a run's cover page, to self-contained HTML pages.

A step report reads as a document, not as the notebook that produced it: :func:`arrange` sorts
an executed notebook's cells into what a reviewer reads first (the title and the *answer*: the
verdict block :mod:`sessionmig.reports.report` marks in its output metadata), the evidence
(markdown and outputs, without code), and a collapsed appendix (the parameters cells, the code,
and — when a cell failed — its traceback, scrubbed). The ``.ipynb`` stays the executable record;
only the HTML is rearranged. Every page (step reports and ``index.html``) uses one stylesheet,
``templates/report.css``, printable and with no request leaving the machine.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import html
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import nbformat

from sessionmig.rules import mask
from sessionmig.rules.verdict import FAILED, Verdict

TEMPLATES = Path(__file__).parent / "templates" / "nbconvert"
PAGES = Path(__file__).parent / "templates"
CSS = PAGES / "report.css"
ANSWER_KEY = "sessionmig"
"""Output metadata key: ``{"sessionmig": "answer"}`` marks the block lifted to the top."""
ANSWER = "answer"
APPENDIX = "appendix"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"

_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(PAGES)),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def css() -> str:
    """The one stylesheet of every page (inlined: reports are opened offline)."""
    return CSS.read_text(encoding="utf-8")


def scrub_notebook(notebook: Path, secrets: tuple[str, ...] = (), dest: Path | None = None) -> Path:
    """Write ``notebook`` (to ``dest``, else in place) with secrets removed from everything it
    holds: cell sources, outputs and tracebacks (a failing cell's exception text is not ours to
    trust), and the metadata where papermill keeps parameters and the exception."""
    node = nbformat.read(notebook, as_version=4)
    clean = nbformat.from_dict(mask.scrub(dict(node), secrets))
    out = dest or notebook
    nbformat.write(clean, out)
    return out


# --- the verdict block ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One figure that decides a gate: ``label`` above, ``value`` large, ``note`` small."""

    label: str
    value: str
    note: str = ""
    bad: bool = False


@dataclass(frozen=True)
class Answer:
    """What a step concluded, in the words a reviewer signs: the block at the top of a report."""

    step: str
    verdict: str
    reason: str
    todo: str = ""
    figures: tuple[Figure, ...] = ()


def verdict_class(verdict: str) -> str:
    """The CSS class of a verdict: pass, warn, fail or other."""
    if verdict in (Verdict.PASS, Verdict.GO):
        return "pass"
    if verdict == Verdict.PASS_WITH_WARNINGS:
        return "warn"
    if verdict in FAILED:
        return "fail"
    return "other"


def answer_html(answer: Answer) -> str:
    """The verdict banner (with the reason and what to do) and the key figures, as HTML."""
    return _jinja.get_template("answer.html.j2").render(
        a=answer, kind=verdict_class(answer.verdict), label=answer.verdict.replace("_", " ")
    )


# --- arranging an executed notebook --------------------------------------------------------------


@dataclass(frozen=True)
class Arranged:
    """An executed notebook sorted for reading: answer first, evidence, then the appendix."""

    title: str
    answer: tuple[str, ...]
    body: Any  # a NotebookNode: markdown and code cells whose inputs are not shown
    parameters: tuple[tuple[str, str], ...] = ()
    code: tuple[str, ...] = ()
    failure: tuple[str, ...] = ()
    log: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = field(default=())
    settings: tuple[str, ...] = ()  # HTML of the outputs marked for the appendix


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _progress_free(text: str) -> str:
    """A stderr stream as its final state: of each line redrawn with ``\\r``, the last draw."""
    lines = [line.rsplit("\r", 1)[-1] for line in ANSI.sub("", text).split("\n")]
    return "\n".join(line for line in lines if line.strip())


REFUSAL_TODO = (
    "This is a check the step makes before it acts, not a crash: the reason above says what "
    "was found and what to do. Run the step again once it holds."
)
ERROR_TODO = (
    "The step stopped on an error it did not expect; nothing after the failing cell ran. The "
    "appendix at the end holds the error's traceback for whoever fixes it."
)


def stopped_answer(step: str, ename: str, evalue: str) -> Answer:
    """The answer of a step that stopped before it concluded, from the error it stopped on.

    A ``VerdictFailed`` is a refusal the step was built to make (the soak period is not over,
    a run folder was altered): NO-GO, in its own words, with no traceback to read. Anything
    else is an ERROR whose traceback is in the appendix."""
    lines = [line for line in evalue.splitlines() if line.strip()]
    text = " ".join(lines) if ename == "VerdictFailed" else (lines[0] if lines else "")
    if ename == "VerdictFailed":
        return Answer(step=step, verdict=Verdict.NO_GO, reason=text, todo=REFUSAL_TODO)
    what = f"{ename}: {text}" if text else ename
    return Answer(
        step=step,
        verdict=Verdict.ERROR,
        reason=f"the step stopped on an unexpected error ({what})",
        todo=ERROR_TODO,
    )


def arrange(node: Any) -> Arranged:
    """Sort ``node``'s cells and outputs (pure: ``node`` is not modified)."""
    body = nbformat.from_dict(copy.deepcopy(dict(node)))
    cells = []
    title = ""
    answer: list[str] = []
    parameters: list[tuple[str, str]] = []
    code: list[str] = []
    failure: list[str] = []
    log: list[str] = []
    errors: list[tuple[str, str]] = []
    settings: list[str] = []
    for cell in node.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        source = _text(cell.get("source"))
        if PAPERMILL_ERROR_TAG in tags:
            continue
        if "parameters" in tags:
            parameters.append(("Defaults: the notebook's parameters cell", source))
            continue
        if "injected-parameters" in tags:
            parameters.append(("Injected for this run (environment file and -p)", source))
            continue
        if cell.cell_type == "markdown" and not title and source.lstrip().startswith("# "):
            first, _, rest = source.lstrip().partition("\n")
            title = first[2:].strip()
            if rest.strip():
                cells.append(nbformat.v4.new_markdown_cell(rest.strip()))
            continue
        if cell.cell_type != "code":
            cells.append(cell)
            continue
        if source.strip():
            code.append(source)
        kept = []
        for out in cell.get("outputs", []):
            role = out.get("metadata", {}).get(ANSWER_KEY)
            if role == ANSWER:
                answer.append(_text(out.get("data", {}).get("text/html")))
            elif role == APPENDIX:
                settings.append(_text(out.get("data", {}).get("text/html")))
            elif out.output_type == "error":
                lines = [ANSI.sub("", _text(line)) for line in out.get("traceback", [])]
                failure.append("\n".join(lines))
                errors.append((out.get("ename", ""), ANSI.sub("", out.get("evalue", ""))))
            elif out.output_type == "stream" and out.get("name") == "stderr":
                text = _progress_free(_text(out.get("text")))
                if text:
                    log.append(text)
            else:
                kept.append(out)
        if kept:
            fresh = nbformat.v4.new_code_cell("")
            fresh.outputs = kept
            cells.append(fresh)
    body.cells = cells
    if not answer and errors:
        answer.append(answer_html(stopped_answer(title, *errors[-1])))
    return Arranged(
        title=title or node.metadata.get("title", ""),
        answer=tuple(answer),
        body=body,
        parameters=tuple(parameters),
        code=tuple(code),
        failure=tuple(failure),
        log=tuple("\n".join(log).split("\n\n")) if log else (),
        errors=tuple(errors),
        settings=tuple(settings),
    )


_EXPORTING = threading.Lock()


@functools.cache
def exporter() -> Any:
    """The one HTML exporter of the process (nbconvert's import and the template's loading
    take a few tenths of a second: once, and ahead of the first page when warmed)."""
    from nbconvert import HTMLExporter

    made = HTMLExporter(template_name="sessionmig", extra_template_basedirs=[str(TEMPLATES)])
    made.embed_images = True
    made.exclude_input = True
    made.exclude_input_prompt = True
    made.exclude_output_prompt = True
    return made


def warm() -> None:
    """Make the exporter on a thread of its own, while a step runs."""
    threading.Thread(target=exporter, name="sessionmig-render-warm", daemon=True).start()


def notebook_to_html(notebook: Path, html_path: Path, stopped: Answer | None = None) -> Path:
    """Write ``html_path`` from ``notebook``: the answer first, then the evidence (outputs and
    inline PNG figures), then the parameters, code and any traceback in a collapsed appendix;
    with no script or style fetched from the network (the ``sessionmig`` template).
    ``stopped`` is the answer to show when the notebook holds none (its kernel died)."""
    node = nbformat.read(notebook, as_version=4)
    page = arrange(node)
    if stopped is not None and not page.answer:  # e.g. its kernel died: what is known instead
        page = dataclasses.replace(page, answer=(answer_html(stopped),))
    resources = {
        "metadata": {"name": notebook.stem},
        "sessionmig": {
            "title": page.title or notebook.stem,
            "answer": page.answer,
            "parameters": page.parameters,
            "settings": page.settings,
            "code": page.code,
            "failure": page.failure,
            "log": page.log,
            "css": css(),
            "notebook": notebook.name,
        },
    }
    with _EXPORTING:
        body, _ = exporter().from_notebook_node(page.body, resources=resources)
    html_path.write_text(mask.redact_html(body), encoding="utf-8")
    return html_path


# --- the run's cover page ------------------------------------------------------------------------


def cover_page(model: Any) -> str:
    """``index.html`` of a run laid out from its :class:`sessionmig.reports.cover.Cover`."""
    return mask.redact_html(
        _jinja.get_template("index.html.j2").render(c=model, css=css(), esc=html.escape)
    )


# The cover's slot for the manifest's digest: the manifest seals index.html, so the digest can
# only be written into the page after sealing, and the page's sha256 is taken with it blanked.
DIGEST_OPEN, DIGEST_CLOSE = "<!--digest-->", "<!--/digest-->"


def _slot(page: str) -> tuple[int, int] | None:
    start = page.find(DIGEST_OPEN)
    end = page.find(DIGEST_CLOSE, start + 1)
    if start < 0 or end < 0 or page.count(DIGEST_OPEN) != 1 or page.count(DIGEST_CLOSE) != 1:
        return None
    return start + len(DIGEST_OPEN), end


def with_digest(page: str, digest: str) -> str:
    """``page`` with the manifest's digest shown in its slot (unchanged when it has none)."""
    slot = _slot(page)
    if slot is None:
        return page
    shown = f'<code class="digest">{html.escape(digest)}</code>'
    return page[: slot[0]] + shown + page[slot[1] :]


def without_digest(page: str) -> str:
    """``page`` with its digest slot emptied: what the manifest's sha256 of the page is of."""
    slot = _slot(page)
    return page if slot is None else page[: slot[0]] + page[slot[1] :]


def shown_digest(page: str) -> str | None:
    """The digest the page shows in its slot, if it shows one."""
    slot = _slot(page)
    if slot is None:
        return None
    found = re.fullmatch(r'<code class="digest">([0-9a-f]{64})</code>', page[slot[0] : slot[1]])
    return found.group(1) if found else None

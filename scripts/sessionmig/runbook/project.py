"""Where the runbook's own files are: the notebooks and the environment files.

They travel with the code that runs them, so ``sessionmig`` works from any directory: an
explicit ``--project-dir`` (or ``$SESSIONMIG_PROJECT_DIR``) first, then the checkout this package
is imported from (a source tree or an editable install), then the copies an installed wheel
carries inside the package (``sessionmig/notebooks``, ``sessionmig/environments``). The
operator's current directory is never searched: it holds their backups and reports, and a
notebook from some other checkout would not match this code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sessionmig.errors import ParameterError

PROJECT_DIR_VARIABLE = "SESSIONMIG_PROJECT_DIR"
# In a checkout (and under --project-dir):
NOTEBOOKS = Path("notebooks")
ENVIRONMENTS = Path("runbook") / "environments"
# Inside the installed package (a wheel's package data; see pyproject.toml):
PACKAGED_NOTEBOOKS = "notebooks"
PACKAGED_ENVIRONMENTS = "environments"
RUNBOOK = Path("runbook") / "RUNBOOK.md"
PACKAGED_RUNBOOK = Path("procedure") / "RUNBOOK.md"
_PACKAGE = Path(__file__).resolve().parents[1]  # sessionmig/, above sessionmig/runbook/


@dataclass(frozen=True)
class Project:
    """The folders the runbook's files were found in, and where that place came from."""

    notebooks: Path
    environments: Path
    origin: str


def _holds_notebooks(folder: Path) -> bool:
    return any(folder.glob("*.ipynb"))


def _in_tree(root: Path, origin: str) -> Project | None:
    notebooks, environments = root / NOTEBOOKS, root / ENVIRONMENTS
    if _holds_notebooks(notebooks) and environments.is_dir():
        return Project(notebooks.resolve(), environments.resolve(), origin)
    return None


def locate(project_dir: str | Path | None = None) -> Project:
    """The runbook's files; raises ParameterError (exit 2) naming every place looked in."""
    explicit = (
        (str(project_dir), "--project-dir")
        if project_dir
        else (os.environ.get(PROJECT_DIR_VARIABLE, ""), f"${PROJECT_DIR_VARIABLE}")
    )
    where, origin = explicit
    if where:
        found = _in_tree(Path(where).expanduser(), origin)
        if found is None:
            raise ParameterError(
                f"{origin} {where}: no {NOTEBOOKS}/*.ipynb and {ENVIRONMENTS}/ there; give the "
                "folder of a sessionmig checkout (the one holding notebooks/ and runbook/)"
            )
        return found
    checkout = _in_tree(_PACKAGE.parent.parent, "the checkout")
    if checkout is not None:
        return checkout
    notebooks, environments = _PACKAGE / PACKAGED_NOTEBOOKS, _PACKAGE / PACKAGED_ENVIRONMENTS
    if _holds_notebooks(notebooks) and environments.is_dir():
        return Project(notebooks, environments, "the installed package")
    raise ParameterError(
        f"cannot find the runbook's notebooks: this installation of sessionmig ({_PACKAGE}) "
        f"carries none; pass --project-dir PATH or set {PROJECT_DIR_VARIABLE}=PATH (a sessionmig "
        "checkout), or reinstall it from a wheel built by its pyproject.toml"
    )


def runbook_path() -> Path:
    """The written procedure (RUNBOOK.md) that goes with this code: the checkout's, else the
    copy an installed wheel carries; the checkout-relative name when neither is there."""
    for candidate in (_PACKAGE.parent.parent / RUNBOOK, _PACKAGE / PACKAGED_RUNBOOK):
        if candidate.is_file():
            return candidate
    return RUNBOOK

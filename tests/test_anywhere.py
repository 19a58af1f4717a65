"""``sessionmig`` runs from any directory: notebooks and environment files come with the package
(or ``--project-dir``), the environment file may be the operator's own, reports land under the
current directory, and a missing project says so in one line with exit 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, sessionmig_process

from sessionmig.errors import ParameterError
from sessionmig.runbook import params as P
from sessionmig.runbook import project

PACKAGE = ROOT / "scripts" / "sessionmig"


def _installed_copy(site: Path, with_data: bool) -> Path:
    """The package as a wheel installs it, in ``site`` (no checkout around it); with its
    notebooks and environment files as package data when ``with_data``."""
    target = site / "sessionmig"
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    if with_data:
        shutil.copytree(ROOT / "notebooks", target / project.PACKAGED_NOTEBOOKS)
        shutil.copytree(ROOT / "runbook" / "environments", target / project.PACKAGED_ENVIRONMENTS)
    return site


def _python(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_checkout_is_found_whatever_the_current_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(project.PROJECT_DIR_VARIABLE, raising=False)
    found = project.locate()
    assert found.origin == "the checkout"
    assert found.notebooks == ROOT / "notebooks"
    assert P.environment_file("local") == ROOT / "runbook" / "environments" / "local.yaml"


def test_an_environment_file_of_the_operators_own(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("source_timezone: UTC\n")
    assert P.load_environment("mine.yaml") == {"source_timezone": "UTC"}
    assert P.load_environment(str(tmp_path / "mine.yaml")) == {"source_timezone": "UTC"}
    with pytest.raises(ParameterError, match=r"--env other\.yaml: no such file"):
        P.environment_file("other.yaml")


def test_project_dir_option_and_variable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(project.PROJECT_DIR_VARIABLE, str(ROOT))
    assert project.locate().origin == f"${project.PROJECT_DIR_VARIABLE}"
    assert project.locate(ROOT).origin == "--project-dir"
    with pytest.raises(ParameterError, match="--project-dir .*: no notebooks/"):
        project.locate(tmp_path)


def test_an_installed_package_uses_the_notebooks_it_carries(tmp_path) -> None:
    site = _installed_copy(tmp_path / "site", with_data=True)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = _python(
        site,
        "from sessionmig.runbook import project, params; p = project.locate(); "
        "print(p.origin, p.notebooks, params.environment_file('prod'))",
        cwd,
    )
    assert done.returncode == 0, done.stderr
    where = site / "sessionmig"
    assert done.stdout.split() == [
        "the",
        "installed",
        "package",
        str(where / "notebooks"),
        str(where / "environments" / "prod.yaml"),
    ]


def test_without_project_files_one_line_and_exit_2(tmp_path) -> None:
    site = _installed_copy(tmp_path / "site", with_data=False)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = _python(
        site,
        "import sys; from sessionmig.cli import main; "
        "sys.exit(main(['run', '--env', 'local', '--reports-dir', 'reports']))",
        cwd,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sessionmig run: cannot find the runbook's notebooks")
    assert "--project-dir" in lines[0] and "Traceback" not in done.stderr
    assert not (cwd / "reports").exists()
    wrong = sessionmig_process("run", "--env", "local", "--project-dir", str(cwd), cwd=cwd)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (
        f"sessionmig run: --project-dir {cwd}: no notebooks/*.ipynb and runbook/environments/ "
        "there; give the folder of a sessionmig checkout (the one holding notebooks/ and runbook/)"
    )


@pytest.mark.slow
def test_run_from_a_directory_outside_the_checkout(tmp_path) -> None:
    """`cd /tmp && sessionmig run --env local`, the whole default run: notebooks
    from the package, the backup and the reports relative to the operator's directory."""
    cwd = tmp_path / "operator"
    cwd.mkdir()
    made = sessionmig_process("sample", "--rows", "300", "--out", "sessions.db", cwd=cwd)
    assert made.returncode == 0, made.stderr
    result = sessionmig_process(
        "run",
        "--env",
        "local",
        "--fresh",
        "-p",
        "sqlite_path=sessions.db",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"reports: (.*)/index.html", result.stdout)
    assert match, result.stdout
    run_dir = Path(match.group(1))
    assert run_dir.parent == cwd / "reports" / "local"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["name"], s["verdict"]) for s in manifest["steps"]] == [
        ("preflight", "GO"),
        ("inspect", "PASS_WITH_WARNINGS"),
        ("migrate", "PASS_WITH_WARNINGS"),
        ("reconcile", "PASS_WITH_WARNINGS"),
    ]
    assert manifest["exit_code"] == 0 and manifest["verdict"] == "PASS_WITH_WARNINGS"
    assert manifest["parameters"]["sqlite_path"] == str(cwd / "sessions.db")
    assert {f"{nb[:-6]}.html" for nb in ("00_preflight.ipynb", "03_reconcile.ipynb")} <= {
        p.name for p in run_dir.iterdir()
    }

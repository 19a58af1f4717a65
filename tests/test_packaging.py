"""Repository contracts: conda and pip agree, notebooks are committed clean and documented."""

from __future__ import annotations

import re
import tomllib

import nbformat
import papermill
import pytest
import yaml
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _name(requirement: str) -> str:
    name = re.split(r"[\[<>=!~ ]", requirement.strip(), maxsplit=1)[0].lower()
    return name.replace("_", "-")


def test_environment_yml_lists_the_runtime_dependencies_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_side = {_name(r) for r in project["dependencies"]}
    pip_side |= (
        {"psycopg-binary"}
        if any("psycopg[binary]" in r for r in project["dependencies"])
        else set()
    )
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_side: set[str] = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            conda_side |= {_name(r) for r in dep["pip"]}
        else:
            conda_side.add(_name(dep))
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    assert conda_side - {"python", "pip"} - dev == pip_side


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

"""An app installs the session store alone: ``pip install`` of ``scripts/sessionstore`` into a
fresh venv brings a handful of distributions, well under 100 MB, and the store — imported,
migrated with its own ``alembic.ini``, used — loads no pandas, numpy, matplotlib, papermill or
Jupyter, neither there nor beside the runbook's dependencies in the development venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import ROOT

STORE = ROOT / "scripts" / "sessionstore"
MAX_DISTRIBUTIONS = 12
MAX_SITE_PACKAGES = 100 * 1024 * 1024
# Never loaded by the store, whatever is installed beside it (the runbook itself included).
RUNBOOK_ONLY = (
    "pandas",
    "numpy",
    "matplotlib",
    "papermill",
    "nbformat",
    "jupyter_client",
    "sessionmig",
)

# Run in the store's interpreter: migrate with the shipped alembic.ini, then the app's calls.
USE_THE_STORE = """
import asyncio, json, os, subprocess, sys
import sessionstore
from sessionstore import SessionManager, get_session_manager
from sessionstore.migrate import ALEMBIC_INI, HEAD

migrated = subprocess.run(
    [sys.executable, "-m", "alembic", "-c", str(ALEMBIC_INI), "upgrade", "head"],
    capture_output=True, text=True,
)
assert migrated.returncode == 0, migrated.stderr

async def app():
    async with get_session_manager() as store:
        sid, _ = await store.create_session("alone", {"k": 1})
        assert await store.validate_session(sid)
        return await store.get_session(sid)

found = asyncio.run(app())
print(json.dumps({
    "user_id": found.user_id,
    "request_count": found.request_count,
    "head": HEAD,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r),
}))
"""


def _run(python: Path, code: str, dsn: str, cwd: Path) -> dict[str, object]:
    env = {**os.environ, "DATABASE_URL": dsn, "SESSION_DB_TYPE": "postgres"}
    done = subprocess.run(
        [str(python), "-c", code % (RUNBOOK_ONLY,)],
        env=env,
        cwd=cwd,  # elsewhere: nothing of the checkout on the path but what is installed
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the store's wheel installed (and its dependencies, pinned as the
    project pins them), nothing else."""
    where = tmp_path_factory.mktemp("store-alone")
    # Built from a copy: an in-tree build would leave build/ in the checkout, and a stale
    # build/lib (a module since removed) would ship in the next wheel. Outside the repository
    # setuptools-scm cannot see git: the version is the installed store's own.
    source = where / "sessionstore-src"
    shutil.copytree(STORE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(where), str(source)],
        env={**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": version("sessionstore")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = where.glob("sessionstore-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), wheel],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def test_the_store_installs_alone_small(alone: Path) -> None:
    listed = subprocess.run(
        [str(alone), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = sorted(d["name"].lower() for d in json.loads(listed.stdout))
    # Everything in the venv, pip (and the setuptools Python 3.11's venv brings) included.
    assert len(names) <= MAX_DISTRIBUTIONS, names
    assert "sessionstore" in names and "sessionmig" not in names
    assert not set(names) & {"pandas", "numpy", "matplotlib", "papermill", "ipykernel"}
    site = _site_packages(alone)
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    assert size < MAX_SITE_PACKAGES, f"{size / 2**20:.1f} MB"
    print(f"\nstore alone: {len(names)} distributions, {size / 2**20:.1f} MB: {names}")


def test_the_store_alone_migrates_and_serves(alone: Path, dsn: str, tmp_path: Path) -> None:
    answer = _run(alone, USE_THE_STORE, dsn, tmp_path)
    assert answer == {"user_id": "alone", "request_count": 1, "head": "0004", "loaded": []}


def test_the_store_loads_nothing_of_the_runbook_beside_it(dsn: str, tmp_path: Path) -> None:
    """In the development venv pandas and the rest are installed: still none is imported."""
    assert _run(Path(sys.executable), USE_THE_STORE, dsn, tmp_path)["loaded"] == []


def test_the_example_app_imports_the_store_only(tmp_path: Path) -> None:
    """``examples/session_app``'s app (its requirements: the store, FastAPI, uvicorn) loads
    nothing of the runbook."""
    environ = {"SESSION_DB_TYPE": "sqlite", "SESSION_SQLITE_PATH": str(tmp_path / "s.db")}
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        "from session_app.app import create_app\n"
        f"create_app({environ!r})\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {RUNBOOK_ONLY!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    requirements = (ROOT / "examples" / "session_app" / "requirements.txt").read_text()
    assert "sessionmig" not in requirements.replace("# ", "")

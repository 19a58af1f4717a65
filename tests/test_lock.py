"""The lock an audited install trusts: ``constraints.lock`` names every third-party file by its
sha256, ``make install`` installs it so that pip checks every one, and a file whose hash differs
(a tampered or substituted download) stops the install. Offline: the tampering is tried on a
wheel built here, from a folder, with no index."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

LOCK = ROOT / "constraints.lock"
PLAIN = ROOT / "constraints.txt"  # the same pins without hashes, for pip install -c
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})\b")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def lock_entries(text: str) -> dict[tuple[str, str], list[str]]:
    """(name, version) → the sha256 digests the lock allows, one entry per pinned line (a name
    may be pinned twice, under two markers)."""
    entries: dict[tuple[str, str], list[str]] = {}
    current: tuple[str, str] | None = None
    for line in text.splitlines():
        pinned = PIN.match(line)
        if pinned:
            current = (_name(pinned.group(1)), pinned.group(2))
            entries.setdefault(current, [])
        elif line.startswith((" ", "\t")) and current is not None:
            entries[current] += HASH.findall(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{LOCK.name}: a line that is neither a pin nor a hash: {line}")
    return entries


def pins() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, version in lock_entries(LOCK.read_text()):
        out.setdefault(name, set()).add(version)
    return out


def test_every_pin_of_the_lock_carries_sha256_digests() -> None:
    entries = lock_entries(LOCK.read_text())
    assert len(entries) > 50, f"{LOCK.name} looks empty: run make constraints"
    unhashed = sorted(f"{n}=={v}" for (n, v), digests in entries.items() if not digests)
    assert not unhashed, f"pins without a --hash: {unhashed}; regenerate with make constraints"
    # Never the repository's own two distributions: make install installs them editable.
    assert not {"sessionmig", "sessionstore"} & {n for n, _ in entries}


def test_constraints_txt_is_the_lock_without_its_hashes() -> None:
    """``pip install -c constraints.txt`` (an app installing the store alone) gets exactly the
    lock's versions, under the same markers."""
    lines = [line for line in PLAIN.read_text().splitlines() if not line.startswith("#")]
    assert lines and not any("--hash" in line for line in lines)
    pinned = [
        line.removesuffix("\\").rstrip()
        for line in LOCK.read_text().splitlines()
        if PIN.match(line)
    ]
    assert lines == pinned, "constraints.txt differs from constraints.lock: run make constraints"


def test_the_lock_holds_what_the_editable_installs_are_built_with() -> None:
    """make install builds the two editable installs with --no-build-isolation: their build
    backend must come from the lock (hashed), not from an unchecked download."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    locked = pins()
    for text in requires:
        requirement = Requirement(text)
        versions = locked.get(_name(requirement.name), set())
        assert any(requirement.specifier.contains(v) for v in versions), (text, versions)
    assert "pip" in locked


def test_make_install_checks_every_hash_then_adds_the_two_editables_without_deps() -> None:
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP):", 1)[1].split("\ninstall:", 1)[0]
    commands = [c for c in recipe.replace("\\\n", " ").splitlines() if c.startswith("\t")]
    lock_install = next(c for c in commands if f"-r {LOCK.name}" in c)
    assert "--require-hashes" in lock_install and "--no-deps" in lock_install
    editable = next(c for c in commands if "-e scripts/sessionstore" in c)
    assert "--no-deps" in editable and "--no-build-isolation" in editable
    assert "-c " not in recipe  # pip would not check the hashes of a -e install
    assert commands.index(lock_install) < commands.index(editable)
    assert any(c.strip().endswith("pip check") for c in commands[commands.index(editable) :])


def test_environment_yml_ranges_admit_the_locked_versions() -> None:
    """conda users resolve their own builds from environment.yml's ranges: each range must
    admit the version the lock pins, or the two installs would differ by design."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    locked = pins()
    specs: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            specs += [r for r in dep["pip"] if not r.startswith("-")]
        else:
            specs.append(dep)
    checked = 0
    for text in specs:
        name = _name(re.split(r"[<>=!~ ]", text, maxsplit=1)[0])
        if name in ("python", "pip"):
            continue
        specifier = SpecifierSet(text[len(re.split(r"[<>=!~ ]", text, maxsplit=1)[0]) :].strip())
        assert name in locked, f"environment.yml lists {name}, which {LOCK.name} does not pin"
        assert any(specifier.contains(v, prereleases=True) for v in locked[name]), (
            f"environment.yml: {text} does not admit the locked {name} {locked[name]}"
        )
        checked += 1
    assert checked > 15


# --- a tampered file stops the install -----------------------------------------------------------


def _wheel(where: Path, body: str) -> Path:
    """A minimal pure-Python wheel, built here: its sha256 is known, no index is needed."""
    name, version = "lockprobe", "1.0"
    path = where / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": body,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_lock\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for member, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{member},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def _install(lock: Path, wheels: Path, target: Path) -> subprocess.CompletedProcess[str]:
    """make install's own pip command for the lock, offline: this folder is the only index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--require-hashes", "--no-deps", "-r", str(lock)]
        + ["--no-index", "--find-links", str(wheels), "--target", str(target), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("tampered", [False, True], ids=["as-locked", "tampered"])
def test_a_file_whose_sha256_differs_from_the_lock_is_refused(
    tmp_path: Path, tampered: bool
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    locked = _wheel(wheels, "ANSWER = 42\n")
    digest = hashlib.sha256(locked.read_bytes()).hexdigest()
    lock = tmp_path / "lock.txt"
    lock.write_text(f"lockprobe==1.0 \\\n    --hash=sha256:{digest}\n")
    if tampered:  # the same name and version, other bytes: what a substituted download is
        _wheel(wheels, "ANSWER = 666\n")
    done = _install(lock, wheels, tmp_path / "site")
    installed = tmp_path / "site" / "lockprobe" / "__init__.py"
    if tampered:
        assert done.returncode != 0
        assert "DO NOT MATCH THE HASHES" in done.stderr, done.stderr[-2000:]
        assert digest in done.stderr
        assert not installed.exists()
    else:
        assert done.returncode == 0, done.stderr[-2000:]
        assert installed.read_text() == "ANSWER = 42\n"


def test_a_pin_without_a_hash_is_refused(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "ANSWER = 42\n")
    lock = tmp_path / "lock.txt"
    lock.write_text("lockprobe==1.0\n")
    done = _install(lock, wheels, tmp_path / "site")
    assert done.returncode != 0 and "Hashes are required" in done.stderr, done.stderr[-2000:]

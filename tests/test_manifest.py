"""The manifest seals every report file; verify names what was edited, added or removed."""

from __future__ import annotations

from pathlib import Path

from sessionmig.runbook.manifest import verify, write_index, write_manifest


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "01_inspect.html").write_text("<html>inspect</html>")
    (run / "01_inspect.ipynb").write_text("{}")
    data = {
        "run_id": "r1",
        "environment": "local",
        "verdict": "PASS",
        "started_at": "t",
        "steps": [
            {
                "name": "inspect",
                "status": "passed",
                "verdict": "PASS",
                "reason": "ok",
                "duration_s": 1.5,
                "outputs": ["01_inspect.html", "01_inspect.ipynb"],
            }
        ],
    }
    write_index(run, data)
    write_manifest(run, data)
    return run


def test_untouched_run_verifies(tmp_path: Path) -> None:
    result = verify(make_run(tmp_path))
    assert result.ok and result.checked == 3


def test_one_edited_byte_is_named(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    target = run / "01_inspect.html"
    data = bytearray(target.read_bytes())
    data[7] ^= 1
    target.write_bytes(bytes(data))
    assert verify(run).problems == ("01_inspect.html: sha256 differs from the manifest (edited)",)


def test_edited_manifest_added_and_removed_files(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    manifest = run / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"PASS"', '"FAIL"', 1))
    (run / "extra.html").write_text("x")
    (run / "01_inspect.ipynb").unlink()
    problems = verify(run).problems
    assert "manifest.json: its own digest does not match its content (edited)" in problems
    assert "01_inspect.ipynb: missing" in problems
    assert "extra.html: not listed in the manifest (added)" in problems


def test_index_links_are_relative(tmp_path: Path) -> None:
    page = (make_run(tmp_path) / "index.html").read_text()
    assert 'href="01_inspect.html"' in page and "http" not in page.replace("http-equiv", "")


def test_verify_sees_every_entry_of_the_folder(tmp_path: Path) -> None:
    """A file added inside a symlinked sub-folder, an added FIFO, a sealed file
    swapped for a link — every entry is either sealed or a problem (and a FIFO is never opened,
    which would hang)."""
    import os

    run = make_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "forged.html").write_text("<html>PASS</html>")
    (run / "extra").symlink_to(elsewhere, target_is_directory=True)
    os.mkfifo(run / "pipe")
    (run / "sub").mkdir()
    (run / "sub" / "added.txt").write_text("x")
    sealed = run / "01_inspect.ipynb"
    copy = tmp_path / "copy.ipynb"
    copy.write_bytes(sealed.read_bytes())
    sealed.unlink()
    sealed.symlink_to(copy)  # the same bytes, behind a link
    problems = verify(run).problems
    assert "extra: a symbolic link, which a sealed folder never holds (added)" in problems
    assert "pipe: a FIFO, which a sealed folder never holds (added)" in problems
    assert "sub/added.txt: not listed in the manifest (added)" in problems
    assert "01_inspect.ipynb: is a symbolic link now, not the sealed file" in problems
    assert len(problems) == 4

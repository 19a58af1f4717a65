"""Reviewers open the reports offline, in a real headless Chromium at 1400 px wide.

Every step report of a passing run and of failing ones (reconcile FAIL on a damaged target,
preflight NO-GO on a backup that is not the reviewed one, inspect ERROR on a damaged backup)
must show its verdict and key figures in the first 900 px, no traceback or papermill
"An Exception was encountered" outside the collapsed appendix, and no table wider than the
page; no request may leave the machine, no console error. The cover page of a run of every
verdict (PASS, PASS_WITH_WARNINGS, FAIL, ERROR, INTERRUPTED, NO-GO) says that verdict with a
headline that agrees with it, and the analysis page lays SQLite out on the left as it says.
Screenshots (the first 900 px) are kept in test-artifacts/: pass/, fail/, covers/ (one per
verdict) and analysis/.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import ROOT, env_file

from sessionmig.postgres import embedded
from sessionmig.runbook import orchestrate
from sessionmig.sqlite import sample

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FOLD = 900
WIDTH = 1400
ARTIFACTS = ROOT / "test-artifacts"
HIDDEN_WORDS = ("An Exception was encountered", "Traceback (most recent call last)", "Traceback")

# What a reviewer must be able to read above the fold, per step (besides the verdict).
KEY_FIGURES = {
    "00_preflight": ("checks holding", "source sha256"),
    "01_inspect": ("sessions in the backup", "rows that cannot land", "backup sha256"),
    "02_migrate": ("rows read", "landed in PostgreSQL", "rejected", "sha256 before = after"),
    "03_reconcile": ("partition: source = migrated + rejected", "differences", "compared"),
}

LAYOUT = """() => {
  const fold = FOLD;
  const box = (sel) => { const e = document.querySelector(sel);
    if (!e) return null; const r = e.getBoundingClientRect();
    return {top: r.top + window.scrollY, bottom: r.bottom + window.scrollY}; };
  const wide = [...document.querySelectorAll('table')].filter(t => {
    const r = t.getBoundingClientRect(); const p = t.parentElement.getBoundingClientRect();
    return r.right > document.documentElement.clientWidth + 1 || t.scrollWidth > p.width + 1; })
    .map(t => t.innerText.slice(0, 80));
  const above = [...document.querySelectorAll('.figure')].filter(e =>
    e.getBoundingClientRect().bottom + window.scrollY <= fold).map(e => e.innerText);
  const badge = document.querySelector('.verdict .badge');
  return {verdict: box('.verdict .badge'), badge: badge ? badge.innerText : '',
    figures: box('.figures'), above: above.join('\\n'), text: document.body.innerText,
    scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth,
    wide: wide};
}""".replace("FOLD", str(FOLD))


ANALYSIS_LAYOUT = """() => {
  const top = (e) => e.getBoundingClientRect().top + window.scrollY;
  const img = document.querySelector('img');
  const open = [...document.querySelectorAll('table')].filter(t =>
    !t.closest('details:not([open])') && t.rows.length > 13);
  return {first_img: img ? top(img) : null,
    open_long_tables: open.map(t => [top(t), t.rows.length]),
    folded: document.querySelectorAll('details.rows').length,
    height: document.documentElement.scrollHeight};
}"""


def _check_page(page, url: str, shot: Path, expect: str, exact: bool = False) -> dict:
    page.goto(url)
    page.wait_for_load_state("load")
    page.screenshot(path=str(shot), full_page=False)
    info = page.evaluate(LAYOUT)
    name = shot.stem
    assert info["verdict"] is not None, f"{name}: no verdict banner"
    assert info["verdict"]["bottom"] <= FOLD, f"{name}: verdict below the fold: {info['verdict']}"
    badge = info["badge"].replace(" ", "_")
    assert (badge == expect) if exact else (expect in badge), f"{name}: {badge} is not {expect}"
    for word in HIDDEN_WORDS:
        assert word not in info["text"], f"{name}: '{word}' visible outside the appendix"
    assert info["scroll"] <= info["client"], f"{name}: page wider than the window"
    assert info["wide"] == [], f"{name}: tables wider than the page: {info['wide']}"
    return info


def _check_step(page, run: Path, stem: str, folder: Path, expect: str) -> None:
    info = _check_page(page, (run / f"{stem}.html").as_uri(), folder / f"{stem}.png", expect)
    if expect in ("PASS", "GO", "PASS_WITH_WARNINGS") or stem in ("03_reconcile", "02_migrate"):
        assert info["figures"] is not None, f"{stem}: no key figures"
        assert info["figures"]["bottom"] <= FOLD, f"{stem}: key figures below the fold"
        for label in KEY_FIGURES.get(stem, ()):
            assert label in info["above"], f"{stem}: '{label}' not above the fold"


def _database(server_url: str) -> str:
    """Another fresh database on the server under test (the caller drops it)."""
    name = f"smtest_{uuid.uuid4().hex[:12]}"
    embedded.ensure_database(server_url, name)
    return embedded.with_database(server_url, name)


def _drop(server_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[-1].split("?")[0]
    with psycopg.connect(embedded.with_database(server_url, "postgres"), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _interrupted_run(tmp_path: Path, dsn: str) -> Path:
    """``sessionmig run`` stopped by Ctrl-C once migrate has committed: an INTERRUPTED run."""
    backup = tmp_path / "interrupted.db"
    sample.generate(backup, rows=3000, seed=3)
    folder = tmp_path / "interrupted"
    folder.mkdir()
    env = env_file(folder, backup, batch_rows=5000)
    process = subprocess.Popen(
        [sys.executable, "-m", "sessionmig.cli", "run", "--env", str(env)]
        + ["--steps", "migrate,reconcile", "--reports-dir", str(tmp_path / "reports")],
        cwd=ROOT,
        env={**os.environ, "SMTEST_DSN": dsn},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                try:
                    if conn.execute("SELECT 1 FROM session_migration_runs").fetchone():
                        break
                except psycopg.errors.UndefinedTable:
                    pass
                time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2, stdout + stderr
    line = next(x for x in (stdout + stderr).splitlines() if x.startswith("reports: "))
    return Path(line.removeprefix("reports: ")).parent


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_reports_open_with_their_answer_in_a_real_browser(
    tmp_path, small_backup, clean_backup, dsn, server_url, backend, monkeypatch
) -> None:
    if backend != "embedded":
        pytest.skip("the pages do not depend on the server")
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = env_file(tmp_path, small_backup)
    reports = tmp_path / "reports"
    passing = orchestrate.run(str(env), None, {}, reports)
    assert passing.exit_code == 0, passing.message
    assert passing.verdict == "PASS_WITH_WARNINGS"
    # The analysis step on both sources, side by side.
    analysis = orchestrate.run(str(env), ["analysis"], {"source": "both"}, reports)
    assert analysis.exit_code == 0, analysis.message

    # Reconcile FAIL: one session gone from the target, one changed.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM sessions WHERE session_id = (SELECT min(session_id) FROM sessions)"
        )
        conn.execute(
            "UPDATE sessions SET request_count = request_count + 1 "
            "WHERE session_id = (SELECT max(session_id) FROM sessions)"
        )
    failing = orchestrate.run(str(env), ["reconcile"], {}, reports)
    assert failing.exit_code == 1, failing.message
    # Preflight NO-GO: the backup is not the one the reviewer signed.
    nogo = orchestrate.run(str(env), None, {"expected_sha256": "0" * 64}, reports)
    assert nogo.exit_code == 2, nogo.message
    # Inspect ERROR: a damaged backup.
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\x00" * 2000)
    broken = orchestrate.run(str(env_file(tmp_path, damaged)), ["inspect"], {}, reports)
    assert broken.exit_code == 2, broken.message
    # PASS: a clean backup into a database of its own; INTERRUPTED: Ctrl-C after the commit.
    clean_dsn, stopped_dsn = _database(server_url), _database(server_url)
    try:
        monkeypatch.setenv("SMTEST_DSN", clean_dsn)
        clean = orchestrate.run(str(env_file(tmp_path, clean_backup)), None, {}, reports)
        assert clean.exit_code == 0 and clean.verdict == "PASS", clean.message
        interrupted = _interrupted_run(tmp_path, stopped_dsn)
    finally:
        _drop(server_url, clean_dsn)
        _drop(server_url, stopped_dsn)

    failed: list[str] = []
    errors: list[str] = []
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": FOLD})
        page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
        page.on(
            "request",
            lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None,
        )
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        shots = ARTIFACTS / "pass"
        shots.mkdir(parents=True, exist_ok=True)
        run = passing.run_dir
        index = _check_page(page, (run / "index.html").as_uri(), shots / "index.png", "PASS")
        for step in ("preflight", "inspect", "migrate", "reconcile"):
            assert step in index["text"]
        links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
        assert [h for h in links if h.endswith(".html")] == [
            "00_preflight.html",
            "01_inspect.html",
            "02_migrate.html",
            "03_reconcile.html",
        ]
        assert all(not h.startswith(("http:", "https:", "/")) for h in links)
        expected = {
            "00_preflight": "GO",
            "01_inspect": "PASS",
            "02_migrate": "PASS",
            "03_reconcile": "PASS",
        }
        for stem, verdict in expected.items():
            _check_step(page, run, stem, shots, verdict)
        page.goto((run / "01_inspect.html").as_uri())
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)  # the plots render

        fail = ARTIFACTS / "fail"
        fail.mkdir(parents=True, exist_ok=True)
        for outcome, stem, verdict in (
            (failing, "03_reconcile", "FAIL"),
            (nogo, "00_preflight", "NO-GO"),
            (broken, "01_inspect", "ERROR"),
        ):
            _check_step(page, outcome.run_dir, stem, fail, verdict)
            _check_page(
                page,
                (outcome.run_dir / "index.html").as_uri(),
                fail / f"index_{stem}.png",
                verdict,
                exact=True,
            )
        # The traceback is kept, scrubbed, in the collapsed appendix.
        page.goto((failing.run_dir / "03_reconcile.html").as_uri())
        assert page.locator("details.appendix pre.traceback").count() >= 1
        assert not page.locator("details.appendix pre.traceback").first.is_visible()
        text = page.content()
        assert "1 missing" in text and "1 changed" in text.replace(",", "")
        assert "400 ≠ 392 + 7" in text and "1 row unaccounted" in text

        # A cover for every verdict: the badge is the verdict, the headline agrees with it.
        covers = ARTIFACTS / "covers"
        covers.mkdir(parents=True, exist_ok=True)
        for verdict, folder in (
            ("PASS", clean.run_dir),
            ("PASS_WITH_WARNINGS", passing.run_dir),
            ("FAIL", failing.run_dir),
            ("ERROR", broken.run_dir),
            ("INTERRUPTED", interrupted),
            ("NO-GO", nogo.run_dir),
        ):
            info = _check_page(
                page, (folder / "index.html").as_uri(), covers / f"{verdict}.png", verdict, True
            )
            headline = page.inner_text(".verdict .line")
            assert ("passed" in headline) == (verdict in ("PASS", "PASS_WITH_WARNINGS")), headline
            assert ("warnings" in headline) == (verdict == "PASS_WITH_WARNINGS"), headline
            assert "UTC" in info["text"] and "sessionmig verify /" in info["text"]
        page.goto((failing.run_dir / "index.html").as_uri())
        assert "400 ≠ 392 + 7" in page.inner_text("table.steps")
        assert page.locator("table.steps span.bad").count() >= 1

        # The analysis page: SQLite on the left, as it says; every chart drawn.
        shelf = ARTIFACTS / "analysis"
        shelf.mkdir(parents=True, exist_ok=True)
        info = _check_page(
            page,
            (analysis.run_dir / "04_session_analysis.html").as_uri(),
            shelf / "04_session_analysis.png",
            "PASS",
        )
        text = info["text"]
        assert "SQLite (the backup) on the left, PostgreSQL (the target) on the right" in text
        assert text.index("on SQLite (the backup)") < text.index("on PostgreSQL (the target)")
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) >= 3 and all(w > 0 for w in widths)
        # The zone, unit and window above the fold; each chart before its
        # rows, no long table open before the first chart (long ones are folded); one panel
        # per chart with both sources on it.
        assert "buckets" in info["above"] and " in " in info["above"], info["above"]
        assert "window [" in info["above"], info["above"]
        assert "Buckets of one " in text and text.index("Buckets of one ") < text.index("active_at")
        layout = page.evaluate(ANALYSIS_LAYOUT)
        assert layout["open_long_tables"] == [], layout
        assert layout["first_img"] is not None and layout["folded"] >= 1, layout
        assert layout["height"] < 9000, layout  # was 12,900 px with two 168-row tables open
        chart = page.locator("img").first
        chart.scroll_into_view_if_needed()
        chart.screenshot(path=str(shelf / "chart.png"))
        browser.close()
    assert failed == [] and errors == [] and outside == []


def test_screenshots_are_committed() -> None:
    """The acceptance set: index and each step report, pass and fail, a cover per verdict,
    the analysis page; small PNGs."""
    names = {p.relative_to(ARTIFACTS).as_posix() for p in ARTIFACTS.rglob("*.png")}
    for stem in ("index", "00_preflight", "01_inspect", "02_migrate", "03_reconcile"):
        assert f"pass/{stem}.png" in names
    for stem in ("03_reconcile", "00_preflight", "01_inspect"):
        assert f"fail/{stem}.png" in names
    for verdict in ("PASS", "PASS_WITH_WARNINGS", "FAIL", "ERROR", "INTERRUPTED", "NO-GO"):
        assert f"covers/{verdict}.png" in names
    assert "analysis/04_session_analysis.png" in names and "analysis/chart.png" in names
    assert all(p.stat().st_size < 400_000 for p in ARTIFACTS.rglob("*.png"))

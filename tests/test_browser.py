"""Reviewers open the reports offline: a real headless Chromium follows every link of a run's
index.html and must see no failed request, no request leaving the machine, no console error,
and rendered plots. A screenshot of the index is kept in test-artifacts/."""

from __future__ import annotations

import shutil

import pytest
from conftest import ROOT, env_file

from sessionmig import orchestrate

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


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_reports_work_offline_in_a_real_browser(
    tmp_path, small_backup, dsn, backend, monkeypatch
) -> None:
    if backend != "embedded":
        pytest.skip("the pages do not depend on the server")
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("SMTEST_DSN", dsn)
    env = env_file(tmp_path, small_backup)
    outcome = orchestrate.run(str(env), None, {}, tmp_path / "reports")
    assert outcome.exit_code == 0, outcome.message
    index = outcome.index.resolve()
    failed: list[str] = []
    errors: list[str] = []
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
        page.on(
            "request",
            lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None,
        )
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(index.as_uri())
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        page.screenshot(path=str(artifacts / "index.png"), full_page=True)
        links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
        assert [h for h in links if h.endswith(".html")] == [
            "00_preflight.html",
            "01_inspect.html",
            "02_migrate.html",
            "03_reconcile.html",
        ]
        assert all(not h.startswith(("http:", "https:", "/")) for h in links)
        for href in links:
            page.goto(index.as_uri())
            page.click(f'a[href="{href}"]')
            page.wait_for_load_state("load")
            if href == "01_inspect.html":
                widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
                assert len(widths) == 2 and all(w > 0 for w in widths)  # both plots render
            if href.endswith(".html"):
                assert "PASS" in page.content() or "GO" in page.content()
        browser.close()
    assert failed == [] and errors == [] and outside == []

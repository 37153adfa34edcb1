"""The web dashboard in a real headless Chromium (Debian's, driven by Playwright):
log in with the key, open a finished job, find both plots and the ledger, screenshot."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.stack import ROOT

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing (never a downloaded build)."""
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None:
            pytest.skip("no /usr/bin/chromium and no apt-get to install it")
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        steps = (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"])
        for cmd in steps:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                pytest.skip(
                    f"could not install chromium ({' '.join(cmd)}): {done.stderr.strip()[-300:]}"
                )
    if not CHROMIUM.exists():
        pytest.skip("apt-get installed chromium but /usr/bin/chromium is missing")
    return CHROMIUM


@pytest.fixture
def browser_context(chromium, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def _other_tenant_key(service) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "keys", "create", "--tenant", "tenant-b"],
        cwd=ROOT,
        env=service.admin_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def _assert_not_blank(png: Path) -> None:
    assert png.stat().st_size > 20_000, png.stat().st_size
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as img:
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
        extrema = rgb.getextrema()
    assert colors is None or len(colors) > 50, len(colors)  # None: more than 2^20 colours
    assert any(lo != hi for lo, hi in extrema), extrema


def test_dashboard_shows_a_finished_job(embedded_service, finished_job, browser_context, tmp_path):
    svc, job_id = embedded_service, finished_job["id"]
    page = browser_context.new_page()

    page.goto(f"{svc.url}/ui/jobs/{job_id}")
    assert "/ui/login" in page.url  # no key yet
    page.fill("#api_key", "not-a-key")
    page.click("button[type=submit]")
    assert "invalid or revoked API key" in page.inner_text("#login-error")
    page.fill("#api_key", svc.api_key)
    page.click("button[type=submit]")
    page.wait_for_url(f"**/ui/jobs/{job_id}")

    cookie = next(c for c in browser_context.cookies() if c["name"] == "dpc_key")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # not readable from scripts

    assert page.inner_text("#job-status") == "succeeded"
    total = finished_job["progress"]["total_steps"]
    assert page.inner_text("#job-progress") == f"{total} / {total} steps"
    for plot in ("#plot-loss", "#plot-epsilon"):
        points = page.locator(f"{plot} circle.pt")
        assert points.count() >= 2, plot
        assert page.locator(f"{plot} polyline.series").count() == 1
        assert page.locator(plot).bounding_box()["width"] > 300
    rows = page.locator("#ledger tr.ledger-row")
    assert rows.count() == 2
    assert "charged" in rows.all_inner_texts()[0] + rows.all_inner_texts()[1]
    assert float(page.inner_text("#epsilon-composed")) > 0
    assert float(page.inner_text("#epsilon-independent")) > 0
    link = page.locator("a.artifact")
    assert link.inner_text() == "model.tar.gz"
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == "model.tar.gz"

    shot = tmp_path / "job.png"
    page.screenshot(path=str(shot), full_page=True)
    _assert_not_blank(shot)

    page.click("a[href='/ui/datasets']")
    assert page.locator("#datasets tr.dataset").count() >= 1
    assert page.locator("#datasets .bar .spent").first.bounding_box()["width"] > 0
    page.click("a[href='/ui/jobs']")
    page.click("#status-filters >> text=succeeded")
    assert job_id in page.inner_text("#jobs")
    page.click("#status-filters >> text=failed")
    assert job_id not in page.inner_text("#jobs")

    # another tenant: the same job is a 404 page
    page.click("header button")  # log out
    assert "/ui/login" in page.url
    page.fill("#api_key", _other_tenant_key(svc))
    page.click("button[type=submit]")
    response = page.goto(f"{svc.url}/ui/jobs/{job_id}")
    assert response.status == 404 and "Not found" in page.inner_text("h1")

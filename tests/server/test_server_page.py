"""The browser page in headless Chromium (Debian's package, driven by Playwright; never `playwright install`)."""
from __future__ import annotations

import shutil

import pytest

from server.app import create_app
from server.config import ServerConfig
from server_fixtures import LiveServer, make_fake_model, png_bytes

CHROMIUM = shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page_server():
    app = create_app(ServerConfig(max_delay_ms=1), models=[make_fake_model("digits-fake", n_classes=7)])
    srv = LiveServer(app)
    yield srv, app
    srv.close()
    app.extensions["inference"].dispatcher.close()


@pytest.mark.slow
def test_page_shows_top5_bars_and_errors(page_server, tmp_path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `bash scripts/setup.sh` (apt package chromium)")
    from playwright.sync_api import sync_playwright

    srv, app = page_server
    img = tmp_path / "seven.png"
    img.write_bytes(png_bytes(seed=11))
    api = app.test_client().post("/predict", data=img.read_bytes(), content_type="image/png",
                                 query_string={"tta": "hflip"}).get_json()
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_selector("#model option[value='digits-fake']", state="attached")
            page.select_option("#tta", "hflip")
            page.set_input_files("#file", str(img))
            page.wait_for_selector(".result")
            rows = page.locator(".result")
            assert rows.count() == 5
            labels = [rows.nth(i).locator(".label").inner_text() for i in range(5)]
            assert labels == api["predictions"][0]["labels"]
            top_pct = float(rows.nth(0).locator(".pct").inner_text().rstrip("%"))
            assert top_pct == pytest.approx(100 * api["predictions"][0]["probabilities"][0], abs=0.06)
            assert "TTA hflip" in page.inner_text("#meta")
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "not a recognised image" in page.inner_text("#error")
            assert page.locator(".result").count() == 0
        finally:
            browser.close()

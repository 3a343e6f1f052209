"""The dashboard at ``/``: served as a read, and shown by a real headless Chromium over TCP."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SIZES = {"phone": (375, 812, 2, True), "wall": (1920, 1080, 1, False)}  # width, height, scale, mobile


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def token(name: str, role: str, **more: str) -> dict[str, str]:
    """A [[token]] entry whose secret is its own name."""
    return {"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest(), "role": role, **more}


@pytest.mark.parametrize(("path", "tenant_status"), [("/", 200), ("/dashboard/app.js", 200), ("/metrics", 403)])
def test_pages_are_reads_over_tcp(make_daemon, path, tenant_status):
    port = free_port()
    make_daemon(server={"listen": f"127.0.0.1:{port}"},
                token=[token("grafana", "viewer"), token("ci", "tenant", tenant="ci")])
    url = f"http://127.0.0.1:{port}{path}"
    refused = httpx.get(url)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
    assert httpx.get(url, headers={"Authorization": "Bearer grafana"}).status_code == 200
    # The page is only files; the data it fetches is filtered per caller. Metrics name every tenant.
    assert httpx.get(url, headers={"Authorization": "Bearer ci"}).status_code == tenant_status


def test_dashboard_files(daemon):
    page = daemon.request("GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'src="dashboard/app.js"' in page.text and 'href="dashboard/style.css"' in page.text
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css"):  # nothing from elsewhere: hosts may be offline
        assert "://" not in daemon.request("GET", path).text, path
    assert daemon.request("GET", "/dashboard/style.css").headers["content-type"].startswith("text/css")
    missing = daemon.request("GET", "/dashboard/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def show_as(browser, size: str) -> None:
    width, height, scale, mobile = SIZES[size]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile})


def screenshot(browser, path: Path) -> None:
    width = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width, "page scrolls sideways"
    browser.save_screenshot(str(path))


def console_errors(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_dashboard_in_a_browser(make_daemon, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    port = free_port()
    daemon = make_daemon(server={"listen": f"127.0.0.1:{port}", "anonymous": "viewer"})
    first = daemon.lease(labels={"job": "<b>dashboard-test</b>"}, expected_bytes=1 << 20)

    def shows(text: str, element: str = "lease-rows") -> bool:
        return text in browser.find_element(By.ID, element).text

    show_as(browser, "wall")
    browser.get(f"http://127.0.0.1:{port}/?refresh=1")
    WebDriverWait(browser, 10).until(lambda _: shows(first["id"]), "the page never showed the lease")
    assert shows("main", "pool-list") and shows("lease created", "event-list")
    assert shows("job=<b>dashboard-test</b>")  # users' text is shown as text, never run as markup
    screenshot(browser, tmp_path / "wall.png")

    show_as(browser, "phone")
    second = daemon.lease(labels={"job": "second"})  # appears without a reload: the page polls
    WebDriverWait(browser, 10).until(lambda _: shows(second["id"]), "the page did not refresh by itself")
    screenshot(browser, tmp_path / "phone.png")
    assert console_errors(browser) == []

    daemon.stop()  # a daemon that goes away is reported on the page, not in the console
    problem = browser.find_element(By.ID, "problem")
    WebDriverWait(browser, 10).until(lambda _: problem.is_displayed(), "no visible error while the daemon is down")
    assert "Cannot reach scratchd" in problem.text and shows(second["id"])  # the last data stays
    screenshot(browser, tmp_path / "phone-offline.png")
    # Chromium itself logs each refused connection; anything else would be the page's fault.
    assert [e for e in console_errors(browser) if "net::ERR_CONNECTION_REFUSED" not in e["message"]] == []

"""The dashboard at ``/``: served as a read, and shown by a real headless Chromium over TCP."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import wait_for

from scratchd.units import format_size

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


def test_the_page_is_public_its_data_is_not(make_daemon):
    port = free_port()
    make_daemon(
        server={"listen": f"127.0.0.1:{port}", "anonymous": "none"},
        token=[token("grafana", "viewer"), token("ci", "tenant", tenant="ci")],
    )
    url = f"http://127.0.0.1:{port}"
    # A browser must load the page before it can ask for a token: the files hold no data.
    for path, media_type in (
        ("/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ):
        page = httpx.get(url + path)
        assert page.status_code == 200 and page.headers["content-type"].startswith(media_type), path
        assert "default-src 'none'" in page.headers["content-security-policy"]
    refused = httpx.get(url + "/v1/pools")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url + "/v1/pools", headers={"Authorization": "Bearer grafana"}).status_code == 200
    # Metrics name every tenant: readers only, and not tenants.
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer grafana"}).status_code == 200
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer ci"}).status_code == 403


def test_every_401_names_the_bearer_scheme(make_daemon):
    port = free_port()
    make_daemon(
        server={"listen": f"127.0.0.1:{port}", "anonymous": "none"}, token=[token("grafana", "viewer")]
    )
    url = f"http://127.0.0.1:{port}"
    spec = httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer grafana"}).json()
    calls = [
        (method.upper(), path.replace("{lease_id}", "some-lease"))
        for path, item in spec["paths"].items()
        for method in item
        if path not in ("/healthz", "/readyz")
    ]
    calls += [("GET", "/metrics"), ("GET", "/openapi.json")]
    assert ("POST", "/v1/leases") in calls and ("GET", "/v1/usage") in calls
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Z3JhZmFuYQ=="}):
            body = {"ttl_seconds": 60} if method == "POST" else None
            answer = httpx.request(method, url + path, headers=headers, json=body)
            assert answer.status_code == 401, (method, path, headers)
            assert answer.headers.get("www-authenticate", "").startswith("Bearer"), (method, path, headers)


def test_dashboard_files(daemon):
    page = daemon.request("GET", "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'src="dashboard/app.js"' in page.text and 'href="dashboard/style.css"' in page.text
    for path in (
        "/",
        "/dashboard/app.js",
        "/dashboard/style.css",
    ):  # nothing from elsewhere: hosts may be offline
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
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def show_as(browser, size: str) -> None:
    width, height, scale, mobile = SIZES[size]
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
    )


def screenshot(browser, path: Path) -> None:
    width = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width, (
        "page scrolls sideways"
    )
    browser.save_screenshot(str(path))


def console_errors(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def api_answers(browser) -> list[tuple[str, int, str]]:
    """The API answers the page has received since the last call: path, status, WWW-Authenticate."""
    answers = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            path = urlsplit(response["url"]).path
            if path.startswith("/v1/"):
                headers = {name.lower(): value for name, value in response["headers"].items()}
                answers.append((path, response["status"], headers.get("www-authenticate", "")))
    return answers


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
    # Anonymous viewers may read here: no token is asked for, and there is none to forget.
    assert not browser.find_element(By.ID, "sign-in").is_displayed()
    assert not browser.find_element(By.ID, "sign-out").is_displayed()
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
    WebDriverWait(browser, 10).until(
        lambda _: problem.is_displayed(), "no visible error while the daemon is down"
    )
    assert "Cannot reach scratchd" in problem.text and shows(second["id"])  # the last data stays
    screenshot(browser, tmp_path / "phone-offline.png")
    # Chromium itself logs each refused connection; anything else would be the page's fault.
    assert [e for e in console_errors(browser) if "net::ERR_CONNECTION_REFUSED" not in e["message"]] == []


# -- with anonymous = "none": the page asks for a token ---------------------------------------

SECRET = "dashboard-secret"


@dataclass
class Locked:
    daemon: Any
    url: str
    lease: dict[str, Any]


@pytest.fixture
def locked(make_daemon, tmp_path) -> Locked:
    """A daemon that shows nothing over TCP without a token, with a lease in a labelled pool
    and a second pool whose disk is not there (unavailable, missing)."""
    port = free_port()
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    daemon = make_daemon(
        server={"listen": f"127.0.0.1:{port}", "anonymous": "none"},
        token=[token(SECRET, "viewer")],
        pool=[
            {"name": "fast-ssd", "path": str(ssd), "labels": ["nvme", "rack=<b>b7</b>"]},
            {"name": "usb-later", "path": str(tmp_path / "not-mounted-yet"), "labels": ["usb"]},
        ],
    )
    return Locked(daemon, f"http://127.0.0.1:{port}", daemon.lease(labels={"job": "locked-test"}))


def by_id(browser, element_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def until(browser, condition, message: str) -> None:
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(browser, 10).until(lambda _: condition(), message)


def asks_for_a_token(browser) -> bool:
    return by_id(browser, "sign-in").is_displayed()


def shows_lease(browser, lease: dict[str, Any]) -> bool:
    return (
        lease["id"] in by_id(browser, "lease-rows").text and lease["pool"] in by_id(browser, "pool-list").text
    )


def shows_no_data(browser, site: Locked) -> bool:
    source = browser.page_source  # the whole DOM, not only what is visible
    return not any(text in source for text in (site.lease["id"], site.lease["path"], "fast-ssd", "usb-later"))


def stored_token(browser) -> str | None:
    return browser.execute_script("return sessionStorage.getItem('scratchd.token')")


def page_errors(browser) -> list[dict]:
    """Console errors but Chromium's own line for each answer that is not 2xx (the 401s)."""
    return [
        e for e in console_errors(browser) if "the server responded with a status of 401" not in e["message"]
    ]


def test_without_a_token_the_page_asks_for_one_and_shows_no_data(locked, browser):
    browser.get(locked.url + "/?refresh=1")
    until(browser, lambda: asks_for_a_token(browser), "no token prompt")
    assert browser.switch_to.active_element == by_id(browser, "token")  # ready to type into
    label = browser.execute_script("return document.getElementById('token').labels[0].textContent")
    assert label == "Token"
    assert not by_id(browser, "sign-in-error").is_displayed()  # nothing went wrong yet
    assert not by_id(browser, "sign-out").is_displayed() and not by_id(browser, "problem").is_displayed()
    assert shows_no_data(browser, locked)
    answers = api_answers(browser)
    assert answers and {path for path, _, _ in answers} <= {"/v1/usage", "/v1/events"}
    assert all(status == 401 and scheme.startswith("Bearer") for _, status, scheme in answers), answers
    assert page_errors(browser) == []


def test_a_token_typed_in_shows_the_data_across_reloads_until_sign_out(locked, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    browser.get(locked.url + "/?refresh=1")
    until(browser, lambda: asks_for_a_token(browser), "no token prompt")
    by_id(browser, "token").send_keys(SECRET + Keys.ENTER)  # Enter submits
    until(browser, lambda: shows_lease(browser, locked.lease), "the data never showed after signing in")
    assert not asks_for_a_token(browser) and by_id(browser, "sign-out").is_displayed()
    assert stored_token(browser) == SECRET
    assert all(status == 200 for _, status, _ in api_answers(browser) if status != 401)
    screenshot(browser, tmp_path / "signed-in.png")

    browser.refresh()  # the tab keeps the token
    until(browser, lambda: shows_lease(browser, locked.lease), "the data did not show after a reload")
    assert not asks_for_a_token(browser)
    assert {status for _, status, _ in api_answers(browser)} == {200}  # sent from the first request on

    by_id(browser, "sign-out").click()
    until(browser, lambda: asks_for_a_token(browser), "no token prompt after signing out")
    assert stored_token(browser) is None and shows_no_data(browser, locked)
    assert not by_id(browser, "sign-in-error").is_displayed()
    assert page_errors(browser) == []


def test_a_token_in_the_fragment_is_used_and_removed_from_the_address(locked, browser):
    browser.get(f"{locked.url}/?refresh=1#token={SECRET}")
    until(browser, lambda: shows_lease(browser, locked.lease), "the fragment's token was not used")
    href = browser.execute_script("return location.href")
    assert href == f"{locked.url}/?refresh=1" and SECRET not in browser.current_url
    assert stored_token(browser) == SECRET and not asks_for_a_token(browser)
    assert page_errors(browser) == []


def test_a_wrong_token_asks_again_and_says_so(locked, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    browser.get(locked.url + "/?refresh=1")
    until(browser, lambda: asks_for_a_token(browser), "no token prompt")
    by_id(browser, "token").send_keys("not-" + SECRET + Keys.ENTER)
    error = by_id(browser, "sign-in-error")
    until(browser, lambda: error.is_displayed(), "a wrong token gave no visible error")
    assert "refused" in error.text and error.get_attribute("role") == "alert"
    assert asks_for_a_token(browser) and by_id(browser, "token").get_attribute("value") == ""
    assert stored_token(browser) is None and shows_no_data(browser, locked)
    screenshot(browser, tmp_path / "wrong-token.png")

    by_id(browser, "token").send_keys(SECRET + Keys.ENTER)  # the right one still works after a wrong one
    until(browser, lambda: shows_lease(browser, locked.lease), "no data after the right token")
    assert not error.is_displayed()
    assert page_errors(browser) == []


def test_pool_labels_and_why_a_pool_is_not_ok(locked, browser, tmp_path):
    pools = {
        pool["name"]: pool
        for pool in httpx.get(locked.url + "/v1/pools", headers={"Authorization": f"Bearer {SECRET}"}).json()[
            "pools"
        ]
    }
    missing = pools["usb-later"]
    assert (missing["state"], missing["reason"]) == ("unavailable", "missing") and missing["message"]

    show_as(browser, "wall")
    browser.get(f"{locked.url}/?refresh=1#token={SECRET}")
    until(browser, lambda: "usb-later" in by_id(browser, "pool-list").text, "the pools were not shown")
    from selenium.webdriver.common.by import By

    cards = {
        card.find_element(By.TAG_NAME, "h3").text: card
        for card in by_id(browser, "pool-list").find_elements(By.CLASS_NAME, "card")
    }
    ok, broken = cards["fast-ssd"].text, cards["usb-later"].text
    assert "nvme" in ok and "rack=<b>b7</b>" in ok  # labels are text, never markup
    assert "missing" not in ok and not cards["fast-ssd"].find_elements(By.CLASS_NAME, "reason")
    assert "usb" in broken and "unavailable" in broken
    assert "missing" in broken and missing["message"] in broken
    screenshot(browser, tmp_path / "pools.png")
    show_as(browser, "phone")
    screenshot(browser, tmp_path / "pools-phone.png")
    assert page_errors(browser) == []


def test_warm_caches_per_pool_and_the_hit_rate(make_daemon, browser, tmp_path):
    port = free_port()
    daemon = make_daemon(server={"listen": f"127.0.0.1:{port}", "anonymous": "viewer"})
    cold = daemon.lease(cache_key="uv-main")
    Path(cold["path"], "wheels").write_bytes(os.urandom(200_000))
    assert daemon.request("DELETE", f"/v1/leases/{cold['id']}").status_code == 200  # kept
    warm = daemon.lease(cache_key="uv-main")
    assert warm["cache"]["hit"] == "exact"
    assert daemon.request("DELETE", f"/v1/leases/{warm['id']}").status_code == 200  # kept again
    pool = wait_for(
        lambda: (p := daemon.pool("main"))["cache_entries"] == 1 and p["cache_bytes"] >= 200_000 and p,
        what="the kept cache measured",
    )

    show_as(browser, "wall")
    browser.get(f"http://127.0.0.1:{port}/?refresh=1")
    assert (pool["cache_hits_total"], pool["cache_misses_total"]) == (1, 1)
    card = f"caches\n1 · {format_size(pool['cache_bytes'])}\nhit rate\n50%"
    until(browser, lambda: card in by_id(browser, "pool-list").text, "the pool card shows no kept cache")
    stats = by_id(browser, "cache-stats").text
    assert "hit rate\n50%" in stats and "hits\n1" in stats and "misses\n1" in stats, stats
    assert "cache kept" in by_id(browser, "event-list").text
    screenshot(browser, tmp_path / "caches.png")
    show_as(browser, "phone")
    screenshot(browser, tmp_path / "caches-phone.png")
    assert console_errors(browser) == []

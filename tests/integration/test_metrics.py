"""``/metrics`` end to end: a real daemon, scraped and parsed as Prometheus would."""

from __future__ import annotations

import hashlib
import os
import platform
import pwd
import shutil
import signal
import subprocess
from importlib import metadata

import httpx
import pytest
from conftest import needs_root, wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from users import free_port

ME = pwd.getpwuid(os.geteuid()).pw_name


def scrape(daemon) -> list[Sample]:
    response = daemon.request("GET", "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def measured(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample's value, which must be there."""
    found = value(samples, name, **labels)
    assert found is not None, (name, labels)
    return found


def test_lease_counters_follow_leases(daemon):
    first, second = daemon.lease(), daemon.lease(expected_bytes=10**6)
    assert daemon.request("DELETE", f"/v1/leases/{first['id']}").status_code == 200
    daemon.request("POST", f"/v1/leases/{second['id']}/renew", json={"ttl_seconds": 60})  # not a start

    # Compare with /v1/pools once the lease's usage is measured, so neither moves in between.
    wait_for(
        lambda: daemon.request("GET", f"/v1/leases/{second['id']}").json()["usage"]["measured_at"],
        what="the lease's first usage scan",
    )
    [pool] = daemon.request("GET", "/v1/pools").json()["pools"]
    samples = scrape(daemon)
    assert value(samples, "scratchd_leases_created_total", pool="main") == 2
    assert value(samples, "scratchd_leases_ended_total", pool="main", reason="released") == 1
    assert value(samples, "scratchd_leases_ended_total", pool="main", reason="expired") == 0
    assert value(samples, "scratchd_leases_active", pool="main", tenant=ME) == 1
    assert value(samples, "scratchd_pool_up", pool="main") == 1
    for key in ("capacity_bytes", "reserve_bytes", "reserved_bytes", "leased_bytes"):  # as /v1/pools says
        assert value(samples, f"scratchd_pool_{key}", pool="main") == pool[key], key
    assert 0 < pool["reserved_bytes"] <= 10**6
    assert 0 < measured(samples, "scratchd_pool_free_bytes", pool="main") <= pool["capacity_bytes"]
    # The released lease's (empty) tree is deleted in the background.
    wait_for(lambda: value(scrape(daemon), "scratchd_reclaimed_total") == 1, what="reclaimed_total 1")
    samples = scrape(daemon)
    assert value(samples, "scratchd_reclaim_pending") == 0
    assert value(samples, "scratchd_reclaim_pending_bytes") == 0
    assert value(samples, "scratchd_reclaimed_bytes_total") is not None
    # No label carries a lease id: cardinality stays bounded.
    assert not [s for s in samples if first["id"] in repr(s) or second["id"] in repr(s)]


def test_counters_start_from_zero_and_ignore_old_leases_after_restart(daemon):
    kept = daemon.lease()
    daemon.restart()
    daemon.request("POST", f"/v1/leases/{kept['id']}/renew", json={"ttl_seconds": 60})
    samples = scrape(daemon)
    assert value(samples, "scratchd_leases_created_total", pool="main") == 0
    assert value(samples, "scratchd_leases_active", pool="main", tenant=ME) == 1


def test_request_duration_is_labelled_by_route_template(daemon):
    lease = daemon.lease()
    daemon.request("GET", f"/v1/leases/{lease['id']}")
    daemon.request("GET", "/v1/leases/no-such-lease")
    daemon.request("GET", "/no/such/route")
    daemon.request("PATCH", "/v1/pools")
    daemon.request("DELETE", f"/v1/leases/{lease['id']}")  # answered by api.hotpath, labelled all the same

    counts = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for s in scrape(daemon)
        if s.name == "scratchd_request_duration_seconds_count"
    }
    assert counts[("/v1/leases/{lease_id}", "GET", "200")] == 1
    assert counts[("/v1/leases/{lease_id}", "GET", "404")] == 1
    assert counts[("/v1/leases", "POST", "201")] == 1
    assert counts[("/v1/leases/{lease_id}", "DELETE", "200")] == 1
    assert counts[("other", "GET", "404")] == 1
    assert counts[("/v1/pools", "PATCH", "405")] == 1
    assert not [route for route, _, _ in counts if lease["id"] in route or "no-such" in route]
    later = scrape(daemon)
    assert (
        value(later, "scratchd_request_duration_seconds_count", route="/metrics", method="GET", status="200")
        == 1
    )
    buckets = [
        s
        for s in later
        if s.name == "scratchd_request_duration_seconds_bucket" and s.labels["route"] == "/metrics"
    ]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1


def test_openmetrics_when_asked(daemon):
    response = daemon.request(
        "GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_pool_state_and_info_carry_the_reason_and_the_labels(make_daemon, tmp_path):
    main = tmp_path / "main"
    main.mkdir()
    late = tmp_path / "late"  # its disk "not mounted yet": missing until the directory appears
    daemon = make_daemon(
        pool=[
            {"name": "main", "path": str(main), "labels": ["fast", "nvme"]},
            {"name": "late", "path": str(late)},
        ]
    )
    samples = scrape(daemon)
    states = {
        (s.labels["state"], s.labels["reason"]): s.value
        for s in samples
        if s.name == "scratchd_pool_state" and s.labels["pool"] == "late"
    }
    assert len(states) == 8 and sum(states.values()) == 1  # every pair, one of them 1: bounded, never absent
    assert states["unavailable", "missing"] == 1
    assert value(samples, "scratchd_pool_state", pool="main", state="ok", reason="") == 1
    assert value(samples, "scratchd_pool_state", pool="main", state="full", reason="full") == 0
    assert value(samples, "scratchd_pool_up", pool="late") == 0
    [info] = [s for s in samples if s.name == "scratchd_pool_info" and s.labels["pool"] == "main"]
    [pool] = [p for p in daemon.request("GET", "/v1/pools").json()["pools"] if p["name"] == "main"]
    assert info.value == 1 and info.labels == {
        "pool": "main",
        "path": str(main),
        "mount_point": pool["mount_point"],
        "fstype": pool["fstype"],
        "labels": "fast,nvme",
    }
    assert (
        value(
            samples, "scratchd_pool_info", pool="late", path=str(late), mount_point="", fstype="", labels=""
        )
        == 1
    )

    late.mkdir()
    wait_for(
        lambda: value(scrape(daemon), "scratchd_pool_state", pool="late", state="ok", reason="") == 1,
        what="the late pool to come up",
    )
    assert (
        value(scrape(daemon), "scratchd_pool_state", pool="late", state="unavailable", reason="missing") == 0
    )


def test_build_info_and_process_metrics(daemon):
    samples = scrape(daemon)
    assert (
        value(
            samples,
            "scratchd_build_info",
            version=metadata.version("scratchd"),
            python=platform.python_version(),
        )
        == 1
    )
    assert measured(samples, "process_resident_memory_bytes") > 0
    assert measured(samples, "process_open_fds") > 0
    assert measured(samples, "process_start_time_seconds") > 0
    assert [s for s in samples if s.name == "python_info"]


def tenant_tokens(*tenants):
    tokens = {tenant: f"token-of-{tenant}" for tenant in tenants}
    return tokens, [
        {
            "name": tenant,
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "role": "tenant",
            "tenant": tenant,
        }
        for tenant, token in tokens.items()
    ]


def test_tenants_beyond_the_busiest_are_summed_as_other(make_daemon):
    tokens, entries = tenant_tokens("a", "b", "c")
    daemon = make_daemon(server={"listen": f"127.0.0.1:{free_port()}"}, token=entries, metrics={"tenants": 1})
    for tenant, count in (("a", 3), ("b", 2), ("c", 1)):
        for _ in range(count):
            response = httpx.post(
                f"http://{daemon.config['server']['listen']}/v1/leases",
                json={},
                timeout=10,
                headers={"authorization": f"Bearer {tokens[tenant]}"},
            )
            assert response.status_code == 201, response.text

    def active() -> dict[str, float]:
        return {s.labels["tenant"]: s.value for s in scrape(daemon) if s.name == "scratchd_leases_active"}

    assert active() == {"a": 3, "other": 3}
    for tenants, expected in (
        (2, {"a": 3, "b": 2, "other": 1}),
        (0, {"other": 6}),
        (3, {"a": 3, "b": 2, "c": 1}),
    ):
        daemon.config["metrics"] = {"tenants": tenants}
        daemon.write_config()
        daemon.process.send_signal(signal.SIGHUP)

        def reloaded(expected: dict[str, int] = expected) -> bool:
            return active() == expected

        wait_for(reloaded, what=f"[metrics] tenants = {tenants} after the reload")


@needs_root
@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr (e2fsprogs) is not installed")
def test_a_failed_deletion_is_counted_per_pool(daemon):
    assert value(scrape(daemon), "scratchd_reclaim_failed_total", pool="main") == 0
    lease = daemon.lease()
    stuck = os.path.join(lease["path"], "stuck")
    open(stuck, "w").close()
    if subprocess.run(["chattr", "+i", stuck], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag (chattr +i)")
    try:
        assert daemon.request("DELETE", f"/v1/leases/{lease['id']}").status_code == 200
        wait_for(
            lambda: (value(scrape(daemon), "scratchd_reclaim_failed_total", pool="main") or 0) >= 1,
            what="the failed deletion to be counted",
        )
    finally:  # the retries then delete it, and pytest can clean up
        subprocess.run(["chattr", "-R", "-i", daemon.pool_path], capture_output=True)
    wait_for(
        lambda: value(scrape(daemon), "scratchd_reclaimed_total") == 1,
        timeout=15,
        what="the retry to succeed",
    )


def test_reclaimed_bytes_count_what_short_leases_held(daemon):
    """Leases released before any usage scan: the bytes are what deletion freed, rm's share of a big tree too."""

    def reclaimed() -> tuple[float, int]:
        usage = daemon.request("GET", "/v1/usage").json()["reclaim"]
        return measured(scrape(daemon), "scratchd_reclaimed_bytes_total"), usage["reclaimed_bytes_total"]

    before = reclaimed()
    ended = []
    big = daemon.lease()  # more entries than the deleter walks before handing the rest to rm
    for i in range(3000):
        with open(os.path.join(big["path"], f"f{i}"), "wb") as f:
            f.write(os.urandom(4096))
    ended.append(daemon.request("DELETE", f"/v1/leases/{big['id']}").json())
    for _ in range(20):
        lease = daemon.lease()
        with open(os.path.join(lease["path"], "data"), "wb") as f:
            f.write(os.urandom(1 << 20))
        ended.append(daemon.request("DELETE", f"/v1/leases/{lease['id']}").json())
    assert [lease["usage"]["measured_at"] for lease in ended[1:]] == [None] * 20, "measured before release"

    expected = 20 * (1 << 20) + 3000 * 4096
    wait_for(
        lambda: (value(scrape(daemon), "scratchd_reclaimed_total") or 0) >= 21, what="every tree deleted"
    )
    after = reclaimed()
    assert after[0] - before[0] >= expected, (before, after)
    assert after[1] - before[1] >= expected, (before, after)
    assert after[0] == after[1]

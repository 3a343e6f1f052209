"""``/metrics`` end to end: a real daemon, scraped and parsed as Prometheus would."""

from __future__ import annotations

import os
import pwd

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from conftest import wait_for

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


def test_lease_counters_follow_leases(daemon):
    first, second = daemon.lease(), daemon.lease(expected_bytes=10**6)
    assert daemon.request("DELETE", f"/v1/leases/{first['id']}").status_code == 200
    daemon.request("POST", f"/v1/leases/{second['id']}/renew", json={"ttl_seconds": 60})  # not a start

    # Compare with /v1/pools once the lease's usage is measured, so neither moves in between.
    wait_for(lambda: daemon.request("GET", f"/v1/leases/{second['id']}").json()["usage"]["measured_at"],
             what="the lease's first usage scan")
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
    assert 0 < value(samples, "scratchd_pool_free_bytes", pool="main") <= pool["capacity_bytes"]
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

    counts = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
              for s in scrape(daemon) if s.name == "scratchd_request_duration_seconds_count"}
    assert counts[("/v1/leases/{lease_id}", "GET", "200")] == 1
    assert counts[("/v1/leases/{lease_id}", "GET", "404")] == 1
    assert counts[("/v1/leases", "POST", "201")] == 1
    assert counts[("/v1/leases/{lease_id}", "DELETE", "200")] == 1
    assert counts[("other", "GET", "404")] == 1
    assert counts[("/v1/pools", "PATCH", "405")] == 1
    assert not [route for route, _, _ in counts if lease["id"] in route or "no-such" in route]
    later = scrape(daemon)
    assert value(later, "scratchd_request_duration_seconds_count", route="/metrics", method="GET", status="200") == 1
    buckets = [s for s in later if s.name == "scratchd_request_duration_seconds_bucket"
               and s.labels["route"] == "/metrics"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1


def test_openmetrics_when_asked(daemon):
    response = daemon.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")

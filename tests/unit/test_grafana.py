"""deploy/grafana/scratchd.json: importable, and every query asks for what the daemon exports.

The exported names and labels come from scraping a real daemon, so renaming a metric
without fixing the dashboard fails here, not on someone's wall screen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "scratchd.json"
METRIC = re.compile(r"\bscratchd_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(scratchd_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\([^,]+,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture
def exported(daemon) -> dict[str, set[str]]:
    """Sample name -> label names, from a daemon with a lease and some requests behind it."""
    daemon.lease()
    text = daemon.request("GET", "/metrics").text
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        assert family.samples, f"{family.name} has no samples: this check would be blind to it"
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def queries(node: Any) -> Iterator[str]:
    """Every PromQL text in the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def labels_used(query: str) -> set[str]:
    used = {name for _, matchers in SELECTOR.findall(query) for name in MATCHER.findall(matchers)}
    used |= {
        label.strip() for group in GROUPING.findall(query) for label in group.split(",") if label.strip()
    }
    return used | set(LABEL_VALUES.findall(query))


def test_dashboard_is_importable(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert (
            set(panel["gridPos"]) == {"x", "y", "w", "h"}
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # A datasource variable, not a UID from one Grafana: the file imports anywhere.
            assert target["datasource"]["uid"] == "${datasource}"
            assert METRIC.search(target["expr"]), (panel["title"], target["expr"])
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}


def test_every_query_uses_exported_metrics_and_labels(dashboard, exported):
    found = list(queries(dashboard))
    assert len(found) >= len(dashboard["panels"])
    for query in found:
        names = set(METRIC.findall(query))
        assert names <= set(exported), (query, names - set(exported))
        known = set().union(*(exported[name] for name in names)) | TARGET_LABELS
        assert labels_used(query) <= known, (query, labels_used(query) - known)


def test_dashboard_covers_the_spec_metrics(dashboard):
    used = {name for query in queries(dashboard) for name in METRIC.findall(query)}
    for metric in (
        "scratchd_pool_free_bytes",
        "scratchd_pool_capacity_bytes",
        "scratchd_leases_active",
        "scratchd_leases_ended_total",
        "scratchd_reclaim_pending",
        "scratchd_request_duration_seconds_bucket",
    ):
        assert metric in used, metric

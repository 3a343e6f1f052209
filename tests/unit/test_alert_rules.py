"""deploy/prometheus/scratchd.rules.yml: valid to promtool, tested by promtool, about real metrics,
and shipped unchanged as the PrometheusRule in deploy/kubernetes/prometheusrule.yaml.

promtool comes with Prometheus (Debian: ``apt-get install prometheus``); without it the
promtool checks skip and say so. The PrometheusRule is a custom resource, so the offline
Kubernetes schemas do not know it: its rules are checked by promtool, its envelope and
fields here against what the Prometheus Operator's CRD accepts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_grafana import MATCHER, METRIC, SELECTOR, TARGET_LABELS, exported  # noqa: F401 - exported is a fixture

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "scratchd.rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "scratchd.rules.test.yml"
PROMETHEUS_RULE = REPO / "deploy" / "kubernetes" / "prometheusrule.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
# The Operator's CRD (monitoring.coreos.com/v1 PrometheusRule): the fields a group and a rule may have.
GROUP_FIELDS = {"name", "interval", "rules", "limit", "labels", "partial_response_strategy", "query_offset"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)


def promtool(*args: str, cwd: Path = RULES.parent) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    promtool("check", "rules", str(RULES))


@needs_promtool
def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    promtool("test", "rules", RULES_TEST.name)
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in rules()}, "every alert is shown firing at least once"


def test_rules_ask_for_what_the_daemon_exports(exported: dict[str, set[str]]) -> None:  # noqa: F811
    for rule in rules():
        query = rule["expr"]
        names = set(METRIC.findall(query))
        assert names <= set(exported), (rule["alert"], names - set(exported))
        known = set().union(*(exported[name] for name in names)) | TARGET_LABELS
        used = {name for _, matchers in SELECTOR.findall(query) for name in MATCHER.findall(matchers)}
        used |= {
            label.strip() for group in GROUPING.findall(query) for label in group.split(",") if label.strip()
        }
        assert used <= known, (rule["alert"], used - known)
        templated = set(re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())))
        assert templated <= known, (rule["alert"], templated - known)


def test_every_alert_has_a_severity_and_words() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_prometheus_rule_ships_the_same_groups() -> None:
    (obj,) = [doc for doc in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if doc]
    assert (obj["apiVersion"], obj["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"} and set(obj["spec"]) == {"groups"}
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "scratchd"
    assert all(isinstance(v, str) for v in obj["metadata"]["labels"].values())
    assert obj["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_prometheus_rule_fields_are_what_the_crd_accepts() -> None:
    (obj,) = [doc for doc in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if doc]
    groups = obj["spec"]["groups"]
    assert len({group["name"] for group in groups}) == len(groups)  # a list map keyed by name
    for group in groups:
        assert set(group) <= GROUP_FIELDS and group["name"], group.get("name")
        for rule in group["rules"]:
            assert set(rule) <= RULE_FIELDS and ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str)
            assert DURATION.match(rule.get("for", "0")), rule["alert"]
            for field in ("labels", "annotations"):
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in rule.get(field, {}).items())


@needs_promtool
def test_promtool_checks_the_prometheus_rules_embedded_groups(tmp_path: Path) -> None:
    (obj,) = [doc for doc in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if doc]
    embedded = tmp_path / "embedded.rules.yml"
    embedded.write_text(yaml.safe_dump({"groups": obj["spec"]["groups"]}))
    promtool("check", "rules", str(embedded))

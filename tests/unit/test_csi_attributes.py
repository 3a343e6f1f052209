"""A CSI volume's attributes read into a lease request (docs/kubernetes.md, "Volume attributes")."""

from __future__ import annotations

import pytest

from scratchd.csi.attributes import (
    EPHEMERAL,
    POD_NAME,
    POD_NAMESPACE,
    POD_UID,
    BadAttribute,
    Volume,
    parse,
    quantity,
)

KUBELET = {
    POD_NAMESPACE: "ci",
    POD_NAME: "build-7",
    POD_UID: "0b5e",
    EPHEMERAL: "true",
    "csi.storage.k8s.io/serviceAccount.name": "default",
}


def volume(**attributes: str) -> Volume:
    return parse({**KUBELET, **attributes}, own_labels=8)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64Mi", 64 * 2**20),
        ("20G", 20 * 10**9),
        ("1.5Gi", 3 * 2**29),
        ("512", 512),
        ("1k", 1000),
        ("2Ki", 2048),
        ("1e3", 1000),
        ("1E6", 10**6),
        ("0.5", 1),  # rounded up, as Kubernetes does
        ("1500m", 2),
    ],
)
def test_kubernetes_quantities(text: str, size: int) -> None:
    assert quantity(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1Gi", "1 Gi", "1GB", "1.2.3", "Mi", "1e99"])
def test_not_a_quantity(text: str) -> None:
    with pytest.raises(ValueError):
        quantity(text)


def test_every_attribute_maps_to_the_request() -> None:
    parsed = volume(
        pool="ssd",
        maxSize="20Gi",
        expectSize="2G",
        idleTimeout="15m",
        evictable="true",
        cacheKey="uv-main",
        cacheFallback="uv-, uv",
        keep="never",
        labels="team=build, job=42",
    )
    assert parsed.pod.tenant == "k8s:ci"
    request = parsed.lease_request({"csi.scratchd.dev/node": "n1"}, ttl_seconds=3600)
    assert request == {
        "tenant": "k8s:ci",
        "ttl_seconds": 3600,
        "pool": "ssd",
        "max_bytes": 20 * 2**30,
        "expected_bytes": 2 * 10**9,
        "idle_timeout_seconds": 900,
        "evictable": True,
        "cache_key": "uv-main",
        "cache_fallback": ["uv-", "uv"],
        "labels": {"team": "build", "job": "42", "csi.scratchd.dev/node": "n1"},
    }
    assert parsed.keep is False


def test_defaults() -> None:
    plain = volume()
    assert plain.lease_request({}, 60) == {"tenant": "k8s:ci", "ttl_seconds": 60, "labels": {}}
    assert plain.keep is False
    assert volume(cacheKey="k").keep is True  # a cache key keeps by default


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"colour": "blue"}, "colour"),
        ({"maxSize": "0"}, "maxSize"),
        ({"maxSize": "big"}, "maxSize"),
        ({"expectSize": "-1"}, "expectSize"),
        ({"idleTimeout": "0s"}, "idleTimeout"),
        ({"idleTimeout": "later"}, "idleTimeout"),
        ({"evictable": "True"}, "evictable"),
        ({"cacheKey": "-leading-dash"}, "cacheKey"),
        ({"cacheKey": "k", "cacheFallback": "a,,b"}, "cacheFallback"),
        ({"cacheKey": "k", "cacheFallback": ",".join("abcdefghi")}, "cacheFallback"),
        ({"keep": "sometimes", "cacheKey": "k"}, "keep"),
        ({"keep": "always"}, "keep"),  # nothing to keep without a key
        ({"labels": "novalue"}, "labels"),
        ({"labels": "Upper=1"}, "labels"),
        ({"labels": "csi.scratchd.dev/node=x"}, "labels"),
        ({"labels": ",".join(f"k{i}=v" for i in range(25))}, "labels"),  # 24 is the room left
        ({"pool": ""}, "pool"),
        ({EPHEMERAL: "false"}, EPHEMERAL),
        ({POD_NAMESPACE: ""}, POD_NAMESPACE),
        ({POD_NAMESPACE: "n" * 63}, POD_NAMESPACE),  # k8s:<63> is longer than a tenant name
    ],
)
def test_a_bad_attribute_names_itself(attributes: dict[str, str], named: str) -> None:
    with pytest.raises(BadAttribute) as caught:
        volume(**attributes)
    assert caught.value.name == named and named in str(caught.value)


def test_the_kubelets_own_keys_are_never_refused() -> None:
    assert volume(**{"csi.storage.k8s.io/serviceAccount.tokens": "{}"}).pod.uid == "0b5e"

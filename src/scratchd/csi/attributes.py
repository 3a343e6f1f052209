"""A CSI volume's ``volumeAttributes`` read into a lease request (docs/kubernetes.md, "Volume attributes").

Pure: the plugin hands in the map the kubelet sent and gets the request's fields, or a
``BadAttribute`` naming the attribute, which it answers as ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from scratchd.units import UnitError, parse_duration

KUBELET_PREFIX = "csi.storage.k8s.io/"  # the kubelet's own keys: read, never refused
POD_NAMESPACE = KUBELET_PREFIX + "pod.namespace"
POD_NAME = KUBELET_PREFIX + "pod.name"
POD_UID = KUBELET_PREFIX + "pod.uid"
EPHEMERAL = KUBELET_PREFIX + "ephemeral"

# Labels the plugin puts on every lease; a pod's own labels may not use the prefix.
LABEL_PREFIX = "csi.scratchd.dev/"
MAX_LABELS = 32  # the daemon's limit (docs/api.md, "Requests")
_LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9_./-]{0,62}")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f]")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
_CACHE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,127}")
MAX_FALLBACKS = 8
MAX_IDLE_SECONDS = 10 * 365 * 86400
MAX_BYTES = 2**53 - 1

KEEPS = ("always", "never")
ATTRIBUTES = (
    "pool",
    "maxSize",
    "expectSize",
    "idleTimeout",
    "evictable",
    "cacheKey",
    "cacheFallback",
    "keep",
    "labels",
)

# Kubernetes quantities (resource.Quantity): binary and decimal suffixes, or an exponent.
_QUANTITY = re.compile(r"(\d+)(?:\.(\d*))?(Ki|Mi|Gi|Ti|Pi|Ei|[kMGTPE]|m|[eE][+-]?\d+)?")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18, "m": -3}


class BadAttribute(ValueError):
    """An attribute the plugin does not know, or a value it cannot take; ``name`` is the attribute."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"volume attribute {name!r}: {problem}")
        self.name = name


@dataclass(frozen=True, slots=True)
class Pod:
    """The pod a volume is published for, as the kubelet says (``podInfoOnMount``)."""

    namespace: str
    name: str
    uid: str

    @property
    def tenant(self) -> str:
        return f"k8s:{self.namespace}"


@dataclass(frozen=True, slots=True)
class Volume:
    """What a pod spec asked of its volume."""

    pod: Pod
    pool: str | None = None
    max_bytes: int | None = None
    expected_bytes: int | None = None
    idle_timeout_seconds: int | None = None
    evictable: bool = False
    cache_key: str | None = None
    cache_fallback: tuple[str, ...] = ()
    keep: bool = False  # keep a warm cache when the volume is unpublished
    labels: dict[str, str] = field(default_factory=dict)

    def lease_request(self, own_labels: dict[str, str], ttl_seconds: int) -> dict[str, object]:
        """The ``POST /v1/leases`` body: on behalf of the pod's namespace, the plugin's labels on top."""
        body: dict[str, object] = {
            "tenant": self.pod.tenant,
            "ttl_seconds": ttl_seconds,
            "labels": {**self.labels, **own_labels},
        }
        optional = {
            "pool": self.pool,
            "max_bytes": self.max_bytes,
            "expected_bytes": self.expected_bytes,
            "idle_timeout_seconds": self.idle_timeout_seconds,
            "cache_key": self.cache_key,
        }
        body.update((name, value) for name, value in optional.items() if value is not None)
        if self.evictable:
            body["evictable"] = True
        if self.cache_fallback:
            body["cache_fallback"] = list(self.cache_fallback)
        return body


def parse(context: dict[str, str], own_labels: int) -> Volume:
    """The volume ``context`` (a publish request's ``volume_context``) describes.

    ``own_labels`` is how many labels the plugin adds: a pod's own may use the rest.
    """
    unknown = sorted(k for k in context if k not in ATTRIBUTES and not k.startswith(KUBELET_PREFIX))
    if unknown:
        raise BadAttribute(unknown[0], f"unknown (known: {', '.join(ATTRIBUTES)})")
    if context.get(EPHEMERAL, "true") != "true":
        raise BadAttribute(
            EPHEMERAL, "only ephemeral inline volumes are served (volumeLifecycleModes: Ephemeral)"
        )
    pod = _pod(context)
    cache_key = _cache_key("cacheKey", context["cacheKey"]) if "cacheKey" in context else None
    keep = context.get("keep", "always" if cache_key else "never")
    if keep not in KEEPS:
        raise BadAttribute("keep", f"{keep!r} is neither 'always' nor 'never'")
    if keep == "always" and cache_key is None:
        raise BadAttribute("keep", "'always' keeps a warm cache, which needs a cacheKey")
    evictable = context.get("evictable", "false")
    if evictable not in ("true", "false"):
        raise BadAttribute("evictable", f"{evictable!r} is neither 'true' nor 'false'")
    return Volume(
        pod=pod,
        pool=_pool(context["pool"]) if "pool" in context else None,
        max_bytes=_bytes("maxSize", context["maxSize"], minimum=1) if "maxSize" in context else None,
        expected_bytes=_bytes("expectSize", context["expectSize"], minimum=0)
        if "expectSize" in context
        else None,
        idle_timeout_seconds=_idle(context["idleTimeout"]) if "idleTimeout" in context else None,
        evictable=evictable == "true",
        cache_key=cache_key,
        cache_fallback=_fallbacks(context["cacheFallback"]) if "cacheFallback" in context else (),
        keep=keep == "always",
        labels=_labels(context.get("labels", ""), MAX_LABELS - own_labels),
    )


def quantity(text: str) -> int:
    """A Kubernetes quantity as a whole number, rounded up as Kubernetes does: ``64Mi``, ``20G`` (20·10⁹), ``1.5Gi``."""
    match = _QUANTITY.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 512Mi, 20G)")
    whole, fraction, suffix = match.group(1), match.group(2) or "", match.group(3) or ""
    numerator, denominator = int(whole + fraction), 10 ** len(fraction)
    if suffix in _BINARY:
        numerator *= 1024 ** _BINARY[suffix]
    else:
        exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:] or 0)
        if exponent > 30:
            raise ValueError(f"{text!r} is too large")
        if exponent >= 0:
            numerator *= 10**exponent
        else:
            denominator *= 10**-exponent
    return -(-numerator // denominator)


def _pod(context: dict[str, str]) -> Pod:
    namespace = context.get(POD_NAMESPACE, "")
    if not namespace:
        raise BadAttribute(POD_NAMESPACE, "missing: the CSIDriver must say podInfoOnMount: true")
    pod = Pod(namespace, context.get(POD_NAME, ""), context.get(POD_UID, ""))
    if not _TENANT.fullmatch(pod.tenant):
        raise BadAttribute(POD_NAMESPACE, f"{namespace!r} does not make a tenant name ({pod.tenant!r})")
    return pod


def _pool(value: str) -> str:
    if not 1 <= len(value) <= 64:
        raise BadAttribute("pool", "a pool's name is 1 to 64 characters")
    return value


def _bytes(name: str, value: str, minimum: int) -> int:
    try:
        size = quantity(value)
    except ValueError as exc:
        raise BadAttribute(name, str(exc)) from None
    if not minimum <= size <= MAX_BYTES:
        raise BadAttribute(name, f"{value!r} is out of range ({minimum} to {MAX_BYTES} bytes)")
    return size


def _idle(value: str) -> int:
    try:
        seconds = parse_duration(value)
    except UnitError as exc:
        raise BadAttribute("idleTimeout", str(exc)) from None
    whole = -int(-seconds // 1)
    if not 1 <= whole <= MAX_IDLE_SECONDS:
        raise BadAttribute("idleTimeout", f"{value!r} is out of range (1s to 10 years)")
    return whole


def _cache_key(name: str, value: str) -> str:
    if not _CACHE_KEY.fullmatch(value):
        raise BadAttribute(name, f"{value[:80]!r} must match {_CACHE_KEY.pattern}")
    return value


def _fallbacks(value: str) -> tuple[str, ...]:
    prefixes = tuple(part.strip() for part in value.split(","))
    if len(prefixes) > MAX_FALLBACKS:
        raise BadAttribute("cacheFallback", f"at most {MAX_FALLBACKS} prefixes")
    return tuple(_cache_key("cacheFallback", prefix) for prefix in prefixes)


def _labels(value: str, room: int) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in value.split(","))):
        key, equals, text = pair.partition("=")
        key = key.strip()
        if not equals:
            raise BadAttribute("labels", f"{pair[:80]!r} is not k=v")
        if not _LABEL_KEY.fullmatch(key):
            raise BadAttribute("labels", f"key {key[:80]!r} must match {_LABEL_KEY.pattern}")
        if key.startswith(LABEL_PREFIX):
            raise BadAttribute("labels", f"keys under {LABEL_PREFIX} are the plugin's own")
        if len(text) > 256 or _UNPRINTABLE.search(text):
            raise BadAttribute("labels", f"label {key!r}: at most 256 printable characters")
        labels[key] = text
    if len(labels) > room:
        raise BadAttribute("labels", f"at most {room} labels (the plugin adds its own)")
    return labels

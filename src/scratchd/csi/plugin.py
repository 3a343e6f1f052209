"""The CSI node plugin (docs/kubernetes.md): a pod's ephemeral inline volume is a lease, bind-mounted.

The kubelet calls NodePublishVolume when a pod with a ``csi.scratchd.dev`` volume
starts on this node and NodeUnpublishVolume when it goes. The plugin is a broker: it
leases on behalf of tenant ``k8s:<namespace>`` through the daemon's socket like any
client, renews while the volume is published, and releases at unpublish. The daemon's
records are the truth: every lease carries labels naming this node, the volume and its
target, so a restarted plugin finds its volumes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from scratchd.client import Client, DaemonUnreachable, ScratchdError
from scratchd.csi import attributes, binds
from scratchd.csi.proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger("scratchd.csi")

DRIVER = "csi.scratchd.dev"
P = attributes.LABEL_PREFIX
NODE, VOLUME_ID, TARGET, DIGEST, KEEP = (
    P + "node",
    P + "volume-id",
    P + "target-path",
    P + "attributes",
    P + "keep",
)
POD_NAMESPACE, POD_NAME, POD_UID = P + "pod-namespace", P + "pod-name", P + "pod-uid"
OWN_LABELS = 8
LONGEST_TTL = 10 * 365 * 86400  # asked for until the daemon says its limit
RETRY_SECONDS = 2.0  # after the daemon did not answer a renew, or the start-up recovery
EVENTS_SECONDS = 2.0  # how often the lease ends the daemon reports are read
RECOVERY_WAIT_SECONDS = 10.0  # the longest a call waits for the start-up recovery
DAEMON_TIMEOUT_SECONDS = 10.0
READ_ONLY_MODES = (
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY,
    csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY,
)


class Failure(Exception):
    """A call's answer when it is not OK: a gRPC status code and a sentence."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refusal(error: ScratchdError) -> Failure:
    """The daemon's refusal as the kubelet should see it: retry (UNAVAILABLE), give up, or fix the pod."""
    if isinstance(error, DaemonUnreachable):
        return Failure(grpc.StatusCode.UNAVAILABLE, error.message)
    code = {
        "quota_exceeded": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "insufficient_storage": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "pool_not_found": grpc.StatusCode.INVALID_ARGUMENT,
        "pool_unavailable": grpc.StatusCode.UNAVAILABLE,
    }.get(error.code, grpc.StatusCode.INTERNAL)
    return Failure(code, f"scratchd: {error.code}: {error.message}")


@dataclass(slots=True)
class Published:
    """A volume this node serves: its lease, where it is mounted, and when to renew."""

    volume_id: str
    target: str
    digest: str
    lease_id: str
    path: str
    keep: bool | None  # None: the lease has no cache key, so the release says nothing of keeping
    ttl_seconds: int
    renew_at: float  # monotonic
    ended: bool = False

    @classmethod
    def of(cls, lease: dict[str, Any], now: float) -> Published:
        labels = lease["labels"]
        keep = labels.get(KEEP)
        return cls(
            volume_id=labels[VOLUME_ID],
            target=labels[TARGET],
            digest=labels.get(DIGEST, ""),
            lease_id=lease["id"],
            path=lease["path"],
            keep=None if keep is None else keep == "true",
            ttl_seconds=lease["ttl_seconds"],
            renew_at=now + lease["ttl_seconds"] / 3,
        )


class Plugin:
    """The volumes of one node, and the daemon behind them; thread-safe (gRPC calls run in a pool)."""

    def __init__(
        self, node_id: str, connect: Callable[[], Client], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.node_id = node_id
        self._connect = connect
        self._clock = clock
        self._local = threading.local()
        self._volumes: dict[str, Published] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._max_ttl: dict[str, int] = {}  # by tenant; "" is the daemon's own limit
        self._recovered = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._events_since: int | None = None

    # -- the daemon ---------------------------------------------------------------------

    def client(self) -> Client:
        """This thread's client: a ``Client`` is not shared between threads."""
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._connect()
        return client

    def ready(self) -> bool:
        """Probe: the daemon answers and the volumes published before a restart are known again."""
        try:
            self.client().health()
        except ScratchdError:
            return False
        return self._recovered.is_set()

    # -- publish and unpublish --------------------------------------------------------------

    def publish(self, request: csi_pb2.NodePublishVolumeRequest) -> None:
        volume_id, target = request.volume_id, request.target_path
        if not volume_id or not target.startswith("/"):
            raise Failure(
                grpc.StatusCode.INVALID_ARGUMENT, "volume_id and an absolute target_path are required"
            )
        group = _mount_group(request)
        try:
            volume = attributes.parse(dict(request.volume_context), OWN_LABELS)
        except attributes.BadAttribute as exc:
            raise Failure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        digest = _digest(request, group)
        self._wait_recovered()
        with self._volume_lock(volume_id):
            known = self._volumes.get(volume_id)
            if known is not None:
                if (known.target, known.digest) != (target, digest):
                    raise Failure(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"volume {volume_id} is published at {known.target} with other attributes or target",
                    )
                if not binds.is_mount(target):
                    self._mount(known.path, target, group)
                return
            labels = {
                NODE: self.node_id,
                VOLUME_ID: volume_id,
                TARGET: target,
                DIGEST: digest,
                POD_NAMESPACE: volume.pod.namespace,
                POD_NAME: volume.pod.name,
                POD_UID: volume.pod.uid,
            }
            if volume.cache_key is not None:
                labels[KEEP] = "true" if volume.keep else "false"
            lease = self._create(volume, labels)
            published = Published.of(lease, self._clock())
            try:
                self._mount(published.path, target, group)
            except Failure:
                self._release(published, keep=False)
                raise
            self._volumes[volume_id] = published
        self._wake.set()
        log.info(
            "volume published",
            extra={
                "volume": volume_id,
                "lease": published.lease_id,
                "target": target,
                "tenant": volume.pod.tenant,
            },
        )

    def unpublish(self, request: csi_pb2.NodeUnpublishVolumeRequest) -> None:
        volume_id, target = request.volume_id, request.target_path
        if not volume_id or not target:
            raise Failure(grpc.StatusCode.INVALID_ARGUMENT, "volume_id and target_path are required")
        self._wait_recovered()
        with self._volume_lock(volume_id):
            self._unmount(target)
            known = self._volumes.get(volume_id)
            if known is None or known.target != target:
                return  # unknown, or gone already: nothing of ours is left there
            self._release(known, keep=known.keep)
            del self._volumes[volume_id]
        log.info(
            "volume unpublished", extra={"volume": volume_id, "lease": known.lease_id, "kept": known.keep}
        )

    def _create(self, volume: attributes.Volume, labels: dict[str, str]) -> dict[str, Any]:
        """Lease for the longest TTL allowed: asked for a longer one, the daemon names its limit."""
        tenant = volume.pod.tenant
        while True:
            ttl = min(self._max_ttl.get(tenant, LONGEST_TTL), self._max_ttl.get("", LONGEST_TTL))
            try:
                return self.client().create_lease(**volume.lease_request(labels, ttl))
            except ScratchdError as exc:
                details = exc.details if isinstance(exc.details, dict) else {}
                limit = details.get("max_ttl")
                if not isinstance(limit, int) or not 1 <= limit < ttl:
                    raise refusal(exc) from None
                self._max_ttl["" if exc.code == "invalid_request" else tenant] = limit

    def _mount(self, path: str, target: str, group: int | None) -> None:
        """Hand the lease's root to the pod (its fsGroup, else everyone) and bind it at the target."""
        created = not os.path.exists(target)
        try:
            if group is None:
                os.chmod(path, 0o777)
            else:
                os.chown(path, -1, group)
                os.chmod(path, 0o2770)
            binds.bind(path, target)
        except OSError as exc:
            if created:
                binds.remove_target(target)
            raise Failure(grpc.StatusCode.INTERNAL, f"cannot mount the lease at {target}: {exc}") from None

    def _unmount(self, target: str) -> None:
        try:
            binds.unbind(target)
            binds.remove_target(target)
        except OSError as exc:
            raise Failure(grpc.StatusCode.INTERNAL, f"cannot unmount {target}: {exc}") from None

    def _release(self, published: Published, keep: bool | None) -> None:
        query = "" if keep is None else f"?keep={'true' if keep else 'false'}"
        try:
            self.client().request("DELETE", f"/v1/leases/{published.lease_id}{query}")
        except ScratchdError as exc:
            if exc.code != "lease_not_found":
                raise refusal(exc) from None

    @contextmanager
    def _volume_lock(self, volume_id: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(volume_id, threading.Lock())
        with lock:
            yield
        with self._guard:
            if volume_id not in self._volumes and not lock.locked():
                self._locks.pop(volume_id, None)

    def _wait_recovered(self) -> None:
        if not self._recovered.wait(RECOVERY_WAIT_SECONDS):
            raise Failure(
                grpc.StatusCode.UNAVAILABLE,
                "scratchd is unreachable: the published volumes are not known yet",
            )

    # -- in the background ------------------------------------------------------------------

    def recover(self) -> None:
        """Find this node's volumes again from their leases' labels; release those no longer mounted."""
        client = self.client()
        found = client.list_leases(label=f"{NODE}={self.node_id}")["leases"]
        if self._events_since is None:
            newest = client.events(order="desc", limit=1)["events"]
            self._events_since = newest[0]["seq"] if newest else 0
        now = self._clock()
        for lease in found:
            published = Published.of(lease, now)
            if binds.is_mount(published.target):
                with self._guard:
                    self._volumes.setdefault(published.volume_id, published)
                continue
            log.warning(
                "volume no longer mounted: its lease is released",
                extra={
                    "volume": published.volume_id,
                    "lease": published.lease_id,
                    "target": published.target,
                },
            )
            self._release(published, keep=False if published.keep is not None else None)
        self._recovered.set()
        log.info("volumes recovered", extra={"volumes": len(self._volumes), "node": self.node_id})

    def run_background(self) -> None:
        """Recover, then renew each lease at a third of its TTL and report leases that end under a volume."""
        while not self._stopping.is_set():
            try:
                if not self._recovered.is_set():
                    self.recover()
                self._report_ends()
                wait = self._renew_due()
            except Failure as exc:
                log.warning("scratchd did not answer", extra={"error": exc.message})
                wait = RETRY_SECONDS
            except ScratchdError as exc:
                log.warning("scratchd did not answer", extra={"error": exc.message})
                wait = RETRY_SECONDS
            self._wake.wait(min(wait, EVENTS_SECONDS))
            self._wake.clear()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _renew_due(self) -> float:
        """Renew what is due; the seconds until the next one is."""
        now = self._clock()
        with self._guard:
            live = [p for p in self._volumes.values() if not p.ended]
        for published in live:
            if published.renew_at > now:
                continue
            try:
                self.client().renew(published.lease_id)
            except DaemonUnreachable:
                published.renew_at = now + min(RETRY_SECONDS, published.ttl_seconds / 3)
                raise
            except ScratchdError as exc:
                if exc.code in ("lease_ended", "lease_not_found"):
                    self._ended(published, None)
                    continue
                raise
            published.renew_at = now + published.ttl_seconds / 3
        return min((p.renew_at - now for p in live if not p.ended), default=EVENTS_SECONDS)

    def _report_ends(self) -> None:
        """Read the daemon's new events; a lease that ended under a published volume is logged, once."""
        if self._events_since is None:
            return
        with self._guard:
            by_lease = {p.lease_id: p for p in self._volumes.values() if not p.ended}
        while True:
            events = self.client().events(since=self._events_since, limit=1000)["events"]
            for event in events:
                self._events_since = event["seq"]
                published = by_lease.get(event["lease_id"] or "")
                if event["kind"] == "lease_ended" and published is not None and event["reason"] != "released":
                    self._ended(published, event["reason"])
            if len(events) < 1000:
                return

    def _ended(self, published: Published, reason: str | None) -> None:
        published.ended = True
        log.warning(
            "lease ended under a published volume: the pod sees an empty, unwritable directory",
            extra={"volume": published.volume_id, "lease": published.lease_id, "reason": reason},
        )


def _mount_group(request: csi_pb2.NodePublishVolumeRequest) -> int | None:
    """The pod's fsGroup (``volume_mount_group``), after the checks a scratch volume needs."""
    capability = request.volume_capability
    if not request.HasField("volume_capability"):
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT, "volume_capability is required")
    if request.readonly or capability.access_mode.mode in READ_ONLY_MODES:
        raise Failure(
            grpc.StatusCode.INVALID_ARGUMENT, "a scratch volume is writable: readOnly is not served"
        )
    if capability.WhichOneof("access_type") != "mount":
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT, "only filesystem volumes are served, not block")
    group = capability.mount.volume_mount_group
    if not group:
        return None
    if not group.isdigit():
        raise Failure(grpc.StatusCode.INVALID_ARGUMENT, f"volume_mount_group {group[:40]!r} is not a gid")
    return int(group)


def _digest(request: csi_pb2.NodePublishVolumeRequest, group: int | None) -> str:
    """What makes two publishes of one volume id the same one (kept as a label, for after a restart)."""
    text = json.dumps([sorted(request.volume_context.items()), group, request.target_path])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- the gRPC services --------------------------------------------------------------------------


def _answer(context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Failure as exc:
        context.abort(exc.code, exc.message)


class Identity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, plugin: Plugin, version: str) -> None:
        self._plugin = plugin
        self._version = version

    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER, vendor_version=self._version)

    def GetPluginCapabilities(
        self, request: Any, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse()  # node only: no controller, no topology

    def Probe(self, request: Any, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        response = csi_pb2.ProbeResponse()
        response.ready.value = self._plugin.ready()
        return response


class Node(csi_pb2_grpc.NodeServicer):
    def __init__(self, plugin: Plugin) -> None:
        self._plugin = plugin

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        _answer(context, lambda: self._plugin.publish(request))
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        _answer(context, lambda: self._plugin.unpublish(request))
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetCapabilities(
        self, request: Any, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        rpc = csi_pb2.NodeServiceCapability.RPC(type=csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP)
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[csi_pb2.NodeServiceCapability(rpc=rpc)])

    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self._plugin.node_id)


# -- the process ----------------------------------------------------------------------------------


def default_node_id() -> str:
    """``NODE_NAME`` (the downward API's ``spec.nodeName``) when set, else the host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def serve(endpoint: str, node_id: str | None, connect: Callable[[], Client]) -> int:
    """Serve the Identity and Node services on ``endpoint`` (``unix:///csi/csi.sock``) until SIGTERM or SIGINT."""
    from importlib.metadata import PackageNotFoundError, version

    from scratchd import logs

    logs.setup()
    path = endpoint.removeprefix("unix://")
    if not endpoint.startswith("unix://") or not path.startswith("/"):
        log.error("the endpoint must be unix:///absolute/path", extra={"endpoint": endpoint})
        return 2
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a previous run's socket: nobody serves it now
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        vendor_version = version("scratchd")
    except PackageNotFoundError:
        vendor_version = "unknown"
    # Blocked before any thread starts, so that every thread inherits the mask and only
    # sigwait below takes them. A Python handler runs only once the main thread wakes, and a
    # signal that lands on one of gRPC's threads never wakes it: SIGTERM went unheeded.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    plugin = Plugin(node_id or default_node_id(), connect)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="csi"))
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(plugin, vendor_version), server)
    csi_pb2_grpc.add_NodeServicer_to_server(Node(plugin), server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    background = threading.Thread(target=plugin.run_background, name="csi-background", daemon=True)
    background.start()
    log.info("csi plugin serving", extra={"endpoint": endpoint, "node": plugin.node_id, "driver": DRIVER})
    signal.sigwait(stop_signals)
    plugin.stop()
    server.stop(grace=5).wait()
    return 0


def connect_to(socket_path: str | None, url: str | None) -> Callable[[], Client]:
    """A factory of clients for the daemon, each with a timeout shorter than the kubelet's calls'."""
    return lambda: Client(socket=socket_path, url=url, timeout=DAEMON_TIMEOUT_SECONDS)

"""The CSI node plugin driven as the kubelet drives it: gRPC over its Unix socket, a real
daemon behind it, real bind mounts at the targets (docs/kubernetes.md)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, Daemon, wait_for

from scratchd.mounts import read_mounts

grpc = pytest.importorskip("grpc", reason="the csi extra (grpcio) is not installed")
from scratchd.csi.proto import csi_pb2, csi_pb2_grpc  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root: bind mounts at the targets"),
    pytest.mark.shared_daemon,  # each test's pods have volume ids of their own
]

NODE = "node-a"
P = "csi.scratchd.dev/"


class CsiPlugin:
    """A real ``scratchd csi`` process and a gRPC channel to it, as the kubelet holds one."""

    def __init__(self, root: Path, daemon: Daemon) -> None:
        self.socket = root / "plugin" / "csi.sock"
        self.log_path = root / "plugin.log"
        self.daemon = daemon
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: Any = None

    def start(self, wait_ready: bool = True) -> CsiPlugin:
        env = {**os.environ, "SCRATCHD_SOCKET": self.daemon.socket}
        command = [sys.executable, "-m", "scratchd", "csi", "--endpoint", f"unix://{self.socket}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--node-id", NODE], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self.socket.exists, what=f"the plugin's socket (log: {self.log_path})")
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        if wait_ready:
            wait_for(self.ready, what=f"the plugin ready (log: {self.log_path})")
        return self

    def ready(self) -> bool:
        """Probe says ready. A socket not yet accepting (the file exists once bound, before the
        server listens) is not ready yet, as the kubelet's probe would see it, not an error."""
        try:
            return bool(self.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                return False
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def kubelet_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the targets go; whatever a failed test left mounted there is detached afterwards."""
    pods = tmp_path / "kubelet" / "pods"
    pods.mkdir(parents=True)
    yield pods
    for mount in reversed(read_mounts()):
        if mount.mount_point.startswith(str(pods) + "/"):
            subprocess.run(["umount", "-l", mount.mount_point], check=False)


@pytest.fixture
def start_plugin(tmp_path: Path, kubelet_dir: Path) -> Iterator[Callable[..., CsiPlugin]]:
    started: list[CsiPlugin] = []

    def start(daemon: Daemon, wait_ready: bool = True) -> CsiPlugin:
        plugin = CsiPlugin(tmp_path, daemon)
        started.append(plugin)
        return plugin.start(wait_ready)

    yield start
    for plugin in started:
        plugin.stop()


@pytest.fixture
def plugin(daemon: Daemon, start_plugin: Callable[..., CsiPlugin]) -> CsiPlugin:
    return start_plugin(daemon)


class Pod:
    """A pod's side of one volume: its ids, the target the kubelet picks, the requests it sends."""

    def __init__(
        self, kubelet_dir: Path, namespace: str = "ci", name: str = "build", volume: str = ""
    ) -> None:
        self.namespace, self.name, self.uid = namespace, name, str(uuid.uuid4())
        self.volume_id = volume or f"csi-{uuid.uuid4().hex}"
        self.target = kubelet_dir / self.uid / "volumes" / "kubernetes.io~csi" / "cache" / "mount"
        self.target.parent.mkdir(parents=True)  # the kubelet makes the target's parent, the plugin the target

    def publish_request(
        self,
        attributes: dict[str, str] | None = None,
        group: str = "",
        readonly: bool = False,
        target: str = "",
    ) -> Any:
        context = {
            "csi.storage.k8s.io/pod.namespace": self.namespace,
            "csi.storage.k8s.io/pod.name": self.name,
            "csi.storage.k8s.io/pod.uid": self.uid,
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "true",
            **(attributes or {}),
        }
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(volume_mount_group=group),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=self.volume_id,
            target_path=target or str(self.target),
            volume_capability=capability,
            readonly=readonly,
            volume_context=context,
        )

    def publish(self, plugin: CsiPlugin, **options: Any) -> None:
        plugin.node.NodePublishVolume(self.publish_request(**options), timeout=30)

    def unpublish(self, plugin: CsiPlugin) -> None:
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=self.volume_id, target_path=str(self.target))
        plugin.node.NodeUnpublishVolume(request, timeout=30)


def refused(call: Callable[[], Any]) -> Any:
    """The gRPC error ``call`` ends in (it must end in one)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def is_mount(path: Path) -> bool:
    return any(mount.mount_point == str(path) for mount in read_mounts())


def leases_of(daemon: Daemon, pod: Pod, state: str = "active") -> list[dict[str, Any]]:
    params = {"state": state, "label": f"{P}volume-id={pod.volume_id}"}
    return daemon.request("GET", "/v1/leases", params=params).json()["leases"]


def test_identity_and_node_info(plugin: CsiPlugin) -> None:
    info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.scratchd.dev" and info.vendor_version
    assert (
        list(plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities) == []
    )
    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    assert plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == NODE
    capabilities = plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in capabilities] == [csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_the_plugin_cleanly(
    daemon: Daemon, start_plugin: Callable[..., CsiPlugin], how: signal.Signals
) -> None:
    plugin = start_plugin(daemon)
    plugin.stop(how)  # waits at most 15 s
    assert plugin.process is not None and plugin.process.returncode == 0, plugin.log()


def test_publish_is_a_bind_mounted_lease_and_unpublish_releases_it(
    daemon: Daemon, plugin: CsiPlugin, kubelet_dir: Path
) -> None:
    pod = Pod(kubelet_dir)
    attributes = {"maxSize": "64Mi", "idleTimeout": "1h", "labels": "team=build"}
    pod.publish(plugin, attributes=attributes)
    [lease] = leases_of(daemon, pod)
    assert lease["tenant"] == "k8s:ci"
    assert (lease["max_bytes"], lease["idle_timeout_seconds"]) == (64 * 2**20, 3600)
    assert lease["labels"]["team"] == "build"
    assert lease["labels"][f"{P}pod-uid"] == pod.uid and lease["labels"][f"{P}target-path"] == str(pod.target)
    assert is_mount(pod.target)
    assert stat.S_IMODE(pod.target.stat().st_mode) == 0o777  # no fsGroup: only this pod mounts it
    (pod.target / "wheel.whl").write_bytes(b"built")
    assert (Path(lease["path"]) / "wheel.whl").read_bytes() == b"built"

    pod.publish(plugin, attributes=attributes)  # the kubelet retries: still one lease, one mount
    assert [found["id"] for found in leases_of(daemon, pod)] == [lease["id"]]
    assert sum(m.mount_point == str(pod.target) for m in read_mounts()) == 1
    other_target = refused(lambda: pod.publish(plugin, attributes=attributes, target=str(pod.target) + "2"))
    assert other_target.code() == grpc.StatusCode.ALREADY_EXISTS
    other_attributes = refused(lambda: pod.publish(plugin, attributes={"maxSize": "1Gi"}))
    assert other_attributes.code() == grpc.StatusCode.ALREADY_EXISTS

    pod.unpublish(plugin)
    assert not is_mount(pod.target) and not pod.target.exists()
    ended = daemon.request("GET", f"/v1/leases/{lease['id']}").json()
    assert (ended["state"], ended["end_reason"]) == ("ended", "released")
    assert not Path(lease["path"]).exists()
    pod.unpublish(plugin)  # again: nothing left, still OK
    Pod(kubelet_dir).unpublish(plugin)  # a volume it never saw


def test_an_fsgroup_owns_the_volume(daemon: Daemon, plugin: CsiPlugin, kubelet_dir: Path) -> None:
    pod = Pod(kubelet_dir)
    pod.publish(plugin, group="4321")
    root = pod.target.stat()
    assert (root.st_gid, stat.S_IMODE(root.st_mode)) == (4321, 0o2770)
    pod.unpublish(plugin)


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"colour": "blue"}, "colour"),
        ({"maxSize": "lots"}, "maxSize"),
        ({"expectSize": "-1Gi"}, "expectSize"),
        ({"idleTimeout": "soon"}, "idleTimeout"),
        ({"evictable": "yes"}, "evictable"),
        ({"keep": "always"}, "keep"),
        ({"cacheKey": "has space"}, "cacheKey"),
        ({"labels": "Bad=1"}, "labels"),
        ({"pool": "nowhere"}, "nowhere"),  # the daemon's pool_not_found
    ],
)
def test_a_bad_attribute_is_invalid_argument_naming_it(
    daemon: Daemon, plugin: CsiPlugin, kubelet_dir: Path, attributes: dict[str, str], named: str
) -> None:
    pod = Pod(kubelet_dir)
    error = refused(lambda: pod.publish(plugin, attributes=attributes))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in error.details()
    assert leases_of(daemon, pod, "all") == [] and not is_mount(pod.target) and not pod.target.exists()


def test_a_read_only_publish_is_invalid_argument(
    daemon: Daemon, plugin: CsiPlugin, kubelet_dir: Path
) -> None:
    pod = Pod(kubelet_dir)
    assert refused(lambda: pod.publish(plugin, readonly=True)).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert leases_of(daemon, pod, "all") == []


def test_tenant_quota_is_resource_exhausted(
    make_daemon: Callable[..., Daemon], start_plugin: Callable[..., CsiPlugin], kubelet_dir: Path
) -> None:
    daemon = make_daemon(tenant=[{"name": "k8s:ci", "max_leases": 1}])
    plugin = start_plugin(daemon)
    first, second = Pod(kubelet_dir), Pod(kubelet_dir)
    first.publish(plugin)
    error = refused(lambda: second.publish(plugin))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota_exceeded" in error.details()
    assert leases_of(daemon, second, "all") == [] and not is_mount(second.target)
    Pod(kubelet_dir, namespace="other").publish(plugin)  # another namespace is another tenant
    first.unpublish(plugin)


def test_daemon_down_is_unavailable_and_probe_not_ready(
    make_daemon: Callable[..., Daemon], start_plugin: Callable[..., CsiPlugin], kubelet_dir: Path
) -> None:
    daemon = make_daemon()
    plugin = start_plugin(daemon)
    daemon.stop()
    assert not plugin.ready()
    pod = Pod(kubelet_dir)
    assert refused(lambda: pod.publish(plugin)).code() == grpc.StatusCode.UNAVAILABLE
    assert not is_mount(pod.target)
    daemon.start()
    wait_for(plugin.ready, what="the plugin ready again")
    pod.publish(plugin)  # the kubelet's retry
    assert is_mount(pod.target)
    pod.unpublish(plugin)


def test_the_lease_has_the_longest_ttl_and_is_renewed(
    make_daemon: Callable[..., Daemon], start_plugin: Callable[..., CsiPlugin], kubelet_dir: Path
) -> None:
    daemon = make_daemon(limits={"default_ttl": "2s", "max_ttl": "3s"})
    plugin = start_plugin(daemon)
    pod = Pod(kubelet_dir)
    pod.publish(plugin)
    [lease] = leases_of(daemon, pod)
    assert lease["ttl_seconds"] == 3
    wait_for(
        lambda: leases_of(daemon, pod)[0]["expires_at"] > lease["expires_at"],
        what="a renewal at a third of the TTL",
    )
    pod.unpublish(plugin)
    assert leases_of(daemon, pod, "ended")[0]["end_reason"] == "released"


def test_a_restarted_plugin_finds_its_volumes_and_releases_those_unmounted(
    daemon: Daemon, start_plugin: Callable[..., CsiPlugin], kubelet_dir: Path
) -> None:
    plugin = start_plugin(daemon)
    kept, lost = Pod(kubelet_dir), Pod(kubelet_dir)
    kept.publish(plugin)
    lost.publish(plugin)
    plugin.stop(signal.SIGKILL)
    subprocess.run(["umount", str(lost.target)], check=True)

    again = start_plugin(daemon, wait_ready=False)
    wait_for(lambda: leases_of(daemon, lost) == [], timeout=10, what="the unmounted volume's lease released")
    assert leases_of(daemon, lost, "ended")[0]["end_reason"] == "released"
    wait_for(again.ready, what="the restarted plugin ready")
    [lease] = leases_of(daemon, kept)
    kept.publish(again)  # the kubelet may publish again after a restart: the same volume
    assert [found["id"] for found in leases_of(daemon, kept)] == [lease["id"]]
    kept.unpublish(again)
    assert not is_mount(kept.target) and leases_of(daemon, kept) == []


def test_a_warm_cache_through_two_pods_volumes(daemon: Daemon, plugin: CsiPlugin, kubelet_dir: Path) -> None:
    probe = daemon.request("POST", "/v1/leases", json={"cache_key": "probe"})
    if probe.status_code == 422:
        pytest.skip("this daemon does not take cache_key yet (warm caches, docs/api.md)")
    daemon.request("DELETE", f"/v1/leases/{probe.json()['id']}", params={"keep": "false"})
    first = Pod(kubelet_dir, name="build-1")
    first.publish(plugin, attributes={"cacheKey": "uv-main"})
    (first.target / "uv").mkdir()
    (first.target / "uv" / "wheel").write_bytes(b"cached")
    first.unpublish(plugin)

    second = Pod(kubelet_dir, name="build-2")
    second.publish(plugin, attributes={"cacheKey": "uv-main"})
    assert (second.target / "uv" / "wheel").read_bytes() == b"cached"
    [lease] = leases_of(daemon, second)
    assert lease["cache"]["hit"] == "exact"
    second.unpublish(plugin)


def test_a_lease_ending_under_a_volume_is_logged_and_leaves_it_unwritable(
    daemon: Daemon, plugin: CsiPlugin, kubelet_dir: Path
) -> None:
    pod = Pod(kubelet_dir)
    pod.publish(plugin, attributes={"idleTimeout": "1s"})
    [lease] = leases_of(daemon, pod)
    wait_for(lambda: leases_of(daemon, pod, "ended"), what="the lease to end idle")
    wait_for(
        lambda: lease["id"] in plugin.log() and '"reason": "idle"' in plugin.log(), what="the plugin's log"
    )
    assert is_mount(pod.target)
    with pytest.raises(FileNotFoundError):
        (pod.target / "late").write_bytes(b"lost")
    pod.unpublish(plugin)
    assert not is_mount(pod.target)

"""What a pod's start waits for: NodePublishVolume of a csi.scratchd.dev volume, as the kubelet calls it.

A real daemon and a real ``scratchd csi`` plugin; the calls go over the plugin's gRPC
Unix socket, and each publish makes a lease and a bind mount (root only). Prints p50/p90
in milliseconds of:

- the first publish after the plugin started (a new connection to the daemon, and the
  daemon's TTL limit learnt from its refusal of a longer one);
- a cold publish: a new, empty lease;
- a warm publish: a ``cacheKey`` whose kept cache (``--files`` files) is handed over
  (skipped when the daemon does not keep caches);
- an unpublish (unmount, release), plain and keeping the cache.

    sudo .venv/bin/python bench/csi_publish.py [-n 50] [--files 2000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import grpc

from scratchd.client import Client, ScratchdError
from scratchd.csi.proto import csi_pb2, csi_pb2_grpc


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _publish_request(kubelet: Path, attributes: dict[str, str]) -> csi_pb2.NodePublishVolumeRequest:
    uid = str(uuid.uuid4())
    target = kubelet / uid / "volumes" / "kubernetes.io~csi" / "cache" / "mount"
    target.parent.mkdir(parents=True)
    context = {
        "csi.storage.k8s.io/pod.namespace": "bench",
        "csi.storage.k8s.io/pod.name": "job",
        "csi.storage.k8s.io/pod.uid": uid,
        "csi.storage.k8s.io/ephemeral": "true",
        **attributes,
    }
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=f"csi-{uuid.uuid4().hex}",
        target_path=str(target),
        volume_capability=csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume()),
        volume_context=context,
    )


def _unpublish_request(published: csi_pb2.NodePublishVolumeRequest) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=published.volume_id, target_path=published.target_path
    )


def _unpublish(node: csi_pb2_grpc.NodeStub, published: csi_pb2.NodePublishVolumeRequest) -> object:
    return node.NodeUnpublishVolume(_unpublish_request(published), timeout=30)


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def _row(name: str, samples: list[float]) -> str:
    if not samples:
        return f"| {name} | – | – | 0 |"
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"| {name} | {statistics.median(ordered):.2f} | {p90:.2f} | {len(ordered)} |"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=50, help="publishes of each kind (default: %(default)s)")
    parser.add_argument(
        "--files", type=int, default=2000, help="files in the warm cache (default: %(default)s)"
    )
    parser.add_argument("--dir", default="/var/tmp", help="where the pool and the targets go")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("csi_publish: needs root (bind mounts)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="scratchd-csi-bench-", dir=args.dir))
    (root / "pool").mkdir()
    kubelet = root / "kubelet"
    kubelet.mkdir()
    socket_path = str(root / "scratchd.sock")
    (root / "config.toml").write_text(
        f'[server]\nsocket = "{socket_path}"\nstate_dir = "{root / "state"}"\nlisten = ""\n'
        f'admins = ["root"]\n[limits]\ncreate_rate = 1000000\n[[pool]]\nname = "main"\npath = "{root / "pool"}"\n'
    )
    with open(root / "log", "ab") as log:
        command = [sys.executable, "-m", "scratchd"]
        daemon = subprocess.Popen(
            [*command, "serve", "--config", str(root / "config.toml")], stdout=log, stderr=log
        )
        plugin = None
        try:
            _wait(lambda: _answers(socket_path), "the daemon")
            endpoint = root / "csi.sock"
            env = {**os.environ, "SCRATCHD_SOCKET": socket_path}
            plugin = subprocess.Popen(
                [*command, "csi", "--endpoint", f"unix://{endpoint}", "--node-id", "bench"],
                env=env,
                stdout=log,
                stderr=log,
            )
            _wait(endpoint.exists, "the plugin's socket")
            with grpc.insecure_channel(f"unix://{endpoint}") as channel:
                identity, node = csi_pb2_grpc.IdentityStub(channel), csi_pb2_grpc.NodeStub(channel)
                _wait(lambda: identity.Probe(csi_pb2.ProbeRequest()).ready.value, "the plugin ready")
                rows = _measure(node, kubelet, args, socket_path)
        finally:
            for process in (plugin, daemon):
                if process is not None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(30)
            subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
    print(f"NodePublishVolume / NodeUnpublishVolume over the plugin's gRPC socket, pool in {args.dir}\n")
    print("| call | p50 ms | p90 ms | n |\n|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


def _answers(socket_path: str) -> bool:
    try:
        with Client(socket=socket_path, timeout=1) as client:
            client.health()
        return True
    except ScratchdError:
        return False


def _measure(
    node: csi_pb2_grpc.NodeStub, kubelet: Path, args: argparse.Namespace, socket_path: str
) -> list[str]:
    first = _publish_request(kubelet, {})
    first_ms = _timed(lambda: node.NodePublishVolume(first, timeout=30))
    node.NodeUnpublishVolume(_unpublish_request(first), timeout=30)

    cold, unpublish = [], []
    for _ in range(args.n):
        request = _publish_request(kubelet, {})
        cold.append(_timed(functools.partial(node.NodePublishVolume, request, timeout=30)))
        unpublish.append(_timed(functools.partial(_unpublish, node, request)))

    warm, keep = [], []
    if _keeps_caches(socket_path):
        seed = _publish_request(kubelet, {"cacheKey": "bench"})
        node.NodePublishVolume(seed, timeout=30)
        for i in range(args.files):
            (Path(seed.target_path) / f"f{i}").write_bytes(b"x" * 512)
        node.NodeUnpublishVolume(_unpublish_request(seed), timeout=30)
        for _ in range(args.n):
            request = _publish_request(kubelet, {"cacheKey": "bench"})
            warm.append(_timed(functools.partial(node.NodePublishVolume, request, timeout=30)))
            keep.append(_timed(functools.partial(_unpublish, node, request)))
    return [
        _row("first publish after the plugin started", [first_ms]),
        _row("publish, cold (new empty lease)", cold),
        _row(f"publish, warm (cacheKey hit, {args.files} files)", warm),
        _row("unpublish (release)", unpublish),
        _row("unpublish, keeping the cache", keep),
    ]


def _keeps_caches(socket_path: str) -> bool:
    """Does this daemon take a ``cache_key`` (warm caches)?"""
    with Client(socket=socket_path) as client:
        try:
            lease = client.create_lease(cache_key="probe")
        except ScratchdError:
            return False
        client.request("DELETE", f"/v1/leases/{lease['id']}?keep=false")
        return True


if __name__ == "__main__":
    sys.exit(main())

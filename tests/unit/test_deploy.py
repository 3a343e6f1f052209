"""The deployment files are checked, not just shipped.

- systemd: ``systemd-analyze verify`` accepts the unit, and the daemon does its
  whole job (chown a lease to another uid, watch another uid's process, delete
  another uid's mode-000 tree, detach a mount) with exactly the unit's
  CapabilityBoundingSet, and degrades as documented with the DaemonSet's; the
  daemon speaks the notify protocol (READY, RELOADING, WATCHDOG, STOPPING).
- container: the Dockerfile cannot be built here (no engine), so its
  instructions are checked, its baked config parsed and its HEALTHCHECK run.
- Kubernetes: every object validates offline against the bundled schemas.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from conftest import Daemon, needs_root, wait_for
from forked import run_as

from scratchd.config import parse_config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "scratchd.service"
UNIT_README = REPO / "deploy" / "systemd" / "README.md"
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
LOCK = REPO / "deploy" / "container" / "requirements.lock"
KUBERNETES = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
# Custom resources the bundled schemas cannot know; everything else must validate.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
TENANT_UID = 65534  # nobody
OTHER_UID = 65533  # owns nothing on this host: "another user" inside the tenant's tree
# capability(7) numbers of the ones the deployments name.
CAP_NUMBERS = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "kill": 5,
    "sys_ptrace": 19,
    "sys_admin": 21,
}


# -- systemd ------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """``key -> values`` of the unit (systemd allows a key more than once)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_capabilities() -> set[str]:
    (value,) = unit_settings()["CapabilityBoundingSet"]
    return {cap.removeprefix("CAP_").lower() for cap in value.split()}


def test_unit_settings() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == ["/usr/local/bin/scratchd serve --config /etc/scratchd/config.toml"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["RuntimeDirectory"] == ["scratchd"] and settings["StateDirectory"] == ["scratchd"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["ProtectSystem"] == ["strict"] and settings["NoNewPrivileges"] == ["yes"]
    # These would put mount boundaries into the daemon's view that the host does not
    # have, so `near` and a pool on one filesystem would look like two (deploy/systemd/README.md).
    for forbidden in ("PrivateTmp", "ProtectHome", "ProtectProc", "ReadWritePaths"):
        assert forbidden not in settings, f"{forbidden}: see deploy/systemd/README.md"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this checkout's entry point.
    scratchd = Path(sys.executable).parent / "scratchd"
    assert scratchd.exists(), f"{scratchd}: install the package into this environment"
    unit = tmp_path / "scratchd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/scratchd", str(scratchd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    output = (result.stdout + result.stderr).strip()
    # Unknown keys and bad values are only warnings to verify: any word about our unit fails.
    ours = [line for line in output.splitlines() if "scratchd" in line]
    assert result.returncode == 0 and not ours, output


def pools_drop_in() -> str:
    """The drop-in deploy/systemd/README.md tells operators to write."""
    (block,) = [
        b for b in re.findall(r"```ini\n(.*?)```", UNIT_README.read_text(), re.S) if "pools.conf" in b
    ]
    return block


def test_pools_drop_in_requires_the_pool_mounts() -> None:
    settings: dict[str, list[str]] = {}
    for line in pools_drop_in().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).extend(value.split())
    # Pool paths (so every mount above them counts), and the mount points they are on.
    assert settings["RequiresMountsFor"] == ["/mnt/nvme/scratchd", "/srv/scratch/scratchd"]
    assert settings["ReadWritePaths"] == ["/mnt/nvme", "/srv/scratch"]
    assert all(
        any(path.startswith(mount + "/") for mount in settings["ReadWritePaths"])
        for path in settings["RequiresMountsFor"]
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_with_the_pools_drop_in(tmp_path: Path) -> None:
    scratchd = Path(sys.executable).parent / "scratchd"
    (tmp_path / "scratchd.service").write_text(
        UNIT.read_text().replace("/usr/local/bin/scratchd", str(scratchd))
    )
    (tmp_path / "scratchd.service.d").mkdir()
    (tmp_path / "scratchd.service.d" / "pools.conf").write_text(pools_drop_in())
    # The trailing colon keeps the built-in search path too; the drop-in is found next to the unit.
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "scratchd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and "scratchd" not in output, output


# -- capabilities: the daemon's whole job with exactly the deployed bounding set --------


class CappedDaemon(Daemon):
    """``scratchd serve`` exec'd as root with only ``caps`` in its bounding set."""

    def __init__(self, root: Path, caps: set[str]) -> None:
        super().__init__(root, {"gc": {"interval": "0.2s"}})
        self.caps = caps

    def command(self) -> list[str]:
        bounding = ",".join(["-all"] + [f"+{cap}" for cap in sorted(self.caps)])
        return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--", *super().command()]


def as_tenant(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a forked child running as the tenant uid (``forked.run_as``)."""
    return run_as(TENANT_UID, TENANT_UID, lambda: function(*args))


def _create_and_fill(socket_path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The tenant's side: a lease over the socket, then what a careless or hostile job leaves in it."""
    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(
            b"POST /v1/leases HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        head, _, payload = sock.makefile("rb").read().partition(b"\r\n\r\n")
    lease = json.loads(payload)
    assert head.split()[1] == b"201", lease
    tree = Path(lease["path"]) / "tree"
    modes = {"locked": 0o000, "readonly": 0o500, "sticky": 0o1777}
    for name in modes:
        (tree / name / "deeper").mkdir(parents=True)
        for i in range(3):
            (tree / name / f"f{i}").write_bytes(b"x" * 5000)
    (tree / "etc-link").symlink_to("/etc")
    for name, mode in modes.items():
        os.chmod(tree / name, mode)
    return lease


def tenant_lease(daemon: Daemon, **body: Any) -> dict[str, Any]:
    return as_tenant(_create_and_fill, daemon.socket, body)


def reclaim_failures(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """``lease id -> details`` of every reclaim_failed event."""
    events = daemon.request("GET", "/v1/events", params={"limit": 1000}).json()["events"]
    return {event["lease_id"]: event["details"] for event in events if event["kind"] == "reclaim_failed"}


def mounts_under(root: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(f"{root}/")]


@contextlib.contextmanager
def capped_daemon(caps: set[str]) -> Iterator[CappedDaemon]:
    """A daemon in a directory the tenant can reach (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="scratchd-caps-"))
    os.chmod(root, 0o755)
    daemon = CappedDaemon(root, caps)
    try:
        daemon.start()
        yield daemon
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()
        for target in reversed(mounts_under(root)):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def run_capability_scenario(caps: set[str]) -> dict[str, Any]:
    """Every privileged thing the daemon does for another user, with only ``caps``.

    Returns what happened, for the tests below and for re-measuring the minimal
    set by hand with one capability less (deploy/systemd/README.md).
    """
    outcome: dict[str, Any] = {}
    sleeper = subprocess.Popen(["sleep", "60"], user=TENANT_UID, group=TENANT_UID, extra_groups=[])
    try:
        with capped_daemon(caps) as daemon:
            assert daemon.process is not None
            status = Path(f"/proc/{daemon.process.pid}/status").read_text()
            outcome["cap_eff"] = next(
                int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:")
            )
            # 1. a lease for another uid: created, chowned to it, filled by it ...
            lease = tenant_lease(daemon, ttl_seconds=600)
            st = os.stat(lease["path"])
            outcome["owned_by_tenant"] = (st.st_uid, st.st_mode & 0o777) == (TENANT_UID, 0o700)
            # ... with a mode-000 directory of a third user inside.
            alien = Path(lease["path"]) / "alien"
            (alien / "inner").mkdir(parents=True)
            (alien / "inner" / "file").write_bytes(b"y" * 5000)
            for path in (alien / "inner", alien):
                os.chown(path, OTHER_UID, OTHER_UID)
                os.chmod(path, 0)
            # 2. a lease bound to a process of the tenant ends when it exits.
            bound = tenant_lease(daemon, ttl_seconds=600, pid=sleeper.pid)
            # 3. a mount inside a lease, detached (or reported) when the lease ends.
            mounted = tenant_lease(daemon, ttl_seconds=600)
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", f"{mounted['path']}/tree"], check=True
            )

            for ending in (lease, mounted):
                response = daemon.request("DELETE", f"/v1/leases/{ending['id']}")
                assert response.status_code == 200, response.text
            sleeper.kill()
            sleeper.wait()
            wait_for(
                lambda: daemon.request("GET", f"/v1/leases/{bound['id']}").json()["state"] == "ended",
                timeout=5,
                what="the pid-bound lease to end (it raises if not)",
            )

            trash = Path(daemon.pool_path) / ".trash"
            wait_for(
                lambda: len(os.listdir(trash)) == len(reclaim_failures(daemon)),
                timeout=10,
                what="the trash to be emptied or its failures reported",
            )
            failures = reclaim_failures(daemon)
            outcome["tree_deleted"] = lease["id"] not in failures
            outcome["mount_detached"] = mounted["id"] not in failures
            outcome["failures"] = failures
            outcome["log"] = daemon.log()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    return outcome


needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"
)


@needs_root
@needs_setpriv
def test_unit_capabilities_are_enough() -> None:
    caps = unit_capabilities()
    outcome = run_capability_scenario(caps)
    assert outcome["cap_eff"] == sum(1 << CAP_NUMBERS[cap] for cap in caps)
    assert outcome["owned_by_tenant"]
    assert outcome["tree_deleted"] and outcome["mount_detached"], outcome["failures"]
    assert "Permission denied" not in outcome["log"] and "Operation not permitted" not in outcome["log"]


@needs_root
@needs_setpriv
def test_daemonset_capabilities_work_and_leave_mounts_reported() -> None:
    """Without CAP_SYS_ADMIN a mount in a lease stays and is reported; everything else works."""
    caps = daemonset_capabilities()
    assert caps == unit_capabilities() - {"sys_admin"}
    outcome = run_capability_scenario(caps)
    assert outcome["owned_by_tenant"] and outcome["tree_deleted"]
    assert not outcome["mount_detached"]
    (failure,) = outcome["failures"].values()
    assert failure["left_mounts"], failure


# -- container ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined; heredoc bodies kept whole."""
    instructions: list[tuple[str, str]] = []
    lines = iter(DOCKERFILE.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + next(lines)
        keyword, _, rest = line.strip().partition(" ")
        heredoc = re.search(r"<<-?\"?(\w+)\"?", rest)
        if heredoc:
            body = []
            for inner in lines:
                if inner.strip() == heredoc.group(1):
                    break
                body.append(inner)
            rest += "\n" + "\n".join(body)
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [rest for key, rest in dockerfile_instructions() if key == keyword]


def healthcheck_command() -> list[str]:
    (healthcheck,) = dockerfile("HEALTHCHECK")
    return json.loads(healthcheck.split(" CMD ", 1)[1])


def test_dockerfile_instructions() -> None:
    images = {rest.split()[0] for rest in dockerfile("FROM")}
    assert len(images) == 1, f"one base for both stages: {images}"
    (image,) = images
    # A digest, not only a tag: the same bytes on every build until someone updates it.
    assert re.fullmatch(r"python:3\.12(\.\d+)?-slim(-\w+)?@sha256:[0-9a-f]{64}", image), image
    (user,) = dockerfile("USER")
    # Numeric uid:gid: runAsNonRoot can only verify a number, and 0 is root.
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0, user
    (run,) = [rest for rest in dockerfile("RUN") if "useradd" in rest]
    assert f"--uid {uid}" in run and f"--gid {gid}" in run and f"groupadd --system --gid {gid}" in run
    assert json.loads(dockerfile("ENTRYPOINT")[0]) == ["scratchd"]
    assert json.loads(dockerfile("CMD")[0]) == ["serve", "--config", "/etc/scratchd/config.toml"]
    assert healthcheck_command()[0] == "python3"


def locked() -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, hashes)`` of the lock file (pip's requirements format)."""
    text = LOCK.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = line.split()[0]
            name, _, version = requirement.partition("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = (
                version,
                re.findall(r"--hash=sha256:([0-9a-f]{64})", line),
            )
    return found


def test_dockerfile_installs_only_locked_and_hashed_dependencies() -> None:
    runs = " ".join(dockerfile("RUN"))
    assert "pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock" in runs
    assert "pip install --no-cache-dir --no-deps /wheels/*.whl" in runs  # scratchd itself adds nothing
    assert "deploy/container/requirements.lock /tmp/requirements.lock" in dockerfile("COPY")
    lock = locked()
    for name, (version, hashes) in lock.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), f"{name}: not pinned"
        assert hashes, f"{name}: no hash"
    with open(REPO / "pyproject.toml", "rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    dependencies = extras["server"] + extras["csi"]  # what the image runs: the daemon and the CSI plugin
    names = [re.match(r"[A-Za-z0-9_.-]+", d) for d in dependencies]
    assert all(names), dependencies
    wanted = {re.sub(r"[-_.]+", "-", name.group()).lower() for name in names if name}
    assert wanted <= set(lock), f"not in the lock (regenerate it: Dockerfile): {sorted(wanted - set(lock))}"


def test_dockerfile_copies_what_the_repository_has() -> None:
    """The build context is the repository root; a COPY of a missing file fails the build."""
    for rest in dockerfile("COPY"):
        if rest.startswith("--from") or rest.startswith("<<"):
            continue
        *sources, _destination = rest.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_baked_config_is_valid() -> None:
    (baked,) = [rest for rest in dockerfile("COPY") if rest.startswith("<<")]
    header, _, body = baked.partition("\n")
    assert header.endswith("/etc/scratchd/config.toml")
    config = parse_config(tomllib.loads(body))
    assert config.server.socket == healthcheck_command()[-2]
    assert [pool.path for pool in config.pool] == ["/scratch"]


def test_probes_answer_like_the_daemon(make_daemon: Any) -> None:
    """The HEALTHCHECK one-liner and the DaemonSet's exec probes, run against a real daemon."""
    daemon = make_daemon()
    commands = [healthcheck_command(), *daemonset_probe_commands()]
    for command in commands:
        run = [sys.executable, *command[1:-2], daemon.socket, command[-1]]
        assert subprocess.run(run, capture_output=True, timeout=10).returncode == 0, command[-1]
    daemon.stop()
    dead = [sys.executable, *commands[0][1:-2], daemon.socket, "/healthz"]
    assert subprocess.run(dead, capture_output=True, timeout=10).returncode != 0


# -- Kubernetes ---------------------------------------------------------------------------


def kubernetes_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path.name, document


def kubernetes_object(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        obj
        for _, obj in kubernetes_objects()
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    return found


def daemonset_container(name: str = "scratchd") -> dict[str, Any]:
    containers = kubernetes_object("DaemonSet")["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == name]
    return container


def daemonset_capabilities() -> set[str]:
    capabilities = daemonset_container()["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    return {cap.lower() for cap in capabilities["add"]}


def daemonset_probe_commands() -> list[list[str]]:
    container = daemonset_container()
    return [
        container[probe]["exec"]["command"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    ]


def test_kubernetes_objects_validate() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    validated, skipped = [], []
    for filename, obj in kubernetes_objects():
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            # A CRD: no schema offline; checked by test_servicemonitor below and test_alert_rules.
            skipped.append(obj["kind"])
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{filename}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        validated.append(obj["kind"])
    assert {
        "DaemonSet",
        "ConfigMap",
        "Service",
        "Secret",
        "Pod",
        "Namespace",
        "ResourceQuota",
        "CSIDriver",
    } <= set(validated)
    assert sorted(skipped) == ["PrometheusRule", "ServiceMonitor"]


def test_daemonset_runs_on_every_node_and_holds_no_token() -> None:
    spec = kubernetes_object("DaemonSet")["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]  # every taint, every effect
    assert spec["automountServiceAccountToken"] is False
    resources = daemonset_container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"memory"}  # no CPU limit: throttling stalls the event loop
    # Clusters that keep critical priority classes to kube-system admit them under a scoped quota.
    quota = kubernetes_object("ResourceQuota")
    assert quota["metadata"]["namespace"] == kubernetes_object("DaemonSet")["metadata"]["namespace"]
    (scope,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert scope == {"scopeName": "PriorityClass", "operator": "In", "values": [spec["priorityClassName"]]}


def test_servicemonitor_scrapes_the_service_with_the_token() -> None:
    monitor = kubernetes_object("ServiceMonitor")
    service = kubernetes_object("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [port["name"] for port in service["spec"]["ports"]]
    secret_ref = endpoint["authorization"]["credentials"]
    secret = kubernetes_object("Secret", secret_ref["name"])
    token = secret["stringData"][secret_ref["key"]]
    config = parse_config(tomllib.loads(kubernetes_object("ConfigMap")["data"]["config.toml"]))
    viewers = {t.sha256 for t in config.token if t.role in ("viewer", "admin")}
    assert hashlib.sha256(token.encode()).hexdigest() in viewers


def test_configmap_config_matches_the_daemonset() -> None:
    config = parse_config(tomllib.loads(kubernetes_object("ConfigMap")["data"]["config.toml"]))
    container = daemonset_container()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert os.path.dirname(config.server.socket) in mounts
    assert config.server.state_dir in mounts
    assert config.server.listen_address is not None
    assert config.server.listen_address[1] == container["ports"][0]["containerPort"]
    for probe in daemonset_probe_commands():
        assert probe[:-1] == healthcheck_command()[:-1] and probe[-2] == config.server.socket
    for pool in config.pool:
        assert any(pool.path.startswith(path + "/") for path in mounts), f"pool {pool.name} is not mounted"


def test_ci_pod_sees_pool_and_socket_at_the_daemons_paths() -> None:
    """`near` and lease paths are the daemon's paths: the CI pod mounts the same hostPaths at the same places."""

    def host_paths(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if m["name"] in volumes}

    daemon_spec = kubernetes_object("DaemonSet")["spec"]["template"]["spec"]
    daemon = host_paths(daemon_spec, daemon_spec["containers"][0])
    pod = kubernetes_object("Pod", "ci-job-example")
    ci = host_paths(pod["spec"], pod["spec"]["containers"][0])
    assert all(mount == host for mount, host in ci.items()), ci
    config = parse_config(tomllib.loads(kubernetes_object("ConfigMap")["data"]["config.toml"]))
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["SCRATCHD_SOCKET"] == config.server.socket
    # The pool and the workspace sit below ONE mount in the CI pod, as in the daemon's.
    (pool_mount,) = [path for path in ci if config.pool[0].path.startswith(path + "/")]
    assert env["WORKSPACE"].startswith(pool_mount + "/") and daemon[pool_mount] == ci[pool_mount]
    assert (
        'scratchd run --near "$WORKSPACE" --tool uv -- uv pip install'
        in pod["spec"]["containers"][0]["args"][0]
    )


def test_daemon_speaks_the_notify_protocol_the_unit_expects(
    make_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Type=notify + ExecReload=kill -HUP + WatchdogSec=, against the real daemon process."""
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        daemon = make_daemon(start=False)
        daemon.start()

        def next_message(prefix: str) -> str:
            while not (message := notify.recv(4096).decode()).startswith(prefix):
                pass
            return message

        assert next_message("READY=1")
        assert next_message("WATCHDOG=1") and next_message("WATCHDOG=1")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        reloading = dict(line.split("=", 1) for line in next_message("RELOADING=1").splitlines())
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert next_message("READY=1")
        daemon.process.send_signal(signal.SIGTERM)
        assert next_message("STOPPING=1")
        assert daemon.stop() == 0


# -- Kubernetes: the CSI node plugin (docs/kubernetes.md) ----------------------------------------


def test_csidriver_serves_ephemeral_volumes_without_a_controller() -> None:
    driver = kubernetes_object("CSIDriver")
    assert driver["metadata"]["name"] == "csi.scratchd.dev"
    spec = driver["spec"]
    assert (spec["attachRequired"], spec["podInfoOnMount"], spec["fsGroupPolicy"]) == (False, True, "File")
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]


def test_csi_plugin_registrar_and_probe_agree_on_paths() -> None:
    spec = kubernetes_object("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    plugin, registrar, probe = (
        daemonset_container(name) for name in ("csi-plugin", "node-driver-registrar", "liveness-probe")
    )

    def mounted(container: dict[str, Any], path: str) -> dict[str, Any]:
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
        return mount

    def flag(container: dict[str, Any], name: str) -> str:
        (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
        return value

    assert plugin["args"][:3] == ["csi", "--endpoint", "unix:///csi/csi.sock"]
    for sidecar in (registrar, probe):
        assert flag(sidecar, "csi-address") == "/csi/csi.sock"
        assert mounted(sidecar, "/csi")["name"] == mounted(plugin, "/csi")["name"]
    # The kubelet finds the plugin at the registration path: the same socket, seen from the host.
    registration = flag(registrar, "kubelet-registration-path")
    assert registration == volumes[mounted(plugin, "/csi")["name"]] + "/csi.sock"
    assert volumes[mounted(registrar, "/registration")["name"]] == "/var/lib/kubelet/plugins_registry"
    # Mounts made at the pods' targets must reach the host (and from there, the pods).
    pods = mounted(plugin, "/var/lib/kubelet/pods")
    assert volumes[pods["name"]] == "/var/lib/kubelet/pods" and pods["mountPropagation"] == "Bidirectional"
    assert plugin["securityContext"]["privileged"] is True  # what Bidirectional requires
    # Liveness through the livenessprobe sidecar's port, which calls the plugin's Probe.
    (port,) = [p for p in plugin["ports"] if p["name"] == plugin["livenessProbe"]["httpGet"]["port"]]
    assert str(port["containerPort"]) == flag(probe, "health-port")
    # A client of the daemon's socket, and the lease paths the daemon answers are paths here too.
    config = parse_config(tomllib.loads(kubernetes_object("ConfigMap")["data"]["config.toml"]))
    env = {e["name"]: e for e in plugin["env"]}
    assert env["SCRATCHD_SOCKET"]["value"] == config.server.socket
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    daemon = daemonset_container()
    for path in (os.path.dirname(config.server.socket), *(m["mountPath"] for m in daemon["volumeMounts"])):
        if any(pool.path.startswith(path + "/") for pool in config.pool) or path in config.server.socket:
            assert mounted(plugin, path)["name"] == mounted(daemon, path)["name"], path


def test_csi_pod_example_declares_a_volume_the_plugin_takes() -> None:
    from scratchd.csi import attributes

    pod = kubernetes_object("Pod", "ci-job-csi-example")
    (volume,) = pod["spec"]["volumes"]
    assert volume["csi"]["driver"] == kubernetes_object("CSIDriver")["metadata"]["name"]
    kubelet = {attributes.POD_NAMESPACE: "ci", attributes.POD_NAME: "job", attributes.POD_UID: "1"}
    parsed = attributes.parse({**volume["csi"]["volumeAttributes"], **kubelet}, own_labels=8)
    assert parsed.cache_key and parsed.keep  # a cache key keeps a warm cache by default
    assert pod["spec"]["securityContext"]["fsGroup"]
    assert not any("hostPath" in v for v in pod["spec"]["volumes"])  # nothing privileged about it

"""Presets never hide the user's configuration: under `scratchd run --tool T` the real tool
still reads the user's config and credentials, while its caches go to the lease.

Each job runs with a HOME of its own holding the user's files, and none of the tool's
variables set, as on a fresh CI runner.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.shared_daemon

SCRATCHD = [sys.executable, "-m", "scratchd"]
CARGO = shutil.which("cargo") or shutil.which(os.path.expanduser("~/.cargo/bin/cargo"))
GRADLE = shutil.which("gradle")
TOOL_VARIABLES = (
    "CARGO_HOME",
    "CARGO_TARGET_DIR",
    "GRADLE_USER_HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "XDG_CACHE_HOME",
)


def run_tool(
    daemon, home: Path, tool: str, *command: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {name: value for name, value in os.environ.items() if name not in TOOL_VARIABLES}
    environ.update(SCRATCHD_SOCKET=daemon.socket, HOME=str(home), **(env or {}))
    return subprocess.run(
        [*SCRATCHD, "run", "-v", "--tool", tool, "--", *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
        cwd=cwd,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.mark.skipif(CARGO is None, reason="cargo is not installed")
def test_cargo_reads_the_users_config_and_credentials(daemon, home, tmp_path) -> None:
    cargo_home = home / ".cargo"
    cargo_home.mkdir()
    (cargo_home / "config.toml").write_text('[alias]\nscratchd-build = ["build", "--offline"]\n')
    (cargo_home / "credentials.toml").write_text('[registry]\ntoken = "the-users-token"\n')
    project = tmp_path / "probe"
    (project / "src").mkdir(parents=True)
    (project / "Cargo.toml").write_text('[package]\nname = "probe"\nversion = "0.1.0"\nedition = "2021"\n')
    (project / "src" / "main.rs").write_text("fn main() {}\n")
    # rustup's cargo finds its toolchains through RUSTUP_HOME, which the new HOME would move.
    rustup_home = os.environ.get("RUSTUP_HOME") or os.path.expanduser("~/.rustup")
    script = (
        f'"{CARGO}" scratchd-build && test -x "$CARGO_TARGET_DIR/debug/probe" '
        f'&& case "$CARGO_TARGET_DIR" in "$SCRATCHD_LEASE_PATH"/*) "{CARGO}" logout;; *) exit 9;; esac'
    )
    result = run_tool(
        daemon, home, "cargo", "sh", "-c", script, cwd=project, env={"RUSTUP_HOME": rustup_home}
    )
    assert result.returncode == 0, result.stderr
    assert not (project / "target").exists()  # built in the lease
    # `cargo logout` found the user's token (and removed it: it read credentials.toml).
    assert "has been removed" in result.stderr, result.stderr
    assert "the-users-token" not in (cargo_home / "credentials.toml").read_text()


def test_huggingface_reads_the_users_token(daemon, home) -> None:
    pytest.importorskip(
        "huggingface_hub", reason="huggingface_hub is not installed (pip install huggingface_hub)"
    )
    token_file = home / ".cache" / "huggingface" / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("hf_the_users_token")
    probe = (
        "import os, huggingface_hub\n"
        "from huggingface_hub import constants\n"
        "lease = os.environ['SCRATCHD_LEASE_PATH']\n"
        "assert constants.HF_HUB_CACHE.startswith(lease + '/'), constants.HF_HUB_CACHE\n"
        "assert os.environ['HF_DATASETS_CACHE'].startswith(lease + '/')\n"
        "print(huggingface_hub.get_token())\n"
    )
    result = run_tool(daemon, home, "huggingface", sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hf_the_users_token"


def users_gradle_home(home: Path) -> Path:
    gradle_home = home / ".gradle"
    (gradle_home / "init.d").mkdir(parents=True)
    (gradle_home / "gradle.properties").write_text("scratchdProbe=from-the-users-properties\n")
    (gradle_home / "init.d" / "probe.gradle").write_text(
        'allprojects { ext.scratchdInit = "from-the-users-init-d" }\n'
    )
    return gradle_home


def test_gradle_home_in_the_lease_carries_the_users_settings(daemon, home) -> None:
    users_gradle_home(home)
    script = 'cat "$GRADLE_USER_HOME/gradle.properties" "$GRADLE_USER_HOME/init.d/probe.gradle"; echo "$GRADLE_USER_HOME"'
    result = run_tool(daemon, home, "gradle", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    *copied, gradle_user_home = result.stdout.splitlines()
    assert copied == [
        "scratchdProbe=from-the-users-properties",
        'allprojects { ext.scratchdInit = "from-the-users-init-d" }',
    ]
    assert gradle_user_home.endswith("/gradle")
    for name in ("gradle.properties", "init.d"):  # and -v says so
        assert (
            f"scratchd: carried {home}/.gradle/{name} into the lease: {gradle_user_home}/{name}"
            in result.stderr
        )


@pytest.mark.skipif(GRADLE is None, reason="gradle is not installed (apt-get install gradle)")
def test_gradle_reads_the_users_properties_and_init_scripts(daemon, home, tmp_path) -> None:
    users_gradle_home(home)
    project = tmp_path / "probe"
    project.mkdir()
    (project / "settings.gradle").write_text("")
    (project / "build.gradle").write_text(
        'task probe { doLast { println "probe=${findProperty("scratchdProbe")} ${findProperty("scratchdInit")}" } }\n'
    )
    script = f'"{GRADLE}" --offline --no-daemon -q probe && test -d "$GRADLE_USER_HOME/caches"'
    result = run_tool(daemon, home, "gradle", "sh", "-c", script, cwd=project)
    assert result.returncode == 0, result.stderr
    assert "probe=from-the-users-properties from-the-users-init-d" in result.stdout
    assert not (home / ".gradle" / "caches").exists()  # its caches went to the lease

"""``pip install scratchd``: the CLI and the client alone, from the standard library; the daemon is an extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
OFFLINE = (
    "Could not find a version",
    "No matching distribution",
    "Failed to establish",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
)


def test_pip_install_scratchd_gives_the_client_and_cli_without_the_server(daemon, tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: a build in the checkout would leave build/ and *.egg-info there
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120
    )
    if made.returncode != 0:
        pytest.skip(f"cannot make a venv: {made.stderr.strip()[-300:]}")
    pip = subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    if pip.returncode != 0 and any(sign in pip.stderr for sign in OFFLINE):
        pytest.skip(
            f"pip cannot reach the package index (for setuptools, to build): {pip.stderr.strip()[-300:]}"
        )
    assert pip.returncode == 0, pip.stderr

    def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )

    installed = run(
        venv / "bin" / "pip", "list", "--format=freeze", "--disable-pip-version-check"
    ).stdout.split()
    assert {line.split("==")[0].lower() for line in installed} - {"pip", "setuptools"} == {"scratchd"}
    assert run(venv / "bin" / "python", "-c", "import fastapi").returncode != 0
    version = run(venv / "bin" / "scratchd", "--version")
    assert version.returncode == 0 and version.stdout.startswith("scratchd "), version.stderr
    helped = run(venv / "bin" / "scratchd", "run", "--help")
    assert helped.returncode == 0 and "-- CMD" in helped.stdout, helped.stderr
    used = run(
        venv / "bin" / "scratchd",
        "--socket",
        daemon.socket,
        "run",
        "--tool",
        "uv",
        "--",
        "sh",
        "-c",
        'test -d "$UV_CACHE_DIR"',
    )
    assert used.returncode == 0, used.stderr
    served = run(venv / "bin" / "scratchd", "serve")
    assert served.returncode == 1
    assert served.stderr.startswith("scratchd: serve needs the server's dependencies (")
    assert "pip install 'scratchd[server]'" in served.stderr and "Traceback" not in served.stderr

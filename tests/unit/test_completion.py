"""``scratchd completion SHELL``: each script loads in its shell and completes commands, options and values."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchd.presets import PRESETS

SCRATCHD = [sys.executable, "-m", "scratchd"]
# The scripts run `scratchd ls` and `scratchd caches` for ids: this installation's, on no daemon.
SHELL_ENV = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
CASES = [  # what is typed, what must be offered (exactly)
    ("scratchd l", {"lease", "ls"}),
    ("scratchd --socket /x.sock l", {"lease", "ls"}),
    ("scratchd lease --placement ", {"prefer-same-filesystem", "same-filesystem", "any"}),
    ("scratchd run --tool u", {name for name in PRESETS if name.startswith("u")}),
    ("scratchd completion ", {"bash", "zsh", "fish"}),
    ("scratchd events --fo", {"--follow"}),
    ("scratchd run --cache-", {"--cache-key", "--cache-fallback"}),
    ("scratchd run --keep ", {"success", "always", "never"}),
    ("scratchd release --d", {"--discard"}),
    ("scratchd ca", {"caches"}),
    ("scratchd caches ", {"rm"}),
    ("scratchd caches rm --s", {"--socket"}),
]
AFTER_RM = "scratchd caches rm "  # cache ids, from a daemon (none here); never `rm` again


def script(shell: str, tmp_path: Path) -> Path:
    result = subprocess.run([*SCRATCHD, "completion", shell], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    path = tmp_path / f"scratchd.{shell}"
    path.write_text(result.stdout)
    return path


def needs(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")


def test_bash_loads_it_and_completes(tmp_path: Path) -> None:
    needs("bash")
    loaded = subprocess.run(
        ["bash", "-c", f"source <({' '.join(SCRATCHD)} completion bash); complete -p scratchd"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.returncode == 0 and loaded.stdout.strip() == "complete -F _scratchd scratchd", loaded.stderr
    path = script("bash", tmp_path)
    for line, offered in [*CASES, ("scratchd run --ttl 1h -- ech", {"echo"}), (AFTER_RM, set())]:
        words = line.split(" ")
        probe = (
            f"source {path}; COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
            '_scratchd; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        result = subprocess.run(
            ["bash", "-c", probe], capture_output=True, text=True, timeout=60, env=SHELL_ENV
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert set(result.stdout.split()) == offered, line


def test_fish_loads_it_and_completes(tmp_path: Path) -> None:
    needs("fish")
    path = script("fish", tmp_path)
    for line, offered in [*CASES, (AFTER_RM, set())]:
        result = subprocess.run(
            ["fish", "-c", f"source {path}; complete -C {line!r}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=SHELL_ENV,
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert {row.split("\t")[0] for row in result.stdout.splitlines()} == offered, line


def zsh_completions(script: Path, line: str) -> set[str]:
    """What an interactive zsh offers for ``line`` + Tab: every match compadd is given, caught on the way."""
    pid, terminal = pty.fork()
    if pid == 0:
        os.execvpe("zsh", ["zsh", "-f", "-i"], SHELL_ENV)
    try:

        def send(text: str) -> None:
            os.write(terminal, text.encode())

        def read_until(marker: str) -> str:
            seen, deadline = b"", time.monotonic() + 20
            while marker.encode() not in seen:
                assert time.monotonic() < deadline, f"no {marker!r} from zsh: {seen[-500:]!r}"
                if select.select([terminal], [], [], 0.1)[0]:
                    seen += os.read(terminal, 65536)
            return seen.decode(errors="replace")

        send("PROMPT='%% '; autoload -U compinit && compinit -u -D\n")
        send(f"source {script}\n")
        send(
            'compadd() { local -a h; builtin compadd -O h "$@"; print -rn -- " HIT:"${^h}" "; builtin compadd "$@" }\n'
        )
        # The completion function, then a mark: all it offered comes before that.
        send(
            'functions[_scratchd_itself]=$functions[_scratchd]; _scratchd() { _scratchd_itself; print -rn " DONE"42 }\n'
        )
        send("print READY$((6 * 7))\n")
        read_until("READY42")
        send(line + "\t")
        return {word[4:] for word in read_until("DONE42").split() if word.startswith("HIT:")}
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_zsh_loads_it_and_completes(tmp_path: Path) -> None:
    needs("zsh")
    path = script("zsh", tmp_path)
    loaded = subprocess.run(
        [
            "zsh",
            "-f",
            "-c",
            f"autoload -U compinit && compinit -u -D; source {path}; print $_comps[scratchd]",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.stdout.strip() == "_scratchd", loaded.stderr
    for line, offered in CASES:
        assert zsh_completions(path, line) == offered, line
    assert "rm" not in zsh_completions(path, AFTER_RM)
    commands = zsh_completions(path, "scratchd run --ttl 1h -- ech")  # echo, and zsh's echotc and echoti
    assert "echo" in commands and all(word.startswith("ech") for word in commands)

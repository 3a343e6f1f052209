"""Tool presets: point a build tool's caches into ``<lease>/<tool>`` (PRESETS.md).

Data plus one pure function, so ``scratchd run`` and ``scratchd lease --shell``
plan the same environment and tests can check it without a daemon.
Standard library only, and light: this is on the ``scratchd run`` path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


class UnknownTool(ValueError):
    """A ``--tool`` name with no preset; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown tool {name!r} (known: {', '.join(PRESETS)})")
        self.name = name


class Preset:
    """One row of PRESETS.md.

    ``paths`` maps a variable to a subdirectory of ``<lease>/<tool>`` ("" for that
    directory itself). ``fixed`` values are set as given. ``append`` flags are added
    to the variable's current value (``{dir}`` stands for ``<lease>/<tool>``).
    ``copy_mode`` values are set only when the lease is known to be off ``near``'s
    mount. Never a symlink mode: the lease is deleted when it ends.
    """

    __slots__ = ("name", "paths", "fixed", "append", "copy_mode")

    def __init__(
        self,
        name: str,
        paths: Mapping[str, str] | None = None,
        *,
        fixed: Mapping[str, str] | None = None,
        append: Mapping[str, str] | None = None,
        copy_mode: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.paths = dict(paths or {})
        self.fixed = dict(fixed or {})
        self.append = dict(append or {})
        self.copy_mode = dict(copy_mode or {})


# Rows marked (verify) in PRESETS.md use its variable names as given, pending a
# check against each tool's current docs: POETRY_CACHE_DIR (+ virtualenvs in
# project), PDM_CACHE_DIR / PDM_INSTALL_CACHE, pnpm's npm_config_cache_dir,
# YARN_NM_MODE, CCACHE_HARDLINK, MAVEN_ARGS.
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("uv", {"UV_CACHE_DIR": ""}, copy_mode={"UV_LINK_MODE": "copy"}),
        Preset("pip", {"PIP_CACHE_DIR": ""}),
        # Poetry's default virtualenv path lives under its cache dir: keep venvs out of the lease.
        Preset("poetry", {"POETRY_CACHE_DIR": ""}, fixed={"POETRY_VIRTUALENVS_IN_PROJECT": "true"}),
        Preset("pdm", {"PDM_CACHE_DIR": ""}, copy_mode={"PDM_INSTALL_CACHE": "false"}),
        Preset("npm", {"npm_config_cache": ""}),
        Preset(
            "pnpm",
            {"npm_config_store_dir": "store", "npm_config_cache_dir": "cache"},
            copy_mode={"npm_config_package_import_method": "copy"},
        ),
        Preset(
            "yarn",
            {"YARN_GLOBAL_FOLDER": "global", "YARN_CACHE_FOLDER": "cache"},
            copy_mode={"YARN_NM_MODE": "classic"},
        ),
        # bun has a copy backend only as a flag (--backend=copyfile); it falls back by itself.
        Preset("bun", {"BUN_INSTALL_CACHE_DIR": ""}),
        Preset("cargo", {"CARGO_HOME": "home", "CARGO_TARGET_DIR": "target"}),
        # The module cache is read-only without -modcacherw, and the daemon could not delete it.
        Preset(
            "go",
            {"GOCACHE": "cache", "GOMODCACHE": "mod", "GOTMPDIR": "tmp"},
            append={"GOFLAGS": "-modcacherw"},
        ),
        Preset(
            "ccache",
            {"CCACHE_DIR": "cache", "CCACHE_TEMPDIR": "tmp"},
            copy_mode={"CCACHE_HARDLINK": "false"},
        ),
        Preset("sccache", {"SCCACHE_DIR": ""}),
        Preset("gradle", {"GRADLE_USER_HOME": ""}),
        # Appended, not set: CI often puts flags such as -B in MAVEN_ARGS already.
        Preset("maven", append={"MAVEN_ARGS": "-Dmaven.repo.local={dir}"}),
        Preset("conda", {"CONDA_PKGS_DIRS": ""}, copy_mode={"CONDA_ALWAYS_COPY": "true"}),
        Preset("deno", {"DENO_DIR": ""}),
        Preset("huggingface", {"HF_HOME": ""}),
        Preset("pre-commit", {"PRE_COMMIT_HOME": ""}),
        Preset("tmp", {"TMPDIR": ""}),
        Preset("xdg", {"XDG_CACHE_HOME": ""}),
    )
}


class PresetPlan:
    """What to do for some tools: variables to set, directories to create, names left to the user."""

    __slots__ = ("env", "directories", "skipped")

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        self.directories: list[str] = []
        self.skipped: list[str] = []


def preset_env(
    tools: Sequence[str],
    lease_path: str,
    same_filesystem: bool | None,
    environ: Mapping[str, str],
) -> PresetPlan:
    """Plan the environment for ``tools`` in the lease at ``lease_path``.

    A variable already set (non-empty) in ``environ`` is left alone and listed in
    ``skipped``; an ``append`` flag whose option is already there is skipped too.
    Copy modes are set only when ``same_filesystem is False``: ``None`` means the
    lease was placed without ``near``, so nothing says the tool's output is on
    another mount, and forcing copies would slow every install on a guess (the
    tools fall back to copying by themselves when a link fails).
    """
    plan = PresetPlan()
    for name in dict.fromkeys(tools):
        preset = PRESETS.get(name)
        if preset is None:
            raise UnknownTool(name)
        tool_dir = os.path.join(lease_path, name)
        plan.directories.append(tool_dir)
        wanted = {var: os.path.join(tool_dir, sub) if sub else tool_dir for var, sub in preset.paths.items()}
        plan.directories.extend(path for path in wanted.values() if path != tool_dir)
        wanted.update(preset.fixed)
        if same_filesystem is False:
            wanted.update(preset.copy_mode)
        for var, value in wanted.items():
            if environ.get(var):
                plan.skipped.append(var)
            else:
                plan.env[var] = value
        for var, flag in preset.append.items():
            flag = flag.replace("{dir}", tool_dir)
            current = plan.env.get(var, environ.get(var, ""))
            option = flag.split("=", 1)[0]
            if any(word.split("=", 1)[0] == option for word in current.split()):
                plan.skipped.append(var)
            else:
                plan.env[var] = f"{current} {flag}" if current else flag
    return plan

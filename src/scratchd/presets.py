"""Tool presets: point a build tool's caches into ``<lease>/<tool>`` (docs/cli.md, "Tool presets").

Data plus pure functions, so ``scratchd run`` and ``scratchd lease --shell``
plan the same environment and tests can check it without a daemon.
Standard library only, and light: this is on the ``scratchd run`` path.
"""

from __future__ import annotations

import posixpath  # os.path's joins, without importing os into the pure core
from collections.abc import Mapping, Sequence

LINK_MODES = ("hardlink", "clone", "copy")


class UnknownTool(ValueError):
    """A ``--tool`` name with no preset; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown tool {name!r} (known: {', '.join(PRESETS)})")
        self.name = name


class Preset:
    """One row of the presets table (docs/cli.md, "Tool presets").

    ``paths`` maps a variable to a subdirectory of ``<lease>/<tool>`` ("" for that
    directory itself); ``scratch`` maps one to a subdirectory of the lease that
    tools share (``<lease>/tmp``). ``fixed`` values are set as given. ``append``
    flags are added to the variable's current value (``{dir}`` stands for
    ``<lease>/<tool>``). ``copy_mode`` and ``clone_mode`` are set on the lease's
    ``link_mode`` of that name, and only when the preset set every variable of
    ``links_from`` (default: all ``paths``), the cache the tool links out of: a
    cache the user pointed elsewhere is not the lease's. ``carry`` names, for a
    variable that moves the tool's home, the user's config files in its default
    home (relative to ``$HOME``) to copy into the lease's. Never a symlink mode:
    the lease is deleted when it ends.
    """

    __slots__ = ("append", "carry", "fixed", "links_from", "modes", "name", "paths", "scratch")

    def __init__(
        self,
        name: str,
        paths: Mapping[str, str] | None = None,
        *,
        scratch: Mapping[str, str] | None = None,
        fixed: Mapping[str, str] | None = None,
        append: Mapping[str, str] | None = None,
        copy_mode: Mapping[str, str] | None = None,
        clone_mode: Mapping[str, str] | None = None,
        links_from: Sequence[str] | None = None,
        carry: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    ) -> None:
        self.name = name
        self.paths = dict(paths or {})
        self.scratch = dict(scratch or {})
        self.fixed = dict(fixed or {})
        self.append = dict(append or {})
        self.modes = {"copy": dict(copy_mode or {}), "clone": dict(clone_mode or {})}
        self.links_from = tuple(self.paths if links_from is None else links_from)
        self.carry = dict(carry or {})


def _pnpm(setting: str) -> dict[str, str]:
    """pnpm ≤ 10 reads ``npm_config_*``, pnpm ≥ 11 only ``pnpm_config_*``: both, the same."""
    return {f"{prefix}_config_{setting}": "" for prefix in ("npm", "pnpm")}


# Not every row is confirmed: these names are taken as given, pending a
# check against each tool's current docs: POETRY_CACHE_DIR (+ virtualenvs in
# project), PDM_CACHE_DIR / PDM_INSTALL_CACHE, YARN_NM_MODE, MAVEN_ARGS.
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        # TMPDIR too: `uv --no-cache` makes its throw-away cache there, and must link out of it.
        Preset(
            "uv",
            {"UV_CACHE_DIR": ""},
            scratch={"TMPDIR": "tmp"},
            copy_mode={"UV_LINK_MODE": "copy"},
            clone_mode={"UV_LINK_MODE": "clone"},
        ),
        Preset("pip", {"PIP_CACHE_DIR": ""}),
        # Poetry's default virtualenv path lives under its cache dir: keep venvs out of the lease.
        Preset("poetry", {"POETRY_CACHE_DIR": ""}, fixed={"POETRY_VIRTUALENVS_IN_PROJECT": "true"}),
        Preset("pdm", {"PDM_CACHE_DIR": ""}, copy_mode={"PDM_INSTALL_CACHE": "false"}),
        Preset("npm", {"npm_config_cache": ""}),
        Preset(
            "pnpm",
            {name: "store" for name in _pnpm("store_dir")} | {name: "cache" for name in _pnpm("cache_dir")},
            copy_mode={name: "copy" for name in _pnpm("package_import_method")},
            clone_mode={name: "clone" for name in _pnpm("package_import_method")},
            links_from=tuple(_pnpm("store_dir")),
        ),
        Preset(
            "yarn",
            {"YARN_GLOBAL_FOLDER": "global", "YARN_CACHE_FOLDER": "cache"},
            copy_mode={"YARN_NM_MODE": "classic"},
        ),
        # bun has a copy backend only as a flag (--backend=copyfile); it falls back by itself.
        Preset("bun", {"BUN_INSTALL_CACHE_DIR": ""}),
        # Not CARGO_HOME: it holds the user's config.toml, credentials.toml and installed
        # binaries, and cargo never links out of it (only inside the target dir), so the
        # lease would gain nothing but a download cache, at the price of hiding them.
        Preset("cargo", {"CARGO_TARGET_DIR": "target"}),
        # The module cache is read-only without -modcacherw, and the daemon could not delete it.
        Preset(
            "go",
            {"GOCACHE": "cache", "GOMODCACHE": "mod", "GOTMPDIR": "tmp"},
            append={"GOFLAGS": "-modcacherw"},
        ),
        # ccache copies by default; 4.x rejects CCACHE_HARDLINK=false, so no mode is ever set.
        Preset("ccache", {"CCACHE_DIR": "cache", "CCACHE_TEMPDIR": "tmp"}),
        Preset("sccache", {"SCCACHE_DIR": ""}),
        # Gradle has no cache-only variable: its home moves, with the user's settings and init scripts.
        Preset(
            "gradle",
            {"GRADLE_USER_HOME": ""},
            carry={
                "GRADLE_USER_HOME": (
                    ".gradle",
                    ("gradle.properties", "init.d", "init.gradle", "init.gradle.kts"),
                )
            },
        ),
        # Appended, not set: CI often puts flags such as -B in MAVEN_ARGS already.
        Preset("maven", append={"MAVEN_ARGS": "-Dmaven.repo.local={dir}"}),
        Preset("conda", {"CONDA_PKGS_DIRS": ""}, copy_mode={"CONDA_ALWAYS_COPY": "true"}),
        Preset("deno", {"DENO_DIR": ""}),
        # Not HF_HOME: the user's token lives there.
        Preset("huggingface", {"HF_HUB_CACHE": "hub", "HF_DATASETS_CACHE": "datasets"}),
        Preset("pre-commit", {"PRE_COMMIT_HOME": ""}),
        Preset("tmp", {"TMPDIR": ""}),
        Preset("xdg", {"XDG_CACHE_HOME": ""}),
    )
}


def lease_link_mode(lease: Mapping[str, object]) -> str | None:
    """The lease's ``link_mode``; from ``same_filesystem`` when the daemon is older than it."""
    if "link_mode" in lease:
        mode = lease["link_mode"]
        return mode if mode in LINK_MODES else None
    same_filesystem = lease.get("same_filesystem")
    if same_filesystem is None:
        return None
    return "hardlink" if same_filesystem else "copy"


class PresetPlan:
    """What to do for some tools: variables to set, directories to create, names left to
    the user, and the user's config files to copy (``(source, destination)``)."""

    __slots__ = ("carried", "directories", "env", "skipped")

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        self.directories: list[str] = []
        self.skipped: list[str] = []
        self.carried: list[tuple[str, str]] = []


def preset_env(
    tools: Sequence[str],
    lease_path: str,
    link_mode: str | None,
    environ: Mapping[str, str],
) -> PresetPlan:
    """Plan the environment for ``tools`` in the lease at ``lease_path``.

    A variable already set (non-empty) in ``environ`` is left alone and listed in
    ``skipped``; an ``append`` flag whose option is already there is skipped too.
    ``link_mode`` is the lease's: ``hardlink`` and ``None`` (placed without
    ``near``: nothing says the output is on another mount, and forcing copies
    would slow every install on a guess) set no mode.
    """
    plan = PresetPlan()
    for name in dict.fromkeys(tools):
        preset = PRESETS.get(name)
        if preset is None:
            raise UnknownTool(name)
        tool_dir = posixpath.join(lease_path, name)
        plan.directories.append(tool_dir)
        wanted = {
            var: posixpath.join(tool_dir, sub) if sub else tool_dir for var, sub in preset.paths.items()
        }
        wanted.update({var: posixpath.join(lease_path, sub) for var, sub in preset.scratch.items()})
        plan.directories.extend(wanted.values())
        wanted.update(preset.fixed)
        _set_unless_given(plan, wanted, environ)
        if all(var in plan.env for var in preset.links_from):
            _set_unless_given(plan, preset.modes.get(link_mode or "", {}), environ)
        for var, flag in preset.append.items():
            flag = flag.replace("{dir}", tool_dir)
            current = plan.env.get(var, environ.get(var, ""))
            option = flag.split("=", 1)[0]
            if any(word.split("=", 1)[0] == option for word in current.split()):
                plan.skipped.append(var)
            else:
                plan.env[var] = f"{current} {flag}" if current else flag
        for var, (home, names) in preset.carry.items():
            if var in plan.env and environ.get("HOME"):
                source = posixpath.join(environ["HOME"], home)
                plan.carried += [
                    (posixpath.join(source, file), posixpath.join(plan.env[var], file)) for file in names
                ]
    plan.directories = list(dict.fromkeys(plan.directories))
    return plan


def _set_unless_given(plan: PresetPlan, values: Mapping[str, str], environ: Mapping[str, str]) -> None:
    for var, value in values.items():
        if environ.get(var):
            plan.skipped.append(var)
        else:
            plan.env[var] = value

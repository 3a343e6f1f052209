"""Tool presets (docs/cli.md, "Tool presets"): where each tool's variables point, and what is left to the user."""

from __future__ import annotations

import os

import pytest

from scratchd.presets import PRESETS, UnknownTool, lease_link_mode, preset_env

LEASE = "/pool/lease-1"

# Every preset, with the variables it points into the lease.
TABLE = {
    "uv": {"UV_CACHE_DIR"},
    "pip": {"PIP_CACHE_DIR"},
    "poetry": {"POETRY_CACHE_DIR"},
    "pdm": {"PDM_CACHE_DIR"},
    "npm": {"npm_config_cache"},
    "pnpm": {
        "npm_config_store_dir",
        "npm_config_cache_dir",
        "pnpm_config_store_dir",
        "pnpm_config_cache_dir",
    },
    "yarn": {"YARN_GLOBAL_FOLDER", "YARN_CACHE_FOLDER"},
    "bun": {"BUN_INSTALL_CACHE_DIR"},
    "cargo": {"CARGO_TARGET_DIR"},
    "go": {"GOCACHE", "GOMODCACHE", "GOTMPDIR"},
    "ccache": {"CCACHE_DIR", "CCACHE_TEMPDIR"},
    "sccache": {"SCCACHE_DIR"},
    "gradle": {"GRADLE_USER_HOME"},
    "maven": set(),
    "conda": {"CONDA_PKGS_DIRS"},
    "deno": {"DENO_DIR"},
    "huggingface": {"HF_HUB_CACHE", "HF_DATASETS_CACHE"},
    "pre-commit": {"PRE_COMMIT_HOME"},
    "tmp": {"TMPDIR"},
    "xdg": {"XDG_CACHE_HOME"},
}

# Variables pointing into a subdirectory of the lease that tools share, not their own.
SCRATCH = {"uv": {"TMPDIR": f"{LEASE}/tmp"}}

# What each link mode sets, by tool; hardlink and None set nothing anywhere.
MODES = {
    "copy": {
        "uv": {"UV_LINK_MODE": "copy"},
        "pdm": {"PDM_INSTALL_CACHE": "false"},
        "pnpm": {"npm_config_package_import_method": "copy", "pnpm_config_package_import_method": "copy"},
        "yarn": {"YARN_NM_MODE": "classic"},
        "conda": {"CONDA_ALWAYS_COPY": "true"},
    },
    "clone": {
        "uv": {"UV_LINK_MODE": "clone"},
        "pnpm": {"npm_config_package_import_method": "clone", "pnpm_config_package_import_method": "clone"},
    },
}
MODE_VARIABLES = {name for by_tool in MODES.values() for values in by_tool.values() for name in values}

# The cache each mode is about: set by the user, it is not the lease's, and no mode is set.
CACHES = {
    "uv": ["UV_CACHE_DIR"],
    "pdm": ["PDM_CACHE_DIR"],
    "pnpm": ["npm_config_store_dir", "pnpm_config_store_dir"],
    "yarn": ["YARN_GLOBAL_FOLDER"],
    "conda": ["CONDA_PKGS_DIRS"],
}


def inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def test_every_row_of_presets_md_has_a_preset() -> None:
    assert set(PRESETS) == set(TABLE)


@pytest.mark.parametrize("tool", sorted(TABLE))
def test_variables_land_inside_the_tool_directory(tool: str) -> None:
    plan = preset_env([tool], LEASE, "hardlink", environ={})
    tool_dir = f"{LEASE}/{tool}"
    scratch = SCRATCH.get(tool, {})
    assert TABLE[tool] <= set(plan.env)
    assert scratch.items() <= plan.env.items()
    for name in TABLE[tool]:
        assert inside(plan.env[name], tool_dir), (name, plan.env[name])
    assert tool_dir in plan.directories
    assert all(inside(directory, tool_dir) or directory in scratch.values() for directory in plan.directories)
    # Every directory a variable names is one the plan creates.
    assert {plan.env[name] for name in TABLE[tool] | set(scratch)} <= set(plan.directories)
    assert plan.skipped == []


def test_directories_of_a_tool_are_distinct() -> None:
    plan = preset_env(["go", "cargo", "pnpm", "yarn", "ccache", "uv", "tmp"], LEASE, "hardlink", {})
    assert len(plan.directories) == len(set(plan.directories))
    assert plan.env["GOCACHE"] != plan.env["GOMODCACHE"] != plan.env["GOTMPDIR"]
    assert plan.env["npm_config_store_dir"] != plan.env["npm_config_cache_dir"]
    assert plan.env["TMPDIR"] == f"{LEASE}/tmp"  # uv's and the tmp preset's: the same


def test_fixed_and_appended_values() -> None:
    plan = preset_env(["poetry", "go", "maven"], LEASE, "hardlink", {})
    assert plan.env["POETRY_VIRTUALENVS_IN_PROJECT"] == "true"
    assert plan.env["GOFLAGS"] == "-modcacherw"
    assert plan.env["MAVEN_ARGS"] == f"-Dmaven.repo.local={LEASE}/maven"


def test_goflags_is_appended_to_the_users_value() -> None:
    plan = preset_env(["go"], LEASE, "hardlink", {"GOFLAGS": "-mod=vendor -trimpath"})
    assert plan.env["GOFLAGS"] == "-mod=vendor -trimpath -modcacherw"
    assert "GOFLAGS" not in plan.skipped


def test_an_appended_option_already_there_is_left_alone() -> None:
    environ = {"GOFLAGS": "-modcacherw", "MAVEN_ARGS": "-B -Dmaven.repo.local=/mine"}
    plan = preset_env(["go", "maven"], LEASE, "hardlink", environ)
    assert "GOFLAGS" not in plan.env
    assert "MAVEN_ARGS" not in plan.env
    assert {"GOFLAGS", "MAVEN_ARGS"} <= set(plan.skipped)


def test_maven_args_keeps_the_users_flags() -> None:
    plan = preset_env(["maven"], LEASE, "hardlink", {"MAVEN_ARGS": "-B"})
    assert plan.env["MAVEN_ARGS"] == f"-B -Dmaven.repo.local={LEASE}/maven"


def test_variables_the_user_set_are_left_alone() -> None:
    environ = {
        "UV_CACHE_DIR": "/home/me/.cache/uv",
        "POETRY_VIRTUALENVS_IN_PROJECT": "false",
        "GOCACHE": "/c",
    }
    plan = preset_env(["uv", "poetry", "go"], LEASE, "copy", environ)
    for name in environ:
        assert name not in plan.env
        assert name in plan.skipped
    assert plan.env["GOMODCACHE"] == f"{LEASE}/go/mod"
    assert "UV_LINK_MODE" not in plan.env  # the cache is the user's, not the lease's


def test_an_empty_variable_counts_as_unset() -> None:
    plan = preset_env(["uv"], LEASE, "hardlink", {"UV_CACHE_DIR": ""})
    assert plan.env["UV_CACHE_DIR"] == f"{LEASE}/uv"


def test_a_copy_mode_the_user_set_is_left_alone() -> None:
    plan = preset_env(["uv"], LEASE, "copy", {"UV_LINK_MODE": "hardlink"})
    assert "UV_LINK_MODE" not in plan.env
    assert plan.skipped == ["UV_LINK_MODE"]


@pytest.mark.parametrize("mode", ["copy", "clone"])
@pytest.mark.parametrize("tool", sorted(PRESETS))
def test_a_link_mode_sets_the_tools_own_setting(tool: str, mode: str) -> None:
    env = preset_env([tool], LEASE, mode, {}).env
    wanted = MODES[mode].get(tool, {})
    assert wanted.items() <= env.items()
    assert not (MODE_VARIABLES - set(wanted)) & set(env), (tool, mode)


@pytest.mark.parametrize("mode", ["hardlink", None])
def test_hardlink_or_no_near_forces_nothing(mode: str | None) -> None:
    env = preset_env(list(PRESETS), LEASE, mode, {}).env
    assert not MODE_VARIABLES & set(env)


@pytest.mark.parametrize("mode", ["copy", "clone"])
@pytest.mark.parametrize("tool", sorted(CACHES))
def test_no_mode_for_a_cache_the_user_pointed_elsewhere(tool: str, mode: str) -> None:
    for cache in CACHES[tool]:
        plan = preset_env([tool], LEASE, mode, {cache: "/home/me/cache"})
        assert not MODE_VARIABLES & set(plan.env), (tool, cache)
        assert cache in plan.skipped


def test_ccache_never_gets_a_hardlink_setting() -> None:
    """ccache 4.x refuses CCACHE_HARDLINK=false; it copies by default anyway."""
    for mode in ("hardlink", "clone", "copy", None):
        assert not any(
            name.startswith("CCACHE_HARDLINK") for name in preset_env(["ccache"], LEASE, mode, {}).env
        )


def test_uv_points_tmpdir_into_the_lease_unless_set() -> None:
    assert preset_env(["uv"], LEASE, "hardlink", {}).env["TMPDIR"] == f"{LEASE}/tmp"
    plan = preset_env(["uv"], LEASE, "hardlink", {"TMPDIR": "/scratch"})
    assert "TMPDIR" not in plan.env and "TMPDIR" in plan.skipped
    assert plan.env["UV_CACHE_DIR"] == f"{LEASE}/uv"


@pytest.mark.parametrize(
    "lease, mode",
    [
        ({"link_mode": "clone", "same_filesystem": False}, "clone"),
        ({"link_mode": None, "same_filesystem": None}, None),
        ({"link_mode": "hardlink"}, "hardlink"),
        ({"same_filesystem": True}, "hardlink"),  # a daemon older than link_mode
        ({"same_filesystem": False}, "copy"),
        ({"same_filesystem": None}, None),
        ({}, None),
    ],
)
def test_lease_link_mode(lease: dict, mode: str | None) -> None:
    assert lease_link_mode(lease) == mode


@pytest.mark.parametrize("mode", ["hardlink", "clone", "copy", None])
def test_never_a_symlink_mode(mode: str | None) -> None:
    plan = preset_env(list(PRESETS), LEASE, mode, {})
    for name, value in plan.env.items():
        assert "symlink" not in value.lower(), (name, value)


def test_presets_never_move_a_home_that_holds_config_without_carrying_it() -> None:
    plan = preset_env(list(PRESETS), LEASE, None, {"HOME": "/home/me"})
    assert not {"CARGO_HOME", "HF_HOME"} & set(plan.env)
    assert ("/home/me/.gradle/gradle.properties", f"{LEASE}/gradle/gradle.properties") in plan.carried
    assert ("/home/me/.gradle/init.d", f"{LEASE}/gradle/init.d") in plan.carried


def test_nothing_is_carried_into_a_home_the_user_set() -> None:
    assert preset_env(["gradle"], LEASE, None, {"HOME": "/h", "GRADLE_USER_HOME": "/g"}).carried == []


def test_unknown_tool_lists_the_known_ones() -> None:
    with pytest.raises(UnknownTool) as caught:
        preset_env(["uv", "nope"], LEASE, "hardlink", {})
    message = str(caught.value)
    assert "'nope'" in message
    for tool in PRESETS:
        assert tool in message


def test_a_tool_given_twice_is_planned_once() -> None:
    plan = preset_env(["go", "go"], LEASE, "hardlink", {})
    assert plan.env["GOFLAGS"] == "-modcacherw"
    assert len(plan.directories) == len(set(plan.directories))


def test_the_plan_is_pure() -> None:
    environ = {"GOFLAGS": "-x"}
    preset_env(["go"], LEASE, "copy", environ)
    assert environ == {"GOFLAGS": "-x"}
    assert not os.path.exists(LEASE)

"""Tool presets (PRESETS.md): where each tool's variables point, and what is left to the user."""

from __future__ import annotations

import os

import pytest

from scratchd.presets import PRESETS, UnknownTool, preset_env

LEASE = "/pool/lease-1"

# Every row of PRESETS.md, with the variables it points into the lease.
TABLE = {
    "uv": {"UV_CACHE_DIR"},
    "pip": {"PIP_CACHE_DIR"},
    "poetry": {"POETRY_CACHE_DIR"},
    "pdm": {"PDM_CACHE_DIR"},
    "npm": {"npm_config_cache"},
    "pnpm": {"npm_config_store_dir", "npm_config_cache_dir"},
    "yarn": {"YARN_GLOBAL_FOLDER", "YARN_CACHE_FOLDER"},
    "bun": {"BUN_INSTALL_CACHE_DIR"},
    "cargo": {"CARGO_HOME", "CARGO_TARGET_DIR"},
    "go": {"GOCACHE", "GOMODCACHE", "GOTMPDIR"},
    "ccache": {"CCACHE_DIR", "CCACHE_TEMPDIR"},
    "sccache": {"SCCACHE_DIR"},
    "gradle": {"GRADLE_USER_HOME"},
    "maven": set(),
    "conda": {"CONDA_PKGS_DIRS"},
    "deno": {"DENO_DIR"},
    "huggingface": {"HF_HOME"},
    "pre-commit": {"PRE_COMMIT_HOME"},
    "tmp": {"TMPDIR"},
    "xdg": {"XDG_CACHE_HOME"},
}

COPY_MODES = {
    "uv": {"UV_LINK_MODE": "copy"},
    "pdm": {"PDM_INSTALL_CACHE": "false"},
    "pnpm": {"npm_config_package_import_method": "copy"},
    "yarn": {"YARN_NM_MODE": "classic"},
    "ccache": {"CCACHE_HARDLINK": "false"},
    "conda": {"CONDA_ALWAYS_COPY": "true"},
}


def inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def test_every_row_of_presets_md_has_a_preset() -> None:
    assert set(PRESETS) == set(TABLE)


@pytest.mark.parametrize("tool", sorted(TABLE))
def test_variables_land_inside_the_tool_directory(tool: str) -> None:
    plan = preset_env([tool], LEASE, same_filesystem=True, environ={})
    tool_dir = f"{LEASE}/{tool}"
    assert TABLE[tool] <= set(plan.env)
    for name in TABLE[tool]:
        assert inside(plan.env[name], tool_dir), (name, plan.env[name])
    assert tool_dir in plan.directories
    assert all(inside(directory, tool_dir) for directory in plan.directories)
    # Every directory a variable names is one the plan creates.
    assert {plan.env[name] for name in TABLE[tool]} <= set(plan.directories)
    assert plan.skipped == []


def test_directories_of_a_tool_are_distinct() -> None:
    plan = preset_env(["go", "cargo", "pnpm", "yarn", "ccache"], LEASE, True, {})
    assert len(plan.directories) == len(set(plan.directories))
    assert plan.env["GOCACHE"] != plan.env["GOMODCACHE"] != plan.env["GOTMPDIR"]
    assert plan.env["CARGO_HOME"] != plan.env["CARGO_TARGET_DIR"]


def test_fixed_and_appended_values() -> None:
    plan = preset_env(["poetry", "go", "maven"], LEASE, True, {})
    assert plan.env["POETRY_VIRTUALENVS_IN_PROJECT"] == "true"
    assert plan.env["GOFLAGS"] == "-modcacherw"
    assert plan.env["MAVEN_ARGS"] == f"-Dmaven.repo.local={LEASE}/maven"


def test_goflags_is_appended_to_the_users_value() -> None:
    plan = preset_env(["go"], LEASE, True, {"GOFLAGS": "-mod=vendor -trimpath"})
    assert plan.env["GOFLAGS"] == "-mod=vendor -trimpath -modcacherw"
    assert "GOFLAGS" not in plan.skipped


def test_an_appended_option_already_there_is_left_alone() -> None:
    environ = {"GOFLAGS": "-modcacherw", "MAVEN_ARGS": "-B -Dmaven.repo.local=/mine"}
    plan = preset_env(["go", "maven"], LEASE, True, environ)
    assert "GOFLAGS" not in plan.env
    assert "MAVEN_ARGS" not in plan.env
    assert {"GOFLAGS", "MAVEN_ARGS"} <= set(plan.skipped)


def test_maven_args_keeps_the_users_flags() -> None:
    plan = preset_env(["maven"], LEASE, True, {"MAVEN_ARGS": "-B"})
    assert plan.env["MAVEN_ARGS"] == f"-B -Dmaven.repo.local={LEASE}/maven"


def test_variables_the_user_set_are_left_alone() -> None:
    environ = {"UV_CACHE_DIR": "/home/me/.cache/uv", "POETRY_VIRTUALENVS_IN_PROJECT": "false", "GOCACHE": "/c"}
    plan = preset_env(["uv", "poetry", "go"], LEASE, False, environ)
    for name in environ:
        assert name not in plan.env
        assert name in plan.skipped
    assert plan.env["GOMODCACHE"] == f"{LEASE}/go/mod"
    assert plan.env["UV_LINK_MODE"] == "copy"


def test_an_empty_variable_counts_as_unset() -> None:
    plan = preset_env(["uv"], LEASE, True, {"UV_CACHE_DIR": ""})
    assert plan.env["UV_CACHE_DIR"] == f"{LEASE}/uv"


def test_a_copy_mode_the_user_set_is_left_alone() -> None:
    plan = preset_env(["uv"], LEASE, False, {"UV_LINK_MODE": "hardlink"})
    assert "UV_LINK_MODE" not in plan.env
    assert plan.skipped == ["UV_LINK_MODE"]


@pytest.mark.parametrize("tool", sorted(COPY_MODES))
def test_copy_mode_only_when_not_on_the_same_filesystem(tool: str) -> None:
    copy_mode = COPY_MODES[tool]
    assert copy_mode.items() <= preset_env([tool], LEASE, False, {}).env.items()
    for same_filesystem in (True, None):
        env = preset_env([tool], LEASE, same_filesystem, {}).env
        assert not set(copy_mode) & set(env), (tool, same_filesystem)


@pytest.mark.parametrize("same_filesystem", [True, False, None])
def test_never_a_symlink_mode(same_filesystem: bool | None) -> None:
    plan = preset_env(list(PRESETS), LEASE, same_filesystem, {})
    for name, value in plan.env.items():
        assert "symlink" not in value.lower(), (name, value)
    assert not any(name.endswith("_LINK_MODE") and value != "copy" for name, value in plan.env.items())


def test_unknown_tool_lists_the_known_ones() -> None:
    with pytest.raises(UnknownTool) as caught:
        preset_env(["uv", "nope"], LEASE, True, {})
    message = str(caught.value)
    assert "'nope'" in message
    for tool in PRESETS:
        assert tool in message


def test_a_tool_given_twice_is_planned_once() -> None:
    plan = preset_env(["go", "go"], LEASE, True, {})
    assert plan.env["GOFLAGS"] == "-modcacherw"
    assert len(plan.directories) == len(set(plan.directories))


def test_the_plan_is_pure() -> None:
    environ = {"GOFLAGS": "-x"}
    preset_env(["go"], LEASE, False, environ)
    assert environ == {"GOFLAGS": "-x"}
    assert not os.path.exists(LEASE)

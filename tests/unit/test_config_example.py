"""config.example.toml is the config's documentation: it must load, and name and explain every key.

A key added to a model in scratchd.config without a commented line here fails this test.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel

from scratchd.config import Config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"

_HEADER = re.compile(r"^\s*\[\[?\s*([a-z_]+)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*=\s*(.*)$")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or as ``list[Model]``; None for a plain value."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key the models accept, spelled ``section.key`` (nested sections joined by dots)."""
    keys = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = _section_model(field.annotation)
        keys |= _model_keys(inner, path + ".") if inner else {path}
    return keys


def _commented_keys(text: str) -> set[str]:
    """``section.key`` for each key line with a comment on it or right above it."""
    found = set()
    section = ""
    previous = ""
    for line in text.splitlines():
        header = _HEADER.match(line)
        key = _KEY.match(line)
        if header:
            section = header.group(1)
        elif key and ("#" in key.group(2) or previous.lstrip().startswith("#")):
            found.add(f"{section}.{key.group(1)}" if section else key.group(1))
        previous = line
    return found


def test_every_key_is_set_and_commented() -> None:
    text = EXAMPLE.read_text()
    expected = _model_keys(Config)
    assert expected, "the walk found no keys"
    assert {"server.socket", "pool.reserve", "token.tenant"} <= expected
    missing = expected - _commented_keys(text)
    assert not missing, f"config.example.toml lacks a commented line for: {sorted(missing)}"


def test_every_model_key_appears_as_a_value() -> None:
    """Documented by example, not only in prose: each key is set in at least one entry."""
    data = tomllib.loads(EXAMPLE.read_text())
    present = set()
    for section, body in data.items():
        for entry in body if isinstance(body, list) else [body]:
            present |= {f"{section}.{key}" for key in entry}
    assert _model_keys(Config) <= present


def test_parses_as_shipped() -> None:
    config = parse_config(tomllib.loads(EXAMPLE.read_text()))
    assert [pool.name for pool in config.pool] == ["nvme", "bulk"]
    assert config.limits.default_ttl == 3600
    assert config.server.listen_address == ("127.0.0.1", 8787)


def test_loads_like_the_daemon_with_existing_pool_paths(tmp_path: Path) -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    for pool in data["pool"]:
        pool["path"] = str(tmp_path / pool["name"])
        Path(pool["path"]).mkdir()
    config = parse_config(data)
    assert config.pool[0].reserve_bytes(1000) == 100
    assert config.pool[1].reserve_bytes(1000) == 50 << 30

"""The operator's config file (docs/configuration.md): strict models, one-line errors naming the key."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from scratchd import paths, units
from scratchd.ratelimit import CREATE_RATE


class ConfigError(Exception):
    """A config that must not be served; the message names the offending key."""


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a duration such as 90s, 15m, 2h or 7d")
    return units.parse_duration(value)


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("expected a size such as 512M, 10G or 1.5TiB")
    return units.parse_size(value)


def _reserve(value: Any) -> tuple[int, float]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("expected bytes (10G) or a percentage (10%)")
    return units.parse_reserve(value)


Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(_size)]
Reserve = Annotated[tuple[int, float], BeforeValidator(_reserve)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerConfig(_Section):
    socket: str = Field(default_factory=paths.default_socket_path)
    socket_mode: str = "0666"
    listen: str = ""
    anonymous: Literal["none", "viewer"] = "none"
    state_dir: str = Field(default_factory=paths.default_state_dir)
    admins: list[str] = Field(default_factory=lambda: ["root"])

    @field_validator("socket_mode")
    @classmethod
    def _octal_mode(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError('expected an octal mode such as "0666"') from None
        if not 0 <= mode <= 0o777:
            raise ValueError("expected a permission mode between 0000 and 0777")
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError('expected host:port, e.g. 127.0.0.1:8787, or "" for no TCP')
        return value

    @property
    def listen_address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class LimitsConfig(_Section):
    default_ttl: Duration = 3600.0
    max_ttl: Duration = 7 * 86400.0
    create_rate: float = CREATE_RATE  # lease creates per second per tenant, after the burst

    @field_validator("create_rate")
    @classmethod
    def _positive_rate(cls, value: float) -> float:
        # 0 would refuse every create after the burst; nan and inf slip past a plain "> 0"
        if not math.isfinite(value) or value <= 0:
            raise ValueError("expected creates per second, a finite number greater than 0")
        return value

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsConfig:
        if self.default_ttl < 1:
            raise ValueError("default_ttl must be at least 1s")
        if self.default_ttl > self.max_ttl:
            raise ValueError("default_ttl must not exceed max_ttl")
        return self


class GcConfig(_Section):
    interval: Duration = 5.0
    orphan_grace: Duration = 600.0
    history_retention: Duration = 7 * 86400.0

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value


class CachesConfig(_Section):
    """Warm caches (docs/configuration.md, "[caches]"): how many to keep per key, and for how long unused."""

    keep_per_key: int = Field(default=2, ge=1)
    max_age: Duration = 7 * 86400.0


class MetricsConfig(_Section):
    """``tenants``: how many tenants get series of their own; the rest share ``tenant="other"``.

    A host that gives each CI job its own uid would otherwise grow a series per job.
    """

    tenants: int = Field(default=50, ge=0)


class PoolConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    path: str
    mount_point: str | None = None
    reserve: Reserve = (0, 0.0)
    cache_max: Reserve = (0, 0.25)
    labels: list[str] = Field(default_factory=list)

    @field_validator("path", "mount_point")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError("must be an absolute path")
        return value

    def reserve_bytes(self, capacity_bytes: int) -> int:
        return _share(self.reserve, capacity_bytes)

    def cache_max_bytes(self, capacity_bytes: int) -> int:
        """How much the pool's free kept caches may hold; 0: keeping is off here."""
        return _share(self.cache_max, capacity_bytes)


def _share(value: tuple[int, float], capacity_bytes: int) -> int:
    fixed, fraction = value
    return fixed or int(capacity_bytes * fraction)


class TenantConfig(_Section):
    name: str
    max_leases: int | None = Field(default=None, ge=0)
    max_bytes: Size | None = None
    max_ttl: Duration | None = None
    max_cache_bytes: Size | None = None


class TokenConfig(_Section):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    role: Literal["viewer", "admin", "tenant"]
    tenant: str = ""

    @model_validator(mode="after")
    def _tenant_role_names_tenant(self) -> TokenConfig:
        if self.role == "tenant" and not self.tenant:
            raise ValueError('a token with role = "tenant" must name its tenant')
        return self


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    gc: GcConfig = Field(default_factory=GcConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    caches: CachesConfig = Field(default_factory=CachesConfig)
    pool: list[PoolConfig] = Field(default_factory=list)
    tenant: list[TenantConfig] = Field(default_factory=list)
    token: list[TokenConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for section in ("pool", "tenant", "token"):
            seen: set[str] = set()
            for index, item in enumerate(getattr(self, section)):
                if item.name in seen:
                    raise ConfigError(f"{section}[{index}].name: duplicate {section} name {item.name!r}")
                seen.add(item.name)
        return self

    def tenant_limits(self, tenant: str) -> TenantConfig | None:
        return next((t for t in self.tenant if t.name == tenant), None)


def _key_path(loc: tuple[Any, ...]) -> str:
    """``("pool", 1, "reserve")`` -> ``pool[1].reserve``, the way the file spells it."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "tagged-union")):
            out += ("." if out else "") + str(part)
    return out or "config"


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a decoded TOML document; raise ConfigError naming the first bad key.

    A pool's path is not looked at here: a disk not mounted yet makes its pool
    unavailable at run time, not the whole daemon fail to start.
    """
    try:
        config = Config.model_validate(data)
    except ConfigError:
        raise
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        raise ConfigError(f"{_key_path(error['loc'])}: {message}") from None
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data)


def embedded_default() -> Config:
    """No config file: one pool under the user's state directory, TCP for an anonymous viewer.

    This is the only pool directory the daemon ever creates (docs/configuration.md, [[pool]]).
    """
    state_dir = paths.default_state_dir()
    pool_dir = Path(state_dir) / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o711)  # tenants pass through to the pool, but cannot list or read the state
    return parse_config(
        {
            "server": {"state_dir": state_dir, "listen": "127.0.0.1:8787", "anonymous": "viewer"},
            "pool": [{"name": "default", "path": str(pool_dir)}],
        }
    )

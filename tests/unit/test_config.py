import math

import pytest

from scratchd.config import ConfigError, parse_config
from scratchd.ratelimit import CREATE_RATE


def test_defaults_and_units(tmp_path):
    config = parse_config(
        {
            "limits": {"default_ttl": "15m", "max_ttl": "2d"},
            "pool": [{"name": "p", "path": str(tmp_path), "reserve": "10%"}],
            "tenant": [{"name": "ci", "max_bytes": "200G", "max_ttl": "1d", "max_leases": 5}],
        }
    )
    assert config.limits.default_ttl == 900 and config.limits.max_ttl == 172800
    assert config.gc.interval == 5 and config.gc.orphan_grace == 600
    assert config.pool[0].reserve_bytes(1000) == 100
    ci = config.tenant_limits("ci")
    assert ci is not None and ci.max_bytes == 200 << 30
    assert config.tenant_limits("nobody") is None
    assert config.server.listen_address is None
    assert config.limits.create_rate == CREATE_RATE == 1000.0
    assert config.metrics.tenants == 50


def test_create_rate_takes_whole_and_fractional_rates():
    assert parse_config({"limits": {"create_rate": 50}}).limits.create_rate == 50.0
    assert parse_config({"limits": {"create_rate": 0.5}}).limits.create_rate == 0.5


@pytest.mark.parametrize("rate", [0, 0.0, -1, -0.5, math.inf, math.nan])
def test_create_rate_must_be_a_positive_number(rate):
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"limits": {"create_rate": rate}})
    assert (
        str(excinfo.value)
        == "limits.create_rate: expected creates per second, a finite number greater than 0"
    )


def test_reserve_in_bytes(tmp_path):
    pool = parse_config({"pool": [{"name": "p", "path": str(tmp_path), "reserve": "1G"}]}).pool[0]
    assert pool.reserve_bytes(10 << 30) == 1 << 30


@pytest.mark.parametrize(
    "data, key",
    [
        ({"server": {"listen": "nohost"}}, "server.listen"),
        ({"server": {"socket_mode": "rw"}}, "server.socket_mode"),
        ({"server": {"anonymous": "everyone"}}, "server.anonymous"),
        ({"limits": {"default_ttl": "60 parsecs"}}, "limits.default_ttl"),
        ({"gc": {"interval": "0s"}}, "gc.interval"),
        ({"limits": {"create_rate": "100/s"}}, "limits.create_rate"),
        ({"limits": {"create_rate": True}}, "limits.create_rate"),
        ({"tenant": [{"name": "a", "max_leases": "5"}]}, "tenant[0].max_leases"),
        ({"metrics": {"tenants": -1}}, "metrics.tenants"),
        ({"metrics": {"tenants": "50"}}, "metrics.tenants"),
        ({"metrics": {"top": 5}}, "metrics.top"),
        ({"token": [{"name": "t", "sha256": "abc", "role": "viewer"}]}, "token[0].sha256"),
        ({"token": [{"name": "t", "sha256": "a" * 64, "role": "tenant"}]}, "token[0]"),
        ({"token": [{"name": "t", "sha256": "a" * 64, "role": "king"}]}, "token[0].role"),
        ({"pool": [{"name": "p", "path": "relative"}]}, "pool[0].path"),
        ({"pool": [{"name": "../p", "path": "/"}]}, "pool[0].name"),
        ({"surprise": {}}, "surprise"),
    ],
)
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    assert str(excinfo.value).startswith(key), str(excinfo.value)


def test_a_missing_pool_path_is_not_a_config_error(tmp_path):
    # Its disk may not be mounted yet: the pool starts unavailable, the daemon serves the rest.
    config = parse_config(
        {
            "pool": [
                {"name": "later", "path": str(tmp_path / "not-mounted-yet")},
                {"name": "file", "path": "/etc/hostname"},
            ]
        }
    )
    assert [pool.name for pool in config.pool] == ["later", "file"]
    assert not (tmp_path / "not-mounted-yet").exists()


@pytest.mark.parametrize(
    "data, key",
    [
        ({"pool": [{"name": "a", "path": "/gone"}, {"name": "a", "path": "/gone/too"}]}, "pool[1].name"),
        ({"pool": [{"name": "a", "path": "/gone", "mount_pt": "/gone"}]}, "pool[0].mount_pt"),
        ({"pool": [{"name": "a", "path": 5}]}, "pool[0].path"),
    ],
)
def test_missing_pools_do_not_hide_other_errors(data, key):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    assert str(excinfo.value).startswith(key), str(excinfo.value)

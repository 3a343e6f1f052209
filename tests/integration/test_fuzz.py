"""Hostile input, generated: schemathesis fuzzes the real daemon process from its own ``/openapi.json``.

Three callers: a tenant and a viewer over TCP (bearer tokens), and root (an admin) over the
Unix socket, through a requests adapter because schemathesis sends with requests. Every
answer must be a non-5xx, documented, schema-conformant one, every non-2xx in the SPEC
envelope; invalid input must be refused. Afterwards the pool must hold exactly the
directories of the active leases: nothing the fuzzer did leaked one.

No stateful (linked) runs: the daemon's answers depend on more than the requests (is
a random pid alive, has a 1 s lease expired), and Hypothesis then stops with
FlakyStrategyDefinition, since a link's value is drawn only when the step before succeeded.
"""

from __future__ import annotations

import copy
import hashlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_schema_conformance, status_code_conformance)

from conftest import Daemon
from scratchd.api import routes
from users import free_port

MAX_EXAMPLES = 80
TOKENS = {"tenant": "tenant-" + "x" * 40, "viewer": "viewer-" + "y" * 40}


# 503 pool_unavailable and 507 insufficient_storage are answers of the contract (SPEC §5),
# not server errors: a fuzzer asking for 9 PB of expected_bytes gets 507 by design.
CONTRACT_5XX = {503: "pool_unavailable", 507: "insufficient_storage"}


def no_server_error(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    code = CONTRACT_5XX.get(response.status_code)
    if code is not None and response.json()["error"]["code"] == code:
        return None
    return not_a_server_error(ctx, response, case)  # type: ignore[no-any-return]


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@dataclass
class Target:
    daemon: Daemon
    session: requests.Session
    base_url: str
    headers: dict[str, str]


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("scratchd", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, socket_path: str) -> None:
        super().__init__("scratchd", timeout=10)
        self.socket_path = socket_path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.socket_path, 10)


class UnixAdapter(HTTPAdapter):
    """requests over a Unix socket: every URL mounted on it goes to ``socket_path``."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(socket_path)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> _UnixPool:
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


# Generated from the routes the daemon serves; test_served_schema_is_the_fuzzed_one checks they agree.
_app = FastAPI()
_app.include_router(routes.router)
DOCUMENT = _app.openapi()
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))  # schemathesis adds the links it infers
schema.config.generation.update(max_examples=MAX_EXAMPLES)


@pytest.fixture(scope="module", params=["tcp-tenant", "tcp-viewer", "unix-admin"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One daemon per caller, shared by every operation's fuzzing (pytest groups the tests by caller)."""
    root = tmp_path_factory.mktemp(request.param)
    daemon = Daemon(root, {
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "limits": {"max_ttl": "1h", "default_ttl": "10m"},
        "token": [{"name": role, "sha256": hashlib.sha256(token.encode()).hexdigest(), "role": role,
                   "tenant": "ci" if role == "tenant" else ""} for role, token in TOKENS.items()],
    }).start()
    session = requests.Session()
    if request.param == "unix-admin":
        session.mount("http://scratchd/", UnixAdapter(daemon.socket))
        base_url, headers = "http://scratchd", {}
    else:
        base_url = f"http://{daemon.config['server']['listen']}"
        headers = {"authorization": f"Bearer {TOKENS[request.param.removeprefix('tcp-')]}"}
    try:
        with session:
            yield Target(daemon, session, base_url, headers)
    finally:
        daemon.stop()


def envelope(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every non-2xx is ``{"error": {"code", "message", "details"}}`` (SPEC §5)."""
    if response.status_code < 300:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, body
    assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str), body
    assert error["details"] is None or isinstance(error["details"], dict), body


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz(case: schemathesis.Case, target: Target) -> None:
    case.call_and_validate(base_url=target.base_url, session=target.session, headers=target.headers,
                           checks=CHECKS, additional_checks=[envelope])


def test_nothing_leaked(target: Target) -> None:
    assert_no_leaks(target.daemon)
    assert target.daemon.process is not None and target.daemon.process.poll() is None, "the daemon died"


def assert_no_leaks(daemon: Daemon) -> None:
    """The pool holds exactly the directories of the active leases.

    Leases may expire meanwhile (the fuzzer picks short TTLs), so: a directory whose lease
    was not active before it was seen is a leak; a lease without directory must have ended.
    """
    active = {lease["id"] for lease in daemon.request("GET", "/v1/leases").json()["leases"]}
    on_disk = {name for name in os.listdir(daemon.pool_path) if not name.startswith(".")}
    assert on_disk <= active, f"directories without an active lease: {sorted(on_disk - active)}"
    for lease_id in active - on_disk:
        assert daemon.request("GET", f"/v1/leases/{lease_id}").json()["state"] == "ended", lease_id


def test_served_schema_is_the_fuzzed_one(target: Target) -> None:
    served = target.daemon.request("GET", "/openapi.json").json()
    assert served["paths"] == DOCUMENT["paths"]

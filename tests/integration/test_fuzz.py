"""Hostile input, generated: schemathesis fuzzes the real daemon process from its own ``/openapi.json``.

Three callers: a tenant and a viewer over TCP (bearer tokens), and root (an admin) over the
Unix socket, through a requests adapter because schemathesis sends with requests. Every
check schemathesis has runs, on single requests and on linked sequences (create, then
read, renew, release what was created), and every non-2xx must be in the envelope.
Afterwards the pool must hold exactly the directories of the active leases: nothing the
fuzzer did leaked one.

What the checks would flag and the contract decides otherwise, each left out for that
case only:

* ``use_after_free``: an ended lease stays readable (``state: ended``) for
  ``gc.history_retention``, and a release of it answers 200 (idempotent); the schema's
  descriptions say so.
* ``positive_data_acceptance`` on a 422 for a ``pid`` that is not a live process, a
  ``ttl_seconds`` above ``limits.max_ttl``, or ``keep=true`` on a lease without a
  ``cache_key``: they depend on the host, the config or the lease, not on the request's
  form, and the contract answers them 422.
* ``not_a_server_error`` on 503 ``pool_unavailable`` and 507 ``insufficient_storage``:
  answers of the contract (9 PB of ``expected_bytes`` fits nowhere).
"""

from __future__ import annotations

import copy
import hashlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from conftest import Daemon
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import CHECKS as REGISTRY
from schemathesis.checks import (
    CheckContext,
    CheckFunction,
    load_all_checks,
    not_a_server_error,
    positive_data_acceptance,
)
from users import free_port

from scratchd.api import routes

MAX_EXAMPLES = 80
TOKENS = {"tenant": "tenant-" + "x" * 40, "viewer": "viewer-" + "y" * 40}


CONTRACT_5XX = {503: "pool_unavailable", 507: "insufficient_storage"}
# A schema-valid request refused for the state of the host or the config, not its form.
STATEFUL_422 = {
    "pid": "not a live process",
    "ttl_seconds": "above limits.max_ttl",
    "keep": "the lease has no cache_key",
}


def no_server_error(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    code = CONTRACT_5XX.get(response.status_code)
    if code is not None and response.json()["error"]["code"] == code:
        return None
    return not_a_server_error(ctx, response, case)


def schema_valid_data_accepted(
    ctx: CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if response.status_code == 422:
        fields = (response.json()["error"]["details"] or {}).get("fields", {})
        if fields and all(STATEFUL_422.get(name, "\0") in reason for name, reason in fields.items()):
            return None
    return positive_data_acceptance(ctx, response, case)


load_all_checks()
REPLACED: dict[str, CheckFunction] = {
    "not_a_server_error": no_server_error,
    "positive_data_acceptance": schema_valid_data_accepted,
}
# The registry's check functions (a check class, of which schemathesis registers none, is no
# function to pass as `checks`).
CHECKS: list[CheckFunction] = [
    REPLACED.get(check.__name__, check)
    for check in REGISTRY.get_all()
    if not isinstance(check, type) and check.__name__ != "use_after_free"
]


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
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))
schema.config.generation.update(max_examples=MAX_EXAMPLES)


def _lease_links(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with OpenAPI links that pass a lease's id (always present in a Lease) from each
    answer holding one to the reads, renewals and releases that can follow.

    Explicit, not the links schemathesis infers: it also infers links from fields that may be null
    (an event's or a cache's ``lease_id``), and a step that sometimes has a value to pass and
    sometimes not makes Hypothesis's replay draw differently for the same choices
    (FlakyStrategyDefinition), a failure of the test rather than of the daemon.
    """
    operation = {
        (m.upper(), p): op["operationId"] for p, item in document["paths"].items() for m, op in item.items()
    }
    follows = {
        ("POST", "/v1/leases", "201"): ["GET", "POST renew", "DELETE"],
        ("POST", "/v1/leases/{lease_id}/renew", "200"): ["GET", "DELETE"],
        ("DELETE", "/v1/leases/{lease_id}", "200"): ["GET"],
    }
    targets = {
        "GET": ("GET", "/v1/leases/{lease_id}"),
        "POST renew": ("POST", "/v1/leases/{lease_id}/renew"),
        "DELETE": ("DELETE", "/v1/leases/{lease_id}"),
    }
    for (method, path, status), nexts in follows.items():
        answer = document["paths"][path][method.lower()]["responses"][status]
        answer["links"] = {
            name.replace(" ", "_"): {
                "operationId": operation[targets[name]],
                "parameters": {"lease_id": "$response.body#/id"},
            }
            for name in nexts
        }
    return document


stateful_schema = schemathesis.openapi.from_dict(_lease_links(copy.deepcopy(DOCUMENT)))
stateful_schema.config.generation.update(max_examples=MAX_EXAMPLES)
stateful_schema.config.phases.stateful.inference.algorithms = []


@pytest.fixture(scope="module", params=["tcp-tenant", "tcp-viewer", "unix-admin"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One daemon per caller, shared by every operation's fuzzing (pytest groups the tests by caller)."""
    root = tmp_path_factory.mktemp(request.param)
    daemon = Daemon(
        root,
        {
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "limits": {"max_ttl": "1h", "default_ttl": "10m"},
            "token": [
                {
                    "name": role,
                    "sha256": hashlib.sha256(token.encode()).hexdigest(),
                    "role": role,
                    "tenant": "ci" if role == "tenant" else "",
                }
                for role, token in TOKENS.items()
            ],
        },
    ).start()
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
    """Every non-2xx is ``{"error": {"code", "message", "details"}}`` (docs/api.md, "Errors")."""
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
    case.call_and_validate(
        base_url=target.base_url,
        session=target.session,
        headers=target.headers,
        checks=CHECKS,
        additional_checks=[envelope],
    )


def test_linked_sequences(target: Target) -> None:
    """Stateful: a created lease's id flows into the reads, renewals and releases that follow."""

    class Sequences(stateful_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": target.base_url, "session": target.session, "headers": target.headers}

        def validate_response(
            self,
            response: schemathesis.Response,
            case: schemathesis.Case,
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            case.validate_response(
                response, checks=CHECKS, additional_checks=[envelope], transport_kwargs=kwargs
            )

    Sequences.run(
        settings=settings(
            max_examples=MAX_EXAMPLES // 2,
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )


def test_nothing_leaked(target: Target) -> None:
    assert_no_leaks(target.daemon)
    assert target.daemon.process is not None and target.daemon.process.poll() is None, "the daemon died"


def assert_no_leaks(daemon: Daemon) -> None:
    """The pool holds exactly the directories of the active leases.

    Leases may expire meanwhile (the fuzzer picks short TTLs), so: a directory whose lease
    was not active before it was seen is a leak; a lease without directory must have ended.
    """
    active = {lease["id"] for lease in daemon.request("GET", "/v1/leases").json()["leases"]}
    on_disk = daemon.pool_entries()
    assert on_disk <= active, f"directories without an active lease: {sorted(on_disk - active)}"
    for lease_id in active - on_disk:
        assert daemon.request("GET", f"/v1/leases/{lease_id}").json()["state"] == "ended", lease_id


def test_served_schema_is_the_fuzzed_one(target: Target) -> None:
    served = target.daemon.request("GET", "/openapi.json").json()
    assert served["paths"] == DOCUMENT["paths"]

"""The two requests of every lease cycle, answered without FastAPI's per-request machinery.

Create and release are what CI hosts send all day. Through FastAPI each pays, on
every request, for its middleware layers (errors, telemetry, body limit, exit stack),
the router and dependency solving. This layer answers the common case of each
directly, by calling the very functions the FastAPI routes call
(``routes.start_lease``, ``routes.end_lease``), so behaviour has one home:

- a caller on the Unix socket (TCP callers carry tokens: they take the routes);
- for a create, a body declared ``application/json`` with a ``content-length``, empty
  or one that validates as a :class:`~scratchd.api.models.LeaseRequest`.

Anything else, including every body that fails to parse or validate, goes on to
FastAPI with the body replayed, so errors are worded in one place.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Message, Receive, Scope, Send

from scratchd.api import errors, models, routes
from scratchd.api.identity import PEER_KEY, Caller
from scratchd.errors import Refused

LEASES = "/v1/leases"
_LEASE_PREFIX = LEASES + "/"


class HotPath:
    def __init__(self, app: FastAPI, create: BaseRoute, release: BaseRoute) -> None:
        self.app = app
        self._create_route = create  # what metrics label the request with, as the router would
        self._release_route = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and PEER_KEY in scope:
            scope["app"] = self.app  # what routes and identity read the daemon's state from
            method, path = scope["method"], scope["path"]
            if method == "POST" and path == LEASES:
                await self._create(scope, receive, send)
                return
            if method == "DELETE" and path.startswith(_LEASE_PREFIX) and "/" not in path[len(_LEASE_PREFIX):]:
                await self._release(scope, receive, send, path[len(_LEASE_PREFIX):])
                return
        await self.app(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _plain_json(scope):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client is gone: nobody to lease a directory to
        parsed = _lease_request(body)
        if parsed is None:
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = self._create_route
        await _answer(scope, receive, send, lambda request, caller: routes.start_lease(request, caller, parsed))

    async def _release(self, scope: Scope, receive: Receive, send: Send, lease_id: str) -> None:
        if not lease_id:
            await self.app(scope, receive, send)
            return
        scope["route"] = self._release_route
        scope["path_params"] = {"lease_id": lease_id}
        await _answer(scope, receive, send, lambda request, caller: routes.end_lease(request, caller, lease_id))


async def _answer(scope: Scope, receive: Receive, send: Send,
                  handle: Callable[[Request, Caller], Awaitable[Response]]) -> None:
    """Authorise as the routes' ``Writer`` dependency does, handle, and answer."""
    request = Request(scope, receive)
    try:
        response = await handle(request, await routes.writer(request))
    except Refused as exc:  # what errors.install() does for the routes
        response = errors.refusal(exc)
    except Exception:
        response = errors.internal_error(scope["path"])
    await response(scope, receive, send)


def _plain_json(scope: Scope) -> bool:
    """A body of known length declared ``application/json`` (FastAPI refuses an undeclared one)."""
    length = content_type = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"content-type":
            content_type = value
        elif name == b"transfer-encoding":
            return False
    if length is None or content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _lease_request(body: bytes) -> models.LeaseRequest | None:
    """The validated request, or None when FastAPI should explain what is wrong with it."""
    if not body:
        return models.LeaseRequest()
    try:
        data = json.loads(body, object_pairs_hook=routes.unique_keys)
        return models.LeaseRequest.model_validate(data)
    except (ValueError, RecursionError, ValidationError):  # too deep, not JSON, not UTF-8, invalid
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` with the body already read put back in front."""
    replayed = False

    async def again() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()  # a disconnect, eventually
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again

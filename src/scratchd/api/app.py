"""The ASGI application: routes, the error envelope, and a cap on request bodies."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scratchd import metrics
from scratchd.api import errors, hotpath, pages, routes
from scratchd.api.identity import Identities
from scratchd.config import Config
from scratchd.daemon import Daemon
from scratchd.ratelimit import CREATE_BURST, RateLimiter

log = logging.getLogger("scratchd")

MAX_BODY_BYTES = 64 * 1024


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before the app reads them into memory."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._refuse(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked body: no content-length to refuse up front
                raise HTTPException(413, f"The request body is larger than {self.limit} bytes.")
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.error_response(
            413,
            "request_too_large",
            f"The request body is larger than {self.limit} bytes.",
            {"limit_bytes": self.limit},
        )
        await response(scope, receive, send)


def _identities(config: Config) -> Identities:
    identities = Identities(config)
    missing = identities.unknown_admins()
    if missing:  # one config often serves many hosts: a warning, not an error (docs/configuration.md)
        log.warning("admins not known on this host", extra={"admins": missing})
    return identities


def _create_rate(app: FastAPI, config: Config) -> None:
    """Take ``limits.create_rate``; an unchanged rate keeps the buckets, so a reload grants no fresh burst."""
    current: RateLimiter | None = getattr(app.state, "create_rate", None)
    if current is None or current.rate != config.limits.create_rate:
        app.state.create_rate = RateLimiter(CREATE_BURST, config.limits.create_rate)


def _route(method: str, path: str) -> APIRoute:
    return next(
        r
        for r in routes.router.routes
        if isinstance(r, APIRoute) and r.path == path and method in (r.methods or ())
    )


def create_app(daemon: Daemon) -> ASGIApp:
    """The FastAPI app behind timing and the body cap, and in front of all the hot path,
    which answers the lease cycle's two requests itself (timed the same way)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await daemon.start()
        try:
            yield
        finally:
            await daemon.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="scratchd",
        version=version("scratchd"),
        description="Leases scratch and cache directories on the right mounted filesystem.",
        # The schema is served by routes.openapi, behind the same authentication as every
        # read; /docs and /redoc would load their scripts from a CDN, and hosts may be offline.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.backend = routes.Backend(daemon.manager, daemon.store, daemon.trash, daemon.is_ready)
    _create_rate(app, daemon.config)
    app.state.identities = _identities(daemon.config)
    daemon.reload_listeners.append(lambda config: setattr(app.state, "identities", _identities(config)))
    daemon.reload_listeners.append(lambda config: _create_rate(app, config))
    app.include_router(routes.router)
    app.include_router(pages.router)
    errors.install(app)
    served = metrics.attach(app, daemon.manager, daemon.trash, lambda: daemon.config.metrics.tenants)
    timer = metrics.RequestTimer(BodyLimit(app), metrics=served)
    return hotpath.HotPath(
        timer,
        fastapi=app,
        timer=timer,
        create=_route("POST", hotpath.LEASES),
        release=_route("DELETE", hotpath.LEASES + "/{lease_id}"),
        body_limit=MAX_BODY_BYTES,
    )

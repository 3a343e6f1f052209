"""Every non-2xx answer in one envelope (docs/api.md, "Errors"): ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from scratchd.errors import Refused

log = logging.getLogger("scratchd.api")

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "invalid_request",
    422: "invalid_request",
}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps({"error": {"code": code, "message": message, "details": details}})
    if status == 401:  # RFC 9110: a 401 names the scheme that would do; the dashboard asks for a token on it
        headers = {"WWW-Authenticate": 'Bearer realm="scratchd"', **(headers or {})}
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or str(loc[0] if loc else "body")


def refusal(exc: Refused) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def internal_error(path: str) -> Response:
    """Logs the exception being handled; the answer says no more than that it happened."""
    log.exception("internal error", extra={"path": path})
    return error_response(500, "internal_error", "The daemon failed to handle this request; see its log.")


async def _refused(_: Request, exc: Refused) -> Response:
    return refusal(exc)


async def _invalid(_: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(
            422,
            "invalid_request",
            "The request body is not valid JSON.",
            {"fields": {"body": "invalid JSON"}},
        )
    fields: dict[str, str] = {}
    for error in errors:
        fields.setdefault(_field_name(tuple(error.get("loc", ()))), _reason(error))
    said = "; ".join(f"{name} {reason}" for name, reason in sorted(fields.items()))
    return error_response(422, "invalid_request", f"Invalid request: {said}.", {"fields": fields})


def _reason(error: Mapping[str, Any]) -> str:
    """What is wrong with a field, worded to follow its name: ``ttl_seconds must be ≥ 1``."""
    kind, ctx = error.get("type"), error.get("ctx") or {}
    if kind in _REASONS:
        return _REASONS[kind].format(**ctx)
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    return message if kind == "value_error" else f"is invalid: {message[:1].lower()}{message[1:]}"


_REASONS = {
    "extra_forbidden": "is not a field of this request",
    "missing": "is required",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "greater_than_equal": "must be ≥ {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be ≤ {le}",
    "less_than": "must be < {lt}",
    "string_too_short": "must be at least {min_length} characters",
    "string_too_long": "must be at most {max_length} characters",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
}


async def _http(request: Request, exc: HTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = {
        404: "No such route.",
        405: "Method not allowed on this route.",
    }.get(exc.status_code, str(exc.detail))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(exc.status_code, code, message, None, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path: the router names only the first route's.

    RFC 9110 wants them all in a 405's ``Allow``, and two routes (list and create) share
    ``/v1/leases``. Each method is tried against the routes as the router would.
    """
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


async def _crash(request: Request, exc: Exception) -> Response:
    return internal_error(request.url.path)


def install(app: FastAPI) -> None:
    app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)

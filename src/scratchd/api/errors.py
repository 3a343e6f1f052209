"""Every non-2xx answer in one envelope (SPEC §5): ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

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


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": message, "details": details}})
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
        return error_response(422, "invalid_request", "The request body is not valid JSON.", {"fields": {"body": "invalid JSON"}})
    fields: dict[str, str] = {}
    for error in errors:
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        fields.setdefault(_field_name(tuple(error.get("loc", ()))), message)
    names = ", ".join(sorted(fields))
    return error_response(422, "invalid_request", f"Invalid request: {names}.", {"fields": fields})


async def _http(_: Request, exc: HTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = {
        404: "No such route.",
        405: "Method not allowed on this route.",
    }.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, code, message, None, dict(exc.headers or {}))


async def _crash(request: Request, exc: Exception) -> Response:
    return internal_error(request.url.path)


def install(app: FastAPI) -> None:
    app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)

"""The read-outs that are not JSON: the dashboard at ``/`` and Prometheus at ``/metrics``.

The dashboard is static files that poll the JSON API from the browser, so it shows
exactly what ``/v1/usage`` and ``/v1/events`` say to its caller. The files hold no data,
so they are served to anyone: a browser must load the page before it can ask for a token
(the page does so when the API answers 401). ``/metrics`` is a read (Unix peers, tokens,
and anonymous viewers where ``server.anonymous = "viewer"``) that also keeps tenants out.
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePath

from fastapi import APIRouter, Request
from prometheus_client.exposition import choose_encoder
from starlette.responses import Response

from scratchd.api.routes import Reader
from scratchd.errors import Refused

# The page loads nothing but its own files and the API: no CDN, no fonts (hosts may be offline).
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_FILES = {
    entry.name: (entry.read_bytes(), _MEDIA_TYPES[PurePath(entry.name).suffix])
    for entry in (resources.files("scratchd") / "dashboard").iterdir()
    if PurePath(entry.name).suffix in _MEDIA_TYPES
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> Response:
    found = _FILES.get(name)
    if found is None:
        raise Refused(404, "not_found", "No such dashboard file.")
    body, media_type = found
    return Response(
        body,
        media_type=media_type,
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": DASHBOARD_CSP,
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/")
async def dashboard() -> Response:
    return _file("index.html")


@router.get("/dashboard/{name}")
async def dashboard_file(name: str) -> Response:
    return _file(name)


@router.get("/metrics")
async def metrics(request: Request, caller: Reader) -> Response:
    """Prometheus text format, or OpenMetrics when the scraper asks for it.

    The metrics name every tenant, and a tenant may not learn of the others' leases
    (``/v1/usage`` shows it only its own), so tenants are refused.
    """
    if not caller.sees_all():
        raise Refused(
            403, "forbidden", "Metrics cover every tenant: scrape as an admin or with a viewer token."
        )
    encode, media_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(request.app.state.metrics.registry), media_type=media_type)

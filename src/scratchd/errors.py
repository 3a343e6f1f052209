"""Refusals: the one exception type that crosses from the domain to the API's error envelope."""

from __future__ import annotations

from typing import Any


class Refused(Exception):
    """A request the daemon will not carry out; ``code`` is one of the codes in docs/api.md, "Errors"."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers  # e.g. Retry-After on a 429

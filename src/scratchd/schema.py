"""What a record's field says about itself beyond its type, for the edges that derive their shapes from it.

A record (``leases.Lease``, ``caches.Cache``, ``store.Event``) is a dataclass, and its fields
are the one list of what it holds: the store's columns and the API's answers and response
models are derived from them (``store``, ``api.models``), so a new field is added in one
place. Its type says most (an enum is kept by value, a nested record flattens); the marks
below, in ``dataclasses.field(metadata=marks(...))``, say the rest.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HIDDEN = "hidden"
TIME = "time"
DESCRIPTION = "description"


def marks(*, hidden: bool = False, time: bool = False, description: str | None = None) -> Mapping[str, Any]:
    """``hidden``: kept, but left out of the API's answers. ``time``: seconds since the epoch, which the
    API shows as RFC 3339. ``description``: the field's sentence in the published schema."""
    found: dict[str, Any] = {}
    if hidden:
        found[HIDDEN] = True
    if time:
        found[TIME] = True
    if description is not None:
        found[DESCRIPTION] = description
    return found

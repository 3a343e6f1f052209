"""What a record's field says about itself, for the edges that derive their shapes from the records.

A record (``leases.Lease``, ``caches.Cache``, ``store.Event``) is a dataclass, and its fields
are the one list of what it holds: the store's columns and the API's answers and response
models are derived from them (``store``, ``api.models``), so a new field is added in one
place. Its type says most (an enum is kept and shown by value, a nested record flattens
into columns and nests in answers); the marks, ``dataclasses.field(metadata=marks(...))``,
say the rest.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_HIDDEN = "hidden"
_TIME = "time"
_DESCRIPTION = "description"


def marks(*, hidden: bool = False, time: bool = False, description: str | None = None) -> Mapping[str, Any]:
    """``hidden``: kept, but left out of the API's answers. ``time``: seconds since the epoch, which the
    API shows as RFC 3339. ``description``: the field's sentence in the published schema."""
    found: dict[str, Any] = {}
    if hidden:
        found[_HIDDEN] = True
    if time:
        found[_TIME] = True
    if description is not None:
        found[_DESCRIPTION] = description
    return found


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a record as the edges read it: its type resolved, ``X | None`` as ``X`` and optional."""

    name: str
    kind: Any
    optional: bool
    hidden: bool
    time: bool
    description: str | None

    @property
    def nested(self) -> bool:
        """A record inside the record (``Lease.usage``), derived the same way."""
        return isinstance(self.kind, type) and dataclasses.is_dataclass(self.kind)


def fields_of(record: type) -> tuple[Field, ...]:
    hints = typing.get_type_hints(record)
    found = []
    for item in dataclasses.fields(record):
        kind, optional = _unwrap(hints[item.name])
        found.append(
            Field(
                item.name,
                kind,
                optional,
                hidden=item.metadata.get(_HIDDEN, False),
                time=item.metadata.get(_TIME, False),
                description=item.metadata.get(_DESCRIPTION),
            )
        )
    return tuple(found)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not None and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False

"""Choosing the pool for a new lease (docs/api.md, "Placement"). Pure: the caller brings the facts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from scratchd.errors import Refused
from scratchd.leases import LinkMode
from scratchd.pools import PoolState, PoolStatus
from scratchd.units import format_size


class Placement(StrEnum):
    PREFER_SAME_FILESYSTEM = "prefer-same-filesystem"
    SAME_FILESYSTEM = "same-filesystem"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class Near:
    """The mount a request's ``near`` is on, and the filesystem instance behind it."""

    mount_id: int
    device: str  # "maj:min": one per superblock, shared by every mount (bind mounts too) of it


@dataclass(frozen=True, slots=True)
class Placed:
    pool: PoolStatus
    same_filesystem: bool | None  # None when the request named no `near`
    link_mode: LinkMode | None = None  # None when the request named no `near`
    # Every pool the request could have gone to (the chosen tier, where it fits): a warm
    # cache in one of them wins over the most room (docs/caches.md).
    candidates: tuple[PoolStatus, ...] = field(default=(), compare=False)


def placed_in(pool: PoolStatus, near: Near | None, candidates: Sequence[PoolStatus] = ()) -> Placed:
    """A lease in ``pool``, with what a tool can do between it and ``near``."""
    if near is None:
        return Placed(pool, None, None, tuple(candidates))
    mode = link_mode(pool, near)
    return Placed(pool, mode is LinkMode.HARDLINK, mode, tuple(candidates))


def link_mode(pool: PoolStatus, near: Near) -> LinkMode:
    """Hard links need the same mount; clones only the same filesystem, if it clones at all."""
    if pool.mount_id == near.mount_id:
        return LinkMode.HARDLINK
    if pool.reflink and pool.device == near.device:
        return LinkMode.CLONE
    return LinkMode.COPY


class PlacementError(Refused):
    """No pool can take the lease; ``code`` and ``status`` are in docs/api.md, "Errors"."""


def place(
    pools: Sequence[PoolStatus],
    *,
    reserved: Mapping[str, int],
    pool_name: str | None,
    near: Near | None,
    placement: Placement,
    expected_bytes: int,
) -> Placed:
    """The pool with the most room left after its reserve and the space promised to other leases.

    With ``near`` and ``prefer-same-filesystem``, pools are tried by what a tool could do
    from them (hardlink, then clone, then copy): the first of those tiers where the lease
    fits is chosen from.
    """

    def room(pool: PoolStatus) -> int:
        return pool.free_bytes - pool.reserve_bytes - reserved.get(pool.name, 0)

    def fitting(candidates: Sequence[PoolStatus]) -> list[PoolStatus]:
        return [pool for pool in candidates if room(pool) >= expected_bytes]

    usable = candidates = _usable(pools, pool_name)
    if near is not None and placement is Placement.SAME_FILESYSTEM:
        candidates = [pool for pool in usable if pool.mount_id == near.mount_id]
        if not candidates:
            raise PlacementError(
                409,
                "no_pool_on_filesystem",
                "No usable pool is on the same filesystem as near.",
                {"near_mount_id": near.mount_id, "pools": [pool.name for pool in usable]},
            )
    elif near is not None and placement is Placement.PREFER_SAME_FILESYSTEM:
        for mode in (LinkMode.HARDLINK, LinkMode.CLONE):
            tier = [pool for pool in candidates if link_mode(pool, near) is mode]
            if fitting(tier):
                candidates = tier
                break
    fit = fitting(candidates)
    if not fit:
        wanted = f"{format_size(expected_bytes)} free" if expected_bytes else "free space"
        available = {pool.name: max(room(pool), 0) for pool in candidates}
        raise PlacementError(
            507,
            "insufficient_storage",
            f"No pool has {wanted} beyond its reserve and reservations.",
            {"expected_bytes": expected_bytes, "available_bytes": available},
        )
    return placed_in(min(fit, key=lambda pool: (-room(pool), pool.name)), near, fit)


def _usable(pools: Sequence[PoolStatus], pool_name: str | None) -> list[PoolStatus]:
    """Pools in state ok (only the named one, if any); the refusal says why there are none."""
    if pool_name is not None:
        named = next((pool for pool in pools if pool.name == pool_name), None)
        if named is None:
            raise PlacementError(
                404, "pool_not_found", f"No pool named {pool_name!r} is configured.", {"pool": pool_name}
            )
        if named.state is PoolState.FULL:
            raise PlacementError(
                507,
                "insufficient_storage",
                f"Pool {pool_name} is full.",
                {"pool": pool_name, "free_bytes": named.free_bytes, "reserve_bytes": named.reserve_bytes},
            )
        if named.state is not PoolState.OK:
            raise PlacementError(
                503,
                "pool_unavailable",
                f"Pool {pool_name} is {named.state.value.replace('_', '-')}.",
                {"pool": pool_name, "state": named.state.value, "reason": named.reason},
            )
        return [named]
    usable = [pool for pool in pools if pool.state is PoolState.OK]
    if not usable:
        states = {pool.name: pool.state.value for pool in pools}
        if any(pool.state is PoolState.FULL for pool in pools):
            raise PlacementError(
                507, "insufficient_storage", "No pool has space left above its reserve.", {"pools": states}
            )
        raise PlacementError(503, "pool_unavailable", "No pool is available right now.", {"pools": states})
    return usable

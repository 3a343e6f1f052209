from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pytest
from records import a_pool

from scratchd.leases import LinkMode
from scratchd.placement import Near, Placed, Placement, PlacementError, link_mode, place
from scratchd.pools import REASON_STATES, PoolReason, PoolState, PoolStatus

GiB = 1 << 30
NEAR = 100  # the mount id of the request's `near`
NEAR_DEVICE = "0:99"  # the filesystem instance behind it
HARDLINK, CLONE, COPY = LinkMode.HARDLINK, LinkMode.CLONE, LinkMode.COPY


def reason_for(state: PoolState) -> PoolReason:
    """The first reason that puts a pool in ``state``."""
    return next(reason for reason, its_state in REASON_STATES.items() if its_state is state)


def pool(
    name: str,
    *,
    mount_id: int = 1,
    free: int = 100 * GiB,
    reserve: int = 0,
    state: PoolState = PoolState.OK,
    device: str = "8:1",
    reflink: bool = False,
) -> PoolStatus:
    return a_pool(
        name,
        path=f"/pools/{name}",
        mount_point=f"/mnt/{mount_id}",
        fstype="ext4",
        device=device,
        mount_id=mount_id,
        state=state,
        capacity_bytes=1000 * GiB,
        free_bytes=free,
        reserve_bytes=reserve,
        reason=None if state is PoolState.OK else reason_for(state),
        message=None if state is PoolState.OK else f"{name} is {state}",
        reflink=reflink,
    )


def choose(
    pools: Sequence[PoolStatus],
    *,
    reserved: Mapping[str, int] | None = None,
    pool_name: str | None = None,
    near: int | None = None,
    near_device: str = NEAR_DEVICE,
    placement: Placement = Placement.PREFER_SAME_FILESYSTEM,
    expected: int = 0,
) -> Placed:
    return place(
        pools,
        reserved=reserved or {},
        pool_name=pool_name,
        near=None if near is None else Near(near, near_device),
        placement=placement,
        expected_bytes=expected,
    )


def refused(pools: Sequence[PoolStatus], **kwargs: object) -> PlacementError:
    with pytest.raises(PlacementError) as caught:
        choose(pools, **kwargs)  # type: ignore[arg-type]
    return caught.value


# -- the basics -----------------------------------------------------------------------------


def test_placement_values_are_the_api_spelling() -> None:
    assert [mode.value for mode in Placement] == ["prefer-same-filesystem", "same-filesystem", "any"]
    assert Placement("same-filesystem") is Placement.SAME_FILESYSTEM


def test_placement_error_carries_the_api_error() -> None:
    error = PlacementError(404, "pool_not_found", "No pool named 'x' is configured.", {"pool": "x"})
    assert (error.status, error.code, error.message, error.details) == (
        404,
        "pool_not_found",
        "No pool named 'x' is configured.",
        {"pool": "x"},
    )
    assert str(error) == error.message
    assert PlacementError(503, "pool_unavailable", "m").details is None


def test_single_pool() -> None:
    placed = choose([pool("a")])
    assert placed == Placed(pool("a"), None)


def test_most_free_space_wins() -> None:
    assert (
        choose([pool("a", free=10 * GiB), pool("b", free=30 * GiB), pool("c", free=20 * GiB)]).pool.name
        == "b"
    )


def test_free_space_is_counted_after_the_reserve() -> None:
    pools = [pool("a", free=30 * GiB, reserve=25 * GiB), pool("b", free=20 * GiB, reserve=0)]
    assert choose(pools).pool.name == "b"


def test_free_space_is_counted_after_reservations() -> None:
    pools = [pool("a", free=30 * GiB), pool("b", free=20 * GiB)]
    assert choose(pools, reserved={"a": 15 * GiB}).pool.name == "b"
    assert choose(pools, reserved={"a": 5 * GiB}).pool.name == "a"


def test_reservations_for_other_pools_do_not_matter() -> None:
    assert choose([pool("a", free=GiB)], reserved={"gone": 100 * GiB}).pool.name == "a"


@pytest.mark.parametrize("order", list(itertools.permutations(["b", "a", "c"])))
def test_ties_go_to_the_first_name_whatever_the_order(order: tuple[str, ...]) -> None:
    pools = [pool(name, free=10 * GiB) for name in order]
    assert choose(pools).pool.name == "a"


def test_ties_are_on_room_not_on_free_bytes() -> None:
    pools = [pool("a", free=20 * GiB, reserve=10 * GiB), pool("b", free=10 * GiB)]
    assert choose(pools).pool.name == "a"
    assert choose(pools, reserved={"a": 1}).pool.name == "b"


def test_pools_that_are_not_ok_are_never_chosen() -> None:
    pools = [
        pool("big-full", free=500 * GiB, state=PoolState.FULL),
        pool("big-ro", free=500 * GiB, state=PoolState.READ_ONLY),
        pool("big-gone", free=500 * GiB, state=PoolState.UNAVAILABLE),
        pool("small", free=GiB),
    ]
    assert choose(pools).pool.name == "small"


# -- expected_bytes -------------------------------------------------------------------------


def test_expected_bytes_exactly_fitting_is_enough() -> None:
    pools = [pool("a", free=10 * GiB, reserve=2 * GiB)]
    assert choose(pools, reserved={"a": 3 * GiB}, expected=5 * GiB).pool.name == "a"


def test_expected_bytes_one_too_many() -> None:
    error = refused(
        [pool("a", free=10 * GiB, reserve=2 * GiB)], reserved={"a": 3 * GiB}, expected=5 * GiB + 1
    )
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert error.details == {"expected_bytes": 5 * GiB + 1, "available_bytes": {"a": 5 * GiB}}


def test_expected_bytes_only_pools_where_it_fits() -> None:
    pools = [pool("a", free=50 * GiB), pool("b", free=20 * GiB)]
    assert choose(pools, reserved={"a": 40 * GiB}, expected=12 * GiB).pool.name == "b"


def test_expected_bytes_fitting_nowhere() -> None:
    error = refused([pool("a", free=10 * GiB), pool("b", free=20 * GiB)], expected=30 * GiB)
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert "30G" in error.message
    assert error.details == {"expected_bytes": 30 * GiB, "available_bytes": {"a": 10 * GiB, "b": 20 * GiB}}


def test_reservations_beyond_free_space_leave_no_room_even_for_nothing() -> None:
    error = refused([pool("a", free=10 * GiB, reserve=GiB)], reserved={"a": 10 * GiB})
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert error.details == {"expected_bytes": 0, "available_bytes": {"a": 0}}


# -- a named pool ---------------------------------------------------------------------------


def test_named_pool_is_used_even_with_less_room() -> None:
    assert choose([pool("a", free=GiB), pool("b", free=90 * GiB)], pool_name="a").pool.name == "a"


def test_unknown_pool_name() -> None:
    error = refused([pool("a")], pool_name="nvme")
    assert (error.status, error.code, error.details) == (404, "pool_not_found", {"pool": "nvme"})
    assert "nvme" in error.message


@pytest.mark.parametrize("state", [PoolState.UNAVAILABLE, PoolState.READ_ONLY])
def test_named_pool_not_usable(state: PoolState) -> None:
    error = refused([pool("a", state=state), pool("b")], pool_name="a")
    assert (error.status, error.code) == (503, "pool_unavailable")
    assert error.details == {"pool": "a", "state": state.value, "reason": reason_for(state)}


def test_named_pool_full() -> None:
    error = refused([pool("a", state=PoolState.FULL, free=GiB, reserve=2 * GiB), pool("b")], pool_name="a")
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert error.details == {"pool": "a", "free_bytes": GiB, "reserve_bytes": 2 * GiB}


def test_named_pool_too_small_for_expected_bytes() -> None:
    error = refused([pool("a", free=GiB), pool("b")], pool_name="a", expected=2 * GiB)
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert error.details == {"expected_bytes": 2 * GiB, "available_bytes": {"a": GiB}}


def test_named_pool_on_another_filesystem_with_same_filesystem() -> None:
    pools = [pool("a", mount_id=1), pool("b", mount_id=NEAR)]
    error = refused(pools, pool_name="a", near=NEAR, placement=Placement.SAME_FILESYSTEM)
    assert (error.status, error.code) == (409, "no_pool_on_filesystem")


def test_named_pool_on_another_filesystem_with_prefer_same_filesystem() -> None:
    pools = [pool("a", mount_id=1), pool("b", mount_id=NEAR)]
    assert choose(pools, pool_name="a", near=NEAR) == Placed(pools[0], False, COPY)


# -- no usable pool at all ------------------------------------------------------------------


def test_no_pools_configured() -> None:
    error = refused([])
    assert (error.status, error.code) == (503, "pool_unavailable")


def test_every_pool_unavailable_or_read_only() -> None:
    error = refused([pool("a", state=PoolState.UNAVAILABLE), pool("b", state=PoolState.READ_ONLY)])
    assert (error.status, error.code) == (503, "pool_unavailable")
    assert error.details == {"pools": {"a": "unavailable", "b": "read_only"}}


def test_every_pool_down_and_one_full_is_a_storage_problem() -> None:
    error = refused(
        [pool("a", state=PoolState.UNAVAILABLE), pool("b", state=PoolState.FULL)],
        near=NEAR,
        placement=Placement.SAME_FILESYSTEM,
    )
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert error.details == {"pools": {"a": "unavailable", "b": "full"}}


# -- near: same-filesystem ------------------------------------------------------------------


def test_same_filesystem_keeps_only_pools_on_near() -> None:
    pools = [pool("big", mount_id=1, free=900 * GiB), pool("near", mount_id=NEAR, free=GiB)]
    assert choose(pools, near=NEAR, placement=Placement.SAME_FILESYSTEM) == Placed(pools[1], True, HARDLINK)


def test_same_filesystem_best_of_several_on_near() -> None:
    pools = [
        pool("n1", mount_id=NEAR, free=GiB),
        pool("n2", mount_id=NEAR, free=2 * GiB),
        pool("x", free=9 * GiB),
    ]
    assert choose(pools, near=NEAR, placement=Placement.SAME_FILESYSTEM).pool.name == "n2"


def test_same_filesystem_without_a_pool_there() -> None:
    error = refused(
        [pool("a", mount_id=1), pool("b", mount_id=2)], near=NEAR, placement=Placement.SAME_FILESYSTEM
    )
    assert (error.status, error.code) == (409, "no_pool_on_filesystem")
    assert error.details == {"near_mount_id": NEAR, "pools": ["a", "b"]}


def test_same_filesystem_pool_there_is_not_ok() -> None:
    pools = [pool("near", mount_id=NEAR, state=PoolState.UNAVAILABLE), pool("b", mount_id=2)]
    error = refused(pools, near=NEAR, placement=Placement.SAME_FILESYSTEM)
    assert (error.status, error.code) == (409, "no_pool_on_filesystem")


def test_same_filesystem_pool_there_too_small_does_not_fall_back() -> None:
    pools = [pool("near", mount_id=NEAR, free=GiB), pool("big", mount_id=1, free=900 * GiB)]
    error = refused(pools, near=NEAR, placement=Placement.SAME_FILESYSTEM, expected=2 * GiB)
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert error.details == {"expected_bytes": 2 * GiB, "available_bytes": {"near": GiB}}


def test_same_filesystem_a_bind_mount_of_the_same_device_is_not_the_same_filesystem() -> None:
    # The pool's device is bind-mounted where `near` is: hard links would still fail (EXDEV).
    pools = [pool("source", mount_id=7, device="259:3"), pool("bound", mount_id=NEAR, device="259:3")]
    assert choose(pools, near=7, placement=Placement.SAME_FILESYSTEM) == Placed(pools[0], True, HARDLINK)
    assert choose(pools, near=NEAR, placement=Placement.SAME_FILESYSTEM) == Placed(pools[1], True, HARDLINK)
    error = refused([pools[0]], near=NEAR, placement=Placement.SAME_FILESYSTEM)
    assert error.code == "no_pool_on_filesystem"


# -- near: prefer-same-filesystem -----------------------------------------------------------


def test_prefer_same_filesystem_is_the_default() -> None:
    pools = [pool("big", mount_id=1, free=900 * GiB), pool("near", mount_id=NEAR, free=GiB)]
    assert choose(pools, near=NEAR) == Placed(pools[1], True, HARDLINK)


def test_prefer_same_filesystem_falls_back_when_nothing_is_there() -> None:
    pools = [pool("a", mount_id=1, free=GiB), pool("b", mount_id=2, free=2 * GiB)]
    assert choose(pools, near=NEAR) == Placed(pools[1], False, COPY)


def test_prefer_same_filesystem_falls_back_when_it_does_not_fit_there() -> None:
    pools = [
        pool("near", mount_id=NEAR, free=GiB),
        pool("a", mount_id=1, free=5 * GiB),
        pool("b", mount_id=2, free=3 * GiB),
    ]
    assert choose(pools, near=NEAR, expected=2 * GiB) == Placed(pools[1], False, COPY)


def test_prefer_same_filesystem_falls_back_when_reservations_fill_it() -> None:
    pools = [pool("near", mount_id=NEAR, free=10 * GiB), pool("a", mount_id=1, free=2 * GiB)]
    assert choose(pools, near=NEAR, reserved={"near": 10 * GiB}) == Placed(
        pools[0], True, HARDLINK
    )  # room 0 fits 0
    assert choose(pools, near=NEAR, reserved={"near": 10 * GiB + 1}) == Placed(pools[1], False, COPY)


def test_prefer_same_filesystem_falls_back_when_the_pool_there_is_full() -> None:
    pools = [pool("near", mount_id=NEAR, state=PoolState.FULL), pool("a", mount_id=1)]
    assert choose(pools, near=NEAR) == Placed(pools[1], False, COPY)


def test_prefer_same_filesystem_picks_among_fitting_pools_there() -> None:
    pools = [
        pool("n1", mount_id=NEAR, free=3 * GiB),
        pool("n2", mount_id=NEAR, free=GiB),
        pool("far", mount_id=1, free=900 * GiB),
    ]
    assert choose(pools, near=NEAR, expected=2 * GiB) == Placed(pools[0], True, HARDLINK)


def test_prefer_same_filesystem_fitting_nowhere() -> None:
    pools = [pool("near", mount_id=NEAR, free=GiB), pool("far", mount_id=1, free=GiB)]
    error = refused(pools, near=NEAR, expected=2 * GiB)
    assert (error.status, error.code) == (507, "insufficient_storage")
    assert error.details == {"expected_bytes": 2 * GiB, "available_bytes": {"near": GiB, "far": GiB}}


# -- near: any ------------------------------------------------------------------------------


def test_any_ignores_near_when_choosing() -> None:
    pools = [pool("near", mount_id=NEAR, free=GiB), pool("big", mount_id=1, free=900 * GiB)]
    assert choose(pools, near=NEAR, placement=Placement.ANY) == Placed(pools[1], False, COPY)


def test_any_still_reports_landing_on_near() -> None:
    pools = [pool("near", mount_id=NEAR, free=900 * GiB), pool("small", mount_id=1, free=GiB)]
    assert choose(pools, near=NEAR, placement=Placement.ANY) == Placed(pools[0], True, HARDLINK)


def test_any_without_a_pool_on_near_is_fine() -> None:
    assert choose([pool("a", mount_id=1)], near=NEAR, placement=Placement.ANY).same_filesystem is False


# -- without near ---------------------------------------------------------------------------


@pytest.mark.parametrize("placement", list(Placement))
def test_without_near_same_filesystem_is_unknown(placement: Placement) -> None:
    pools = [pool("a", mount_id=1, free=GiB), pool("b", mount_id=2, free=2 * GiB)]
    assert choose(pools, placement=placement) == Placed(pools[1], None)


# -- link modes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mount_id", "device", "reflink", "mode"),
    [
        (NEAR, NEAR_DEVICE, False, HARDLINK),  # same mount: links, whatever else is true
        (NEAR, NEAR_DEVICE, True, HARDLINK),
        (7, NEAR_DEVICE, True, CLONE),  # another mount (a bind mount) of a filesystem that clones
        (7, NEAR_DEVICE, False, COPY),  # ... of one that does not (tmpfs, ext4)
        (7, "8:1", True, COPY),  # another filesystem that clones: clones never cross filesystems
        (7, "8:1", False, COPY),
    ],
)
def test_link_mode(mount_id: int, device: str, reflink: bool, mode: LinkMode) -> None:
    assert (
        link_mode(pool("p", mount_id=mount_id, device=device, reflink=reflink), Near(NEAR, NEAR_DEVICE))
        is mode
    )


def test_prefer_same_filesystem_ranks_clone_before_copy() -> None:
    pools = [
        pool("far", mount_id=1, free=900 * GiB, reflink=True),
        pool("bound", mount_id=7, device=NEAR_DEVICE, free=GiB, reflink=True),
    ]
    assert choose(pools, near=NEAR) == Placed(pools[1], False, CLONE)


def test_prefer_same_filesystem_ranks_hardlink_before_clone() -> None:
    pools = [
        pool("bound", mount_id=7, device=NEAR_DEVICE, free=900 * GiB, reflink=True),
        pool("near", mount_id=NEAR, device=NEAR_DEVICE, free=GiB),
    ]
    assert choose(pools, near=NEAR) == Placed(pools[1], True, HARDLINK)


def test_a_bind_mount_that_cannot_clone_ranks_with_the_rest() -> None:
    pools = [pool("bound", mount_id=7, device=NEAR_DEVICE, free=GiB), pool("far", mount_id=1, free=900 * GiB)]
    assert choose(pools, near=NEAR) == Placed(pools[1], False, COPY)


def test_the_clone_tier_is_skipped_when_the_lease_does_not_fit_there() -> None:
    pools = [
        pool("bound", mount_id=7, device=NEAR_DEVICE, free=GiB, reflink=True),
        pool("far", mount_id=1, free=900 * GiB),
    ]
    assert choose(pools, near=NEAR, expected=2 * GiB) == Placed(pools[1], False, COPY)


def test_same_filesystem_does_not_take_a_clone_capable_bind_mount() -> None:
    pools = [pool("bound", mount_id=7, device=NEAR_DEVICE, reflink=True)]
    assert refused(pools, near=NEAR, placement=Placement.SAME_FILESYSTEM).code == "no_pool_on_filesystem"


def test_any_reports_the_link_mode_it_landed_on() -> None:
    pools = [
        pool("bound", mount_id=7, device=NEAR_DEVICE, free=900 * GiB, reflink=True),
        pool("near", mount_id=NEAR, free=GiB),
    ]
    assert choose(pools, near=NEAR, placement=Placement.ANY) == Placed(pools[0], False, CLONE)

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounted

from scratchd.mounts import (
    Mount,
    MountTable,
    mount_of,
    mounts_under,
    parse_mountinfo,
    read_mounts,
    resolve_near,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs and bind mounts needs root")

# A host with a separate /home, a docker overlay, a bind mount of /srv/data at
# /mnt/bind, a read-only /boot, and two tmpfs stacked on /mnt/stack.
SAMPLE = """\
22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
28 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
29 28 259:1 / /boot ro,relatime shared:2 - vfat /dev/nvme0n1p1 rw,fmask=0022
30 28 259:3 / /home rw,relatime shared:3 - xfs /dev/nvme0n1p3 rw,attr2,inode64
31 28 253:0 / /srv/data rw,noatime shared:4 master:1 - ext4 /dev/mapper/vg-data rw
32 28 253:0 /sub /mnt/bind rw,noatime shared:4 - ext4 /dev/mapper/vg-data rw
33 28 0:40 / /mnt/stack rw shared:5 - tmpfs first rw,size=1024k
34 33 0:41 / /mnt/stack rw shared:6 - tmpfs second rw,size=2048k
35 28 0:42 / /var/lib/docker/overlay2/abc/merged rw,relatime - overlay overlay rw,lowerdir=/l
36 30 0:43 / /home/a\\040b/my\\011dir rw - tmpfs odd\\134name rw
37 28 259:4 / /mnt/a rw - ext4 /dev/sdb1 rw
38 28 259:5 / /mnt/ab rw - ext4 /dev/sdc1 ro
"""


def by_id(mounts: list[Mount]) -> dict[int, Mount]:
    return {mount.mount_id: mount for mount in mounts}


@pytest.fixture
def sample() -> list[Mount]:
    return parse_mountinfo(SAMPLE)


# -- parse_mountinfo ------------------------------------------------------------------------


def test_parse_reads_every_field(sample: list[Mount]) -> None:
    assert len(sample) == 12
    assert sample[1] == Mount(
        mount_id=28,
        parent_id=1,
        device="259:2",
        root="/",
        mount_point="/",
        fstype="ext4",
        source="/dev/nvme0n1p2",
        read_only=False,
    )


def test_parse_keeps_kernel_order(sample: list[Mount]) -> None:
    assert [mount.mount_id for mount in sample] == [22, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38]


def test_parse_skips_any_number_of_optional_fields(sample: list[Mount]) -> None:
    mounts = by_id(sample)
    assert mounts[31].fstype == "ext4" and mounts[31].source == "/dev/mapper/vg-data"  # two optional fields
    assert mounts[37].fstype == "ext4" and mounts[37].source == "/dev/sdb1"  # none


def test_parse_decodes_octal_escapes(sample: list[Mount]) -> None:
    odd = by_id(sample)[36]
    assert odd.mount_point == "/home/a b/my\tdir"
    assert odd.source == "odd\\name"


def test_parse_decodes_newline_escape() -> None:
    (mount,) = parse_mountinfo("40 28 0:50 /x\\012y /mnt/new\\012line rw - tmpfs tmpfs rw\n")
    assert mount.root == "/x\ny"
    assert mount.mount_point == "/mnt/new\nline"


def test_parse_read_only_from_mount_options(sample: list[Mount]) -> None:
    assert by_id(sample)[29].read_only  # "ro" per mount, superblock rw


def test_parse_read_only_from_super_options(sample: list[Mount]) -> None:
    assert by_id(sample)[38].read_only  # mount rw, superblock ro


def test_parse_read_only_is_a_whole_option_not_a_substring() -> None:
    (mount,) = parse_mountinfo("40 28 0:50 / /mnt/x rw,nosuid - tmpfs tmpfs rw,errors=remount-ro,size=4k\n")
    assert not mount.read_only


def test_parse_bind_mount_keeps_its_root(sample: list[Mount]) -> None:
    bind = by_id(sample)[32]
    assert (bind.root, bind.device) == ("/sub", by_id(sample)[31].device)


def test_parse_ignores_blank_lines() -> None:
    assert parse_mountinfo("\n\n") == []


@pytest.mark.parametrize(
    "line",
    [
        "28 1 259:2 / / rw,relatime shared:1 ext4 /dev/root rw",  # no separator
        "x 1 259:2 / / rw - ext4 /dev/root rw",  # id not a number
        "28 1 259:2 / / rw - ext4",  # fields missing after the separator
    ],
)
def test_parse_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_mountinfo("28 1 259:2 / / rw - ext4 /dev/root rw\n" + line + "\n")


def test_read_mounts_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_bytes(SAMPLE.encode())
    assert read_mounts(str(path)) == parse_mountinfo(SAMPLE)


def test_read_mounts_of_this_process_has_a_root() -> None:
    assert mount_of("/", read_mounts()).mount_point == "/"


# -- mount_of -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "mount_id"),
    [
        ("/", 28),
        ("/etc/passwd", 28),
        ("/boot", 29),
        ("/boot/efi/x", 29),
        ("/home/user/project", 30),
        ("/home/a b/my\tdir/cache", 36),
        ("/home/a b/my", 30),
        ("/srv/data/x", 31),
        ("/mnt/bind/x", 32),
        ("/mnt", 28),
        ("/mnt/a", 37),
        ("/mnt/a/deep/er", 37),
        ("/mnt/ab", 38),
        ("/mnt/ab/c", 38),
        ("/mnt/abc", 28),
        ("/var/lib/docker/overlay2/abc/merged/usr", 35),
        ("/var/lib/docker/overlay2/abc", 28),
    ],
)
def test_mount_of(sample: list[Mount], path: str, mount_id: int) -> None:
    assert mount_of(path, sample).mount_id == mount_id


def test_mount_of_bind_mount_is_its_own_mount_with_the_same_device(sample: list[Mount]) -> None:
    source, bind = mount_of("/srv/data/sub/x", sample), mount_of("/mnt/bind/x", sample)
    assert source.device == bind.device
    assert source.mount_id != bind.mount_id


def test_mount_of_stacked_mounts_the_top_one_wins(sample: list[Mount]) -> None:
    assert mount_of("/mnt/stack/file", sample).source == "second"


def test_mount_of_stacked_mounts_last_listed_wins_without_a_parent_chain() -> None:
    mounts = parse_mountinfo(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 0:40 / /mnt/x rw - tmpfs first rw\n"
        "3 1 0:41 / /mnt/x rw - tmpfs second rw\n"
    )
    assert mount_of("/mnt/x", mounts).mount_id == 3


def test_mount_of_stacked_three_high_follows_the_chain_not_the_listing_order() -> None:
    # Propagation may tuck a new mount *under* an existing one: the chain decides.
    mounts = parse_mountinfo(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "4 3 0:42 / /mnt/x rw - tmpfs top rw\n"
        "2 1 0:40 / /mnt/x rw - tmpfs bottom rw\n"
        "3 2 0:41 / /mnt/x rw - tmpfs middle rw\n"
    )
    assert mount_of("/mnt/x/y", mounts).source == "top"


def test_mount_of_ignores_a_mount_hidden_by_one_over_its_parent_directory() -> None:
    # /mnt/data/cache was mounted first, then something was mounted over /mnt/data:
    # a lookup of /mnt/data/cache now ends on the newer mount.
    mounts = parse_mountinfo(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 8:17 / /mnt/data/cache rw - ext4 /dev/sdb1 rw\n"
        "3 1 0:40 / /mnt/data rw - tmpfs over rw\n"
    )
    assert mount_of("/mnt/data/cache/x", mounts).mount_id == 3
    assert [mount.mount_id for mount in mounts_under("/mnt/data", mounts)] == [2]


def test_mount_of_a_mount_under_an_overmount_is_visible() -> None:
    mounts = parse_mountinfo(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "3 1 0:40 / /mnt/data rw - tmpfs over rw\n"
        "4 3 8:17 / /mnt/data/cache rw - ext4 /dev/sdb1 rw\n"
    )
    assert mount_of("/mnt/data/cache/x", mounts).mount_id == 4


def test_mount_of_root_whose_parent_is_outside_the_namespace(sample: list[Mount]) -> None:
    assert 1 not in by_id(sample)
    assert mount_of("/usr", sample).mount_id == 28


def test_mount_of_root_stacked_on_root() -> None:
    mounts = parse_mountinfo("1 1 0:2 / / rw - rootfs rootfs rw\n2 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    assert mount_of("/etc", mounts).mount_id == 2


def test_mount_of_trailing_and_double_slashes(sample: list[Mount]) -> None:
    assert mount_of("/mnt/a/", sample).mount_id == 37
    assert mount_of("/mnt//a", sample).mount_id == 37


def test_mount_of_without_a_containing_mount() -> None:
    mounts = parse_mountinfo("2 1 0:40 / /mnt/x rw - tmpfs t rw\n")
    with pytest.raises(LookupError):
        mount_of("/etc", mounts)


def test_mount_of_survives_a_parent_cycle() -> None:
    mounts = parse_mountinfo(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 3 0:40 / /mnt/x rw - tmpfs a rw\n"
        "3 2 0:41 / /mnt/x rw - tmpfs b rw\n"
    )
    assert mount_of("/mnt/x", mounts).mount_id == 1  # neither hangs off anything real


# -- mounts_under ---------------------------------------------------------------------------


def test_mounts_under_is_strict_and_component_wise(sample: list[Mount]) -> None:
    assert [mount.mount_id for mount in mounts_under("/mnt", sample)] == [32, 33, 34, 37, 38]
    assert mounts_under("/mnt/a", sample) == []
    assert mounts_under("/mnt/stack", sample) == []


def test_mounts_under_root_is_everything_else(sample: list[Mount]) -> None:
    assert {mount.mount_id for mount in mounts_under("/", sample)} == set(by_id(sample)) - {28}


def test_mounts_under_a_lease_directory() -> None:
    mounts = parse_mountinfo(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 8:17 / /pool rw - ext4 /dev/sdb1 rw\n"
        "3 2 0:40 / /pool/lease-1/proc rw - proc proc rw\n"
        "4 2 0:41 / /pool/lease-10 rw - tmpfs t rw\n"
    )
    assert [mount.mount_id for mount in mounts_under("/pool/lease-1", mounts)] == [3]


# -- resolve_near ---------------------------------------------------------------------------


def test_resolve_near_existing_path(tmp_path: Path) -> None:
    assert resolve_near(str(tmp_path)) == os.path.realpath(tmp_path)


def test_resolve_near_not_yet_existing_descendant(tmp_path: Path) -> None:
    assert resolve_near(str(tmp_path / "venv" / "lib" / "python")) == os.path.realpath(tmp_path)


def test_resolve_near_follows_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "real"
    (target / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    assert resolve_near(str(tmp_path / "link" / "sub")) == os.path.realpath(target / "sub")
    assert resolve_near(str(tmp_path / "link" / "new" / "venv")) == os.path.realpath(target)


def test_resolve_near_dangling_symlink_lands_where_it_points(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "not-yet")
    assert resolve_near(str(tmp_path / "link" / "x")) == os.path.realpath(tmp_path / "elsewhere")


def test_resolve_near_dot_dot_after_a_missing_component(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    assert resolve_near(str(tmp_path / "missing" / ".." / "b")) == os.path.realpath(tmp_path / "b")


def test_resolve_near_below_a_file_is_the_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert resolve_near(str(tmp_path / "file" / "x")) == os.path.realpath(tmp_path / "file")


def test_resolve_near_symlink_loop_falls_back_to_an_ancestor(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert resolve_near(str(tmp_path / "loop" / "x")) == os.path.realpath(tmp_path)


@pytest.mark.parametrize("path", ["relative/path", "", ".", "~/x"])
def test_resolve_near_refuses_relative_paths(path: str) -> None:
    with pytest.raises(ValueError, match="absolute"):
        resolve_near(path)


def test_resolve_near_refuses_nul_bytes() -> None:
    with pytest.raises(ValueError, match="NUL"):
        resolve_near("/tmp/a\0b")


# -- MountTable -----------------------------------------------------------------------------


def test_mount_table_reads_the_current_mounts() -> None:
    with MountTable() as table:
        assert mount_of("/", table.current()).mount_point == "/"


def test_mount_table_does_not_reread_an_unchanged_table(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = 0

    def counting_read() -> list[Mount]:
        nonlocal reads
        reads += 1
        return []

    # Other tests on this host may mount things meanwhile: one quiet try out of five proves it.
    for _ in range(5):
        with MountTable() as table:
            first = table.current()
            monkeypatch.setattr(table, "_read", counting_read)
            reads = 0
            if table.current() == first and table.current() == first and reads == 0:
                return
    pytest.fail("the mount table was re-read although nothing changed")


def test_mount_table_close_is_idempotent() -> None:
    table = MountTable()
    table.close()
    table.close()


# -- real mounts (root) ---------------------------------------------------------------------


@pytest.fixture
def tmpfs_and_bind(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A tmpfs at ``fs`` with a directory ``fs/sub`` bind-mounted at ``bind``."""
    fs, bind = tmp_path / "fs", tmp_path / "bind"
    fs.mkdir()
    bind.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(fs)):
        (fs / "sub").mkdir()
        with mounted("--bind", str(fs / "sub"), str(bind)):
            yield fs, bind


@needs_root
def test_premise_hard_links_fail_across_a_bind_mount_of_the_same_filesystem(
    tmpfs_and_bind: tuple[Path, Path],
) -> None:
    fs, bind = tmpfs_and_bind
    (fs / "sub" / "file").write_text("x")
    assert os.stat(fs / "sub").st_dev == os.stat(bind).st_dev
    os.link(fs / "sub" / "file", fs / "sub" / "same-mount")  # fine within one mount
    with pytest.raises(OSError) as caught:
        os.link(fs / "sub" / "file", bind / "other-mount")
    assert caught.value.errno == errno.EXDEV
    with pytest.raises(OSError) as caught:
        os.rename(fs / "sub" / "file", bind / "renamed")
    assert caught.value.errno == errno.EXDEV


@needs_root
def test_real_bind_mount_is_a_different_mount(tmpfs_and_bind: tuple[Path, Path]) -> None:
    fs, bind = tmpfs_and_bind
    mounts = read_mounts()
    source = mount_of(resolve_near(str(fs / "sub" / "new")), mounts)
    bound = mount_of(resolve_near(str(bind / "new")), mounts)
    assert source.mount_point == os.path.realpath(fs)
    assert bound.mount_point == os.path.realpath(bind)
    assert (source.fstype, bound.fstype) == ("tmpfs", "tmpfs")
    assert bound.root == "/sub"
    assert source.device == bound.device
    assert source.mount_id != bound.mount_id
    assert bound in mounts_under(os.path.realpath(bind.parent), mounts)


@needs_root
def test_real_read_only_mount(tmp_path: Path) -> None:
    with mounted("-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(tmp_path)):
        assert mount_of(os.path.realpath(tmp_path), read_mounts()).read_only


@needs_root
def test_mount_table_notices_mounts_and_unmounts(tmp_path: Path) -> None:
    point = os.path.realpath(tmp_path)
    with MountTable() as table:
        before = mount_of(point, table.current())
        with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", point):
            during = mount_of(point, table.current())
            assert during.mount_point == point
            assert during.mount_id != before.mount_id
            assert [m for m in table.current() if m.mount_point == point] == [
                m for m in read_mounts() if m.mount_point == point
            ]
        assert mount_of(point, table.current()) == before


@needs_root
def test_mount_table_notices_a_mount_stacked_on_top(tmp_path: Path) -> None:
    point = os.path.realpath(tmp_path)
    with MountTable() as table, mounted("-t", "tmpfs", "tmpfs", point):
        lower = mount_of(point, table.current())
        with mounted("-t", "tmpfs", "tmpfs", point):
            upper = mount_of(point, table.current())
            assert upper.parent_id == lower.mount_id
        assert mount_of(point, table.current()) == lower


@needs_root
def test_real_mount_point_with_a_space(tmp_path: Path) -> None:
    point = tmp_path / "with space\tand tab"
    point.mkdir()
    with mounted("-t", "tmpfs", "tmpfs", str(point)):
        assert mount_of(os.path.realpath(point / "x"), read_mounts()).mount_point == os.path.realpath(point)

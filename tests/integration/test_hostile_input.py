"""Hostile input, by hand: each case is refused in the error envelope and changes nothing.

The generated campaign (test_fuzz.py) covers the schema; these are the tricks a schema
does not describe: path games in ``near``, odd text in labels, malformed and oversized
bodies, HTTP framing. Every case is refused cleanly or answered truthfully.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, needs_root, tmpfs
from users import User, as_user, call, raw_http, throwaway_user, world_traversable_dir

pytestmark = pytest.mark.shared_daemon  # each case checks that it changed nothing, so they can share


def state(daemon: Daemon) -> tuple[set[str], int]:
    """What a refused request must leave as it was: the pool's entries and every lease record."""
    entries = daemon.pool_entries()
    return entries, len(daemon.request("GET", "/v1/leases", params={"state": "all"}).json()["leases"])


def assert_refused(response: httpx.Response, statuses: set[int]) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["message"], body
    return body["error"]


@pytest.fixture
def refuses(daemon: Daemon) -> Callable[..., dict[str, Any]]:
    """``refuses(statuses, method, path, **httpx kwargs)``: the request is refused and changes nothing."""

    def check(statuses: set[int], method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        before = state(daemon)
        error = assert_refused(daemon.request(method, path, **kwargs), statuses)
        assert state(daemon) == before
        return error

    return check


def raw_json(text: str | bytes) -> dict[str, Any]:
    return {
        "content": text.encode() if isinstance(text, str) else text,
        "headers": {"content-type": "application/json"},
    }


# -- near ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "near",
    [
        "relative/path",
        "",
        "./x",
        "~/x",
        "/tmp/\x00/x",
        "/" + "a" * 4096,
    ],
)
def test_near_that_is_not_an_absolute_path_is_refused(refuses, near):
    error = refuses({422}, "POST", "/v1/leases", json={"near": near})
    assert "near" in error["details"]["fields"]


@pytest.mark.parametrize(
    "near",
    [
        "/tmp/../../../../..",  # climbs past the root: the root
        "/" + "/".join(["a" * 255] * 15),  # 3.8 KiB, nothing of it exists: its nearest existing ancestor
        "/tmp/" + "b" * 300 + "/x",  # a component longer than NAME_MAX
        "/proc/self/fd/0/x",  # a magic link of the daemon's own
    ],
)
def test_near_that_cannot_be_resolved_counts_as_its_nearest_existing_ancestor(daemon, near):
    lease = daemon.lease(near=near)
    assert lease["same_filesystem"] in (True, False)
    daemon.request("DELETE", f"/v1/leases/{lease['id']}")


def test_near_in_a_symlink_loop_counts_as_its_ancestor(daemon, tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    lease = daemon.lease(near=str(tmp_path / "loop" / "x"))
    assert lease["state"] == "active"


@needs_root
def test_near_follows_dotdot_and_symlinks_the_way_the_kernel_does(make_daemon, tmp_path):
    with tmpfs(tmp_path / "fsA") as fs_a, tmpfs(tmp_path / "fsB") as fs_b:
        for fs in (fs_a, fs_b):
            (fs / "pool").mkdir()
            (fs / "work").mkdir()
        daemon = make_daemon(
            pool=[{"name": "a", "path": str(fs_a / "pool")}, {"name": "b", "path": str(fs_b / "pool")}]
        )
        (fs_a / "work" / "to-b").symlink_to(fs_b / "work")
        through_link = daemon.lease(near=str(fs_a / "work" / "to-b" / "venv"), placement="same-filesystem")
        assert through_link["pool"] == "b" and through_link["mount_point"] == str(fs_b)
        # ".." after a symlink is the target's parent, not the link's (realpath, not string games)
        dotdot = daemon.lease(near=str(fs_a / "work" / "to-b" / ".." / "pool"), placement="same-filesystem")
        assert dotdot["pool"] == "b"
        lexical = daemon.lease(
            near=str(fs_b / "work" / ".." / ".." / "fsA" / "work"), placement="same-filesystem"
        )
        assert lexical["pool"] == "a"
        daemon.stop()


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory the throwaway users can reach; tests take it before ``make_daemon``, so it goes after."""
    with world_traversable_dir() as path:
        yield path


@pytest.fixture
def alice() -> Iterator[User]:
    with throwaway_user() as user:
        yield user


@needs_root
def test_near_through_a_directory_the_caller_cannot_read_reveals_nothing(world, make_daemon, alice):
    with tmpfs(world / "fsA") as fs_a, tmpfs(world / "fsB") as fs_b:
        for fs in (fs_a, fs_b):
            (fs / "pool").mkdir()
            fs.chmod(0o755)
        private = world / "private"
        private.mkdir(mode=0o700)  # root's, closed to alice
        (private / "link").symlink_to(fs_b)
        daemon = make_daemon(
            start=False,
            server={"socket": str(world / "scratchd.sock")},
            pool=[{"name": "a", "path": str(fs_a / "pool")}, {"name": "b", "path": str(fs_b / "pool")}],
        )
        daemon.socket = str(world / "scratchd.sock")
        daemon.start()
        with pytest.raises(PermissionError):
            as_user(alice, lambda: os.stat(private / "link"))
        status, body = as_user(
            alice,
            lambda: call(
                daemon.socket,
                "POST",
                "/v1/leases",
                {"near": str(private / "link" / "x"), "placement": "same-filesystem"},
            ),
        )
        daemon.stop()
        # Whatever the answer, it must not be "your path is on fsB".
        assert not (status == 201 and body["mount_point"] == str(fs_b)), body
        assert not (status == 409 and str(fs_b) in json.dumps(body)), body


# -- labels ----------------------------------------------------------------------------------


def test_unicode_label_values_round_trip(daemon):
    labels = {"name": "Grüße ✓ 漢字 🚀", "long": "é" * 256, "empty": "", "k.with/odd_chars-1": "x"}
    lease = daemon.lease(labels=labels)
    assert lease["labels"] == labels
    assert daemon.request("GET", f"/v1/leases/{lease['id']}").json()["labels"] == labels


def test_32_labels_are_allowed_33_are_not(daemon, refuses):
    assert len(daemon.lease(labels={f"k{i}": "v" for i in range(32)})["labels"]) == 32
    error = refuses({422}, "POST", "/v1/leases", json={"labels": {f"k{i}": "v" for i in range(33)}})
    assert "labels" in error["details"]["fields"]


@pytest.mark.parametrize(
    "labels",
    [
        {"": "v"},
        {"K": "v"},
        {"ké": "v"},
        {"-k": "v"},
        {"k" * 64: "v"},
        {"k v": "v"},
        {"\nk": "v"},
        {"k": "v" * 257},
        {"k": "é" * 257},
        {"k": 1},
        {"k": None},
        {"k": ["v"]},
        ["k", "v"],
        "k=v",
    ],
)
def test_malformed_labels_are_refused(refuses, labels):
    error = refuses({422}, "POST", "/v1/leases", json={"labels": labels})
    assert any(field.startswith("labels") for field in error["details"]["fields"]), error


def test_a_label_key_with_a_trailing_newline_is_refused(refuses):
    refuses({422}, "POST", "/v1/leases", json={"labels": {"k\n": "v"}})


@pytest.mark.parametrize(
    "value", ["\x1b[2J\x1b]0;pwned\x07", "a\x00b", "line\nbreak", "\x7f", "\x9b31m", "\ud800"]
)
def test_label_values_with_control_characters_or_lone_surrogates_are_refused(refuses, value):
    refuses({422}, "POST", "/v1/leases", **raw_json(json.dumps({"labels": {"k": value}})))


# -- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, statuses",
    [
        ("[" * 5000 + "]" * 5000, {400, 422}),  # deeper than the parser recurses
        ('{"labels": ' + '{"a": ' * 3000 + "1" + "}" * 3001, {400, 422}),
        ('{"ttl_seconds": 1' + "0" * 5000 + "}", {400, 422}),  # past Python's int-digit limit
        ('{"ttl_seconds": 60', {400, 422}),
        ('{"ttl_seconds": NaN}', {422}),
        ('{"ttl_seconds": 1e400}', {400, 422}),
        (b"\xff\xfe{}", {400, 422}),  # not UTF-8
        (b'{"pool": "\xe9"}', {400, 422}),
        ("null", {422}),
        ("[]", {422}),
        ('"x"', {422}),
        ("1", {422}),
        ("true", {422}),
        ('{"labels": {"a": "' + "x" * 60_000 + '"}}', {422}),  # under the body cap, over the value cap
    ],
)
def test_malformed_and_deep_json_is_refused(refuses, body, statuses):
    refuses(statuses, "POST", "/v1/leases", **raw_json(body))


def test_the_400_for_an_unparsable_body_is_documented(daemon):
    assert_refused(daemon.request("POST", "/v1/leases", **raw_json(b"\xff")), {400})
    spec = daemon.request("GET", "/openapi.json").json()
    assert "400" in spec["paths"]["/v1/leases"]["post"]["responses"]


def test_a_body_over_64_kib_is_413(daemon, refuses):
    error = refuses({413}, "POST", "/v1/leases", **raw_json(b"{" + b" " * (64 * 1024) + b"}"))
    assert error["code"] == "request_too_large"
    # announced, not sent: refused before a byte of the body is read
    status, _, body = raw_exchange(
        daemon.socket,
        b"POST /v1/leases HTTP/1.1\r\nhost: scratchd\r\n"
        b"content-type: application/json\r\ncontent-length: 1000000000000"
        b"\r\n\r\n{",
    )
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml", None],
)
def test_wrong_content_types_are_refused(refuses, content_type):
    headers = {"content-type": content_type} if content_type else {}
    refuses({400, 415, 422}, "POST", "/v1/leases", content=b'{"ttl_seconds": 60}', headers=headers)


@pytest.mark.parametrize("body", ['{"ttl_seconds": "x", "ttl_seconds": 60}', '{"pool": "x", "pool": null}'])
def test_duplicate_keys_are_refused(refuses, body):
    refuses({400, 422}, "POST", "/v1/leases", **raw_json(body))


@pytest.mark.parametrize(
    "field, value",
    [
        ("ttl_seconds", -1),
        ("ttl_seconds", 0),
        ("ttl_seconds", 2**63),
        ("ttl_seconds", 10**30),
        ("ttl_seconds", 7 * 86400 + 1),
        ("idle_timeout_seconds", 0),
        ("idle_timeout_seconds", 2**40),
        ("max_bytes", 0),
        ("max_bytes", -(2**63)),
        ("max_bytes", 2**63),
        ("expected_bytes", -1),
        ("expected_bytes", 2**64),
        ("pid", 0),
        ("pid", -1),
        ("pid", 2**22 + 1),
        ("pid", 2**31),
        ("ttl_seconds", 1.5),
        ("ttl_seconds", "60"),
        ("evictable", 1),
        ("evictable", "true"),
        ("pool", ""),
        ("pool", "p" * 65),
    ],
)
def test_out_of_range_and_mistyped_numbers_are_refused(refuses, field, value):
    error = refuses({422}, "POST", "/v1/leases", json={field: value})
    assert error["code"] == "invalid_request" and field in error["details"]["fields"], error


@pytest.mark.parametrize(
    "body",
    [{"ttl_seconds": 0}, {"ttl_seconds": -5}, {"ttl_seconds": 2**70}, {"extra": 1}, {"ttl_seconds": "60"}],
)
def test_bad_renewals_are_refused_and_keep_the_lease(daemon, body):
    lease = daemon.lease(ttl_seconds=120)
    assert_refused(daemon.request("POST", f"/v1/leases/{lease['id']}/renew", json=body), {422})
    assert daemon.request("GET", f"/v1/leases/{lease['id']}").json()["expires_at"] == lease["expires_at"]


@pytest.mark.parametrize(
    "query",
    [
        "state=ACTIVE",
        "state=",
        "label=",
        "label=novalue",
        "label=" + "k" * 401 + "=v",
        "pool=" + "p" * 65,
        "since=-1",
        "since=99999999999999999999",
        "limit=0",
        "limit=1001",
        "limit=1.5",
        "since=0x10",
    ],
)
def test_bad_query_parameters_are_refused(daemon, query):
    path = "/v1/events" if query.startswith(("since", "limit")) else "/v1/leases"
    assert_refused(daemon.request("GET", f"{path}?{query}"), {422})


@pytest.mark.parametrize(
    "lease_id", ["..%2F..%2Fetc", "%2e%2e", ".trash", "%00", "A" * 64, "x" * 5000, "%F4%87%90%84", "-"]
)
def test_lease_ids_that_cannot_exist_are_404(daemon, lease_id):
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/renew")):
        error = assert_refused(daemon.request(method, f"/v1/leases/{lease_id}{path}"), {404})
        assert error["code"] in ("lease_not_found", "not_found")
    assert os.path.isdir(os.path.join(daemon.pool_path, ".trash"))


# -- HTTP framing ------------------------------------------------------------------------------


def raw_exchange(socket_path: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    return raw_http(socket_path, request)[0]


def chunked(body: bytes, size: int = 8192) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


CHUNKED_HEAD = (
    b"POST /v1/leases HTTP/1.1\r\nhost: scratchd\r\ncontent-type: application/json\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def test_a_small_chunked_body_is_accepted(daemon):
    status, _, body = raw_exchange(daemon.socket, CHUNKED_HEAD + chunked(b'{"ttl_seconds": 60}', 4))
    assert status == 201 and json.loads(body)["ttl_seconds"] == 60


def test_an_oversized_chunked_body_is_refused_and_changes_nothing(daemon):
    before = state(daemon)
    status, _, body = raw_exchange(
        daemon.socket, CHUNKED_HEAD + chunked(b'{"labels": {"k": "' + b"a" * 100_000 + b'"}}')
    )
    assert 400 <= status < 500 and set(json.loads(body)) == {"error"}
    assert state(daemon) == before


def test_an_oversized_chunked_body_is_413(daemon):
    status, _, body = raw_exchange(daemon.socket, CHUNKED_HEAD + chunked(b"[" + b" " * 100_000 + b"]"))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


SMUGGLING = [
    b"content-length: 10\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"content-length: 2\r\ncontent-length: 3\r\n\r\n{} ",
    b"content-length: -1\r\n\r\n{}",
    b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("framing", SMUGGLING)
def test_ambiguous_framing_is_refused_and_changes_nothing(daemon, framing):
    before = state(daemon)
    status, _, _ = raw_exchange(
        daemon.socket,
        b"POST /v1/leases HTTP/1.1\r\nhost: scratchd\r\ncontent-type: application/json\r\n" + framing,
    )
    assert status == 400
    assert state(daemon) == before


def test_ambiguous_framing_answers_in_the_envelope(daemon):
    _, headers, body = raw_exchange(
        daemon.socket, b"POST /v1/leases HTTP/1.1\r\nhost: scratchd\r\n" + SMUGGLING[0]
    )
    assert headers["content-type"].startswith("application/json") and set(json.loads(body)) == {"error"}

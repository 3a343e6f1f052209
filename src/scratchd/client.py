"""A Python client for the scratchd API (docs/api.md), over the Unix socket or TCP.

``scratchd run`` imports this on every CI job, so it uses the standard library
only, and not ``http.client``: that costs ~25 ms to import (its email parser),
the whole start-up budget of ``scratchd run``. The daemon speaks plain HTTP/1.1
with JSON bodies, which the few lines of ``_Connection`` cover, and only
``scratchd run``'s own needs are imported at the module level.
"""

from __future__ import annotations

import _socket  # not socket.py: 3 ms to import (enums for every constant, selectors)
import os
import sys
import time

# json's C accelerator alone, a private CPython module: the json package costs 2.5 ms of
# every `scratchd run` (38.9 against 41.0 ms, bench/tricks.py in docs/performance.md). Only on the CPython versions
# whose _json signatures this was checked against; any other Python takes the package.
try:
    if sys.implementation.name != "cpython" or not (3, 10) <= sys.version_info < (3, 14):
        raise ImportError("not a CPython whose _json was checked")
    import _json
except ImportError:
    _json = None  # type: ignore[assignment]

TYPE_CHECKING = False  # `import typing` costs 4 ms, `collections.abc` 0.2 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["Client", "DaemonUnreachable", "Lease", "LeaseBlock", "Renewer", "ScratchdError", "lease"]

_USER_AGENT = "scratchd-client"
_MAX_HEADERS = 100
_MAX_LINE = 65536
_RETRY_SECONDS = 5.0  # the longest wait before renewing again after a failure


class ScratchdError(Exception):
    """The daemon refused a request: ``code`` and ``message`` come from its error body."""

    def __init__(self, status: int, code: str, message: str, details: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def __reduce__(self) -> tuple[object, ...]:  # picklable, so it can leave a multiprocessing worker
        return type(self), (self.status, self.code, self.message, self.details)


class DaemonUnreachable(ScratchdError):
    """No answer from the daemon at ``address``: not running, wrong socket or URL, or it hung up."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(0, "unreachable", f"cannot reach scratchd at {address}: {reason}")
        self.address = address
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.address, self.reason)


class _Connection:
    """One HTTP/1.1 keep-alive connection: requests out, ``(status, body)`` back."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.reused = False
        self._buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def receive(self, method: str) -> tuple[int, bytes, bool]:
        """Read one answer: its status, its body and whether the connection stays usable."""
        status, headers = self._read_head()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked()
        elif "content-length" in headers:
            body = self._read_exactly(int(headers["content-length"]))
        elif status in (204, 304) or method == "HEAD":
            body = b""
        else:  # the body ends when the connection does
            while self._fill():
                pass
            return status, self._take(len(self._buffer)), False
        self.reused = True
        return status, body, headers.get("connection", "").lower() != "close"

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while True:
            line = self._readline()
            if not line:
                # What a keep-alive connection the daemon closed looks like.
                raise ConnectionResetError("connection closed before an answer")
            version, status_text = line.split(None, 2)[:2]
            if not version.startswith(b"HTTP/1."):
                raise ValueError(f"not an HTTP answer: {line[:80]!r}")
            status = int(status_text)
            headers: dict[str, str] = {}
            for _ in range(_MAX_HEADERS):
                line = self._readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                raise ValueError("too many headers")
            if status >= 200:  # 1xx answers are interim: the real one follows
                return status, headers

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self._readline().split(b";")[0], 16)
            if size == 0:
                while self._readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(self._read_exactly(size))
            self._readline()

    def _readline(self) -> bytes:
        """Up to and with the next newline; what is left at the end of the stream."""
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > _MAX_LINE:
                raise ValueError("header line too long")
            if not self._fill():
                return self._take(len(self._buffer))
        return self._take(end + 1)

    def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise ConnectionResetError("connection closed in the middle of an answer")
        return self._take(size)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self._buffer += chunk
        return bool(chunk)

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _quote(value: str) -> str:
    """Percent-encode ``value`` for a path segment or query value (urllib.parse costs ~3 ms)."""
    return "".join(chr(byte) if byte in _UNRESERVED else f"%{byte:02X}" for byte in value.encode())


def _with_query(path: str, params: Mapping[str, object]) -> str:
    query = "&".join(f"{name}={_quote(str(value))}" for name, value in params.items() if value is not None)
    return f"{path}?{query}" if query else path


class Client:
    """Talks to one scratchd daemon, keeping one connection open across requests.

    Where: the ``socket`` or ``url`` given, else ``$SCRATCHD_SOCKET`` or
    ``$SCRATCHD_URL`` (with ``$SCRATCHD_TOKEN``), else the default socket path.
    A socket and a URL at the same level are a ValueError: which was meant is
    anybody's guess. Methods return the API's JSON bodies as dicts. Not
    thread-safe: one client per thread, except that a ``Renewer`` borrows its
    owner's client while the owner waits.
    """

    def __init__(
        self,
        socket: str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30,
    ) -> None:
        if socket is not None and url is not None:
            raise ValueError(f"both socket={socket!r} and url={url!r} given: use one")
        if socket is None and url is None:
            socket = os.environ.get("SCRATCHD_SOCKET") or None
            url = os.environ.get("SCRATCHD_URL") or None
            if socket is not None and url is not None:
                raise ValueError(
                    f"both SCRATCHD_SOCKET={socket} and SCRATCHD_URL={url} are set: unset one, or choose with"
                    " --socket or --url"
                )
        if socket is None and url is None:
            from scratchd.paths import default_socket_path

            socket = default_socket_path()
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._socket_path = socket
        headers = f"User-Agent: {_USER_AGENT}\r\nAccept: application/json\r\n"
        if socket is not None:
            self.address = socket
            self._hostname, self._port, self._tls, self._prefix = "", 0, False, ""
            headers += "Host: localhost\r\n"
        else:
            self.address = url or ""
            self._hostname, self._port, self._tls, self._prefix = _parse_url(self.address)
            host = f"[{self._hostname}]" if ":" in self._hostname else self._hostname  # IPv6
            headers += f"Host: {host}:{self._port}\r\n"
            token = token if token is not None else os.environ.get("SCRATCHD_TOKEN")
            if token:
                headers += f"Authorization: Bearer {token}\r\n"
        self._headers = headers

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- API --------------------------------------------------------------

    def create_lease(self, **fields: object) -> dict:
        """``POST /v1/leases`` with LeaseRequest ``fields`` (near, pool, ttl_seconds, pid, …)."""
        return self.request("POST", "/v1/leases", fields)

    def get_lease(self, lease_id: str) -> dict:
        return self.request("GET", f"/v1/leases/{_quote(lease_id)}")

    def list_leases(
        self,
        state: str | None = None,
        pool: str | None = None,
        tenant: str | None = None,
        label: str | None = None,
    ) -> dict:
        """``{"leases": [...]}``; ``state`` is active (the daemon's default), ended or all; ``label`` is ``k=v``."""
        params = {"state": state, "pool": pool, "tenant": tenant, "label": label}
        return self.request("GET", _with_query("/v1/leases", params))

    def renew(self, lease_id: str, ttl_seconds: int | None = None) -> dict:
        body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        # Renewing twice is harmless, so a renew may be re-sent on a dropped connection.
        return self.request("POST", f"/v1/leases/{_quote(lease_id)}/renew", body, idempotent=True)

    def release(self, lease_id: str, keep: bool | None = None) -> dict:
        """End a lease; ``keep`` (a lease with a ``cache_key``): keep its directory as a warm cache.

        None leaves it to the daemon: kept when the lease has a ``cache_key``.
        """
        params = {} if keep is None else {"keep": "true" if keep else "false"}
        return self.request("DELETE", _with_query(f"/v1/leases/{_quote(lease_id)}", params))

    def caches(self, key: str | None = None, tenant: str | None = None, pool: str | None = None) -> dict:
        """``{"caches": [...]}``: the kept caches the caller may see (its own; all, for viewers and admins)."""
        params = {"key": key, "tenant": tenant, "pool": pool}
        return self.request("GET", _with_query("/v1/caches", params))

    def get_cache(self, cache_id: str) -> dict:
        return self.request("GET", f"/v1/caches/{_quote(cache_id)}")

    def drop_cache(self, cache_id: str) -> dict:
        """Delete a ``free`` kept cache; one in use answers 409 ``cache_in_use``."""
        return self.request("DELETE", f"/v1/caches/{_quote(cache_id)}")

    def pools(self) -> dict:
        return self.request("GET", "/v1/pools")

    def usage(self) -> dict:
        return self.request("GET", "/v1/usage")

    def events(
        self,
        since: int | None = None,
        limit: int | None = None,
        order: str | None = None,
        before: int | None = None,
    ) -> dict:
        """``{"events": [...]}`` after ``since`` (exclusive): poll with the last ``seq`` seen.

        ``order="desc"`` answers newest first (the last ``limit``); ``before`` pages back from there.
        """
        params = {"since": since, "limit": limit, "order": order, "before": before}
        return self.request("GET", _with_query("/v1/events", params))

    def health(self) -> dict:
        return self.request("GET", "/healthz")

    # -- transport ----------------------------------------------------------

    def request(self, method: str, path: str, body: object = None, *, idempotent: bool | None = None) -> dict:
        """Send one request and decode the answer; non-2xx answers raise ``ScratchdError``.

        A kept-alive connection the daemon has closed is replaced once, when the
        request did not get through or is safe to repeat.
        """
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._headers}"
        if body is None:
            request = f"{head}\r\n".encode()
        else:
            payload = _dumps(body).encode()
            request = (
                f"{head}Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        while True:
            connection = self._connection or self._connect()
            sent = False
            try:
                connection.sock.sendall(request)
                sent = True
                status, content, keep_alive = connection.receive(method)
            except (OSError, ValueError) as error:
                self.close()
                if connection.reused and isinstance(error, ConnectionError) and (idempotent or not sent):
                    continue  # a fresh connection is not `reused`: this retries once
                raise DaemonUnreachable(self.address, _reason(error)) from error
            if not keep_alive:
                self.close()
            return _decode(status, content)

    def _connect(self) -> _Connection:
        try:
            if self._socket_path is not None:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(self._socket_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                import socket

                sock = socket.create_connection((self._hostname, self._port), self.timeout)
                if self._tls:
                    import ssl

                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._hostname)
        except OSError as error:
            raise DaemonUnreachable(self.address, _reason(error)) from error
        self._connection = _Connection(sock)
        return self._connection


def _parse_url(url: str) -> tuple[str, int, bool, str]:
    """``(host, port, TLS, path prefix)`` of an ``http(s)://host[:port][/prefix]`` URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a daemon URL: {url!r} (use http://HOST:PORT)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname, port, parts.scheme == "https", parts.path.rstrip("/")


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class _Grammar:
    """What ``_json.make_scanner`` reads off its context: strict JSON, plain dicts."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")


def _unencodable(value: object) -> object:
    raise TypeError(f"a {type(value).__name__} cannot be sent as JSON")


if _json is not None:
    # typeshed types the context as a make_scanner; the scanner reads only _Grammar's attributes.
    _scan = _json.make_scanner(_Grammar)  # type: ignore[arg-type]
    _encode = _json.make_encoder(
        None, _unencodable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, False
    )

    def _loads(content: bytes) -> object:
        """Like ``json.loads``, for the daemon's answers (UTF-8); ValueError when not JSON."""
        text = content.decode().strip()
        try:
            data, end = _scan(text, 0)
        except StopIteration:
            raise ValueError("not JSON") from None
        if end != len(text):
            raise ValueError("not JSON: extra data")
        return data

    def _dumps(body: object) -> str:
        """Like ``json.dumps`` on request bodies (dicts of str, int, bool, None, lists, dicts)."""
        return "".join(_encode(body, 0))
else:

    def _loads(content: bytes) -> object:
        import json

        return json.loads(content)

    def _dumps(body: object) -> str:
        import json

        return json.dumps(body)


def _decode(status: int, content: bytes) -> dict:
    try:
        data = _loads(content) if content else {}
    except ValueError:
        data = None
    if 200 <= status < 300:
        if data is None:
            raise ScratchdError(status, "invalid_response", "the daemon answered something that is not JSON")
        if not isinstance(data, dict):
            raise ScratchdError(status, "invalid_response", "the daemon answered JSON that is not an object")
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        text = content[:200].decode("utf-8", "replace").strip()
        raise ScratchdError(status, f"http_{status}", text or f"HTTP status {status}")
    raise ScratchdError(
        status,
        str(error.get("code") or f"http_{status}"),
        str(error.get("message") or ""),
        error.get("details"),
    )


class Renewer:
    """Keeps a lease alive: every third of its TTL from a thread in a ``with`` block, or
    from its owner calling ``check()`` on a timer of its own.

    It borrows the owner's ``Client``: the owner must not use it meanwhile.
    Failures to renew go to ``on_error``; after one, the next try comes sooner.
    """

    def __init__(
        self,
        client: Client,
        lease_id: str,
        ttl_seconds: float,
        on_error: Callable[[ScratchdError], None] | None = None,
    ) -> None:
        self.interval = ttl_seconds / 3
        self._client = client
        self.lease_id = lease_id
        self._ttl = int(ttl_seconds)
        self._on_error = on_error
        self._due = time.monotonic() + self.interval

    def renew(self) -> float:
        """Renew once; the seconds until the next renewal, 0 once the lease has ended."""
        try:
            self._client.renew(self.lease_id, self._ttl)
        except ScratchdError as error:
            if self._on_error is not None:
                self._on_error(error)
            if error.code in ("lease_ended", "lease_not_found"):
                return 0
            return min(self.interval, _RETRY_SECONDS)
        return self.interval

    def check(self) -> str | None:
        """Renew when due, else look the lease up: its ``end_reason`` once it has ended, else None.

        A lease can end with nobody here asking (an admin's release, over its
        size, its directory removed): called every second, this notices within
        one. Only failed renewals are reported: a daemon restarting is not news
        every second.
        """
        renewing = time.monotonic() >= self._due
        try:
            if renewing:
                self._due = time.monotonic() + min(self.interval, _RETRY_SECONDS)
                lease = self._client.renew(self.lease_id, self._ttl)
                self._due = time.monotonic() + self.interval
            else:
                lease = self._client.get_lease(self.lease_id)
        except ScratchdError as error:
            if error.code == "lease_ended":
                try:
                    return str(self._client.get_lease(self.lease_id)["end_reason"])
                except ScratchdError:
                    return "unknown"
            if error.code == "lease_not_found":  # ended, and its record dropped already
                return "unknown"
            if renewing and self._on_error is not None:
                self._on_error(error)
            return None
        return None if lease["state"] == "active" else str(lease["end_reason"])

    def __enter__(self) -> Renewer:
        import signal
        import threading

        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"scratchd-renew-{self.lease_id}", daemon=True)
        # Signals belong to the main thread: start this one with them blocked, so
        # that they interrupt what the main thread is blocked in, not this one.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        delay = self.interval
        while delay and not self._stopped.wait(delay):
            delay = self.renew()


class Lease:
    """A lease as the daemon described it (``data``); ``os.fspath(lease)`` is its directory."""

    __slots__ = ("data",)

    def __init__(self, data: dict) -> None:
        self.data = data

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def path(self) -> str:
        return self.data["path"]

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"Lease(id={self.id!r}, path={self.path!r})"


_THIS_PROCESS = -1  # lease()'s default pid: the caller's, read when it is called
KEEPS = ("success", "always", "never")  # when a lease with a cache_key is kept as a warm cache


def lease(
    near: str | None = ".",
    ttl_seconds: int | None = None,
    *,
    pid: int | None = _THIS_PROCESS,
    client: Client | None = None,
    cache_key: str | None = None,
    cache_fallback: list[str] | None = None,
    keep: str = "success",
    **fields: object,
) -> LeaseBlock:
    """Hold a lease for a ``with`` block: renewed while it runs, released when it ends, even on errors.

    ``near`` defaults to the current directory, as the CLI does: the cache lands
    on the mount the build runs from when a pool is there. The lease is bound
    to this process unless ``pid`` names another or is None: a job killed with
    SIGKILL, which runs no ``__exit__``, loses it within seconds, not at its
    TTL. Other ``fields`` are the API's LeaseRequest fields (pool, placement,
    max_bytes, labels, …)::

        with scratchd.lease(ttl_seconds=3600, labels={"job": "42"}) as held:
            build(cache_dir=held.path)

    With a ``cache_key`` the lease starts from this tenant's kept cache of that
    key (or of the first ``cache_fallback`` prefix that has one) when there is
    one, and is kept under its key when released: by ``keep``, when the block
    ends without an exception (``success``), ``always`` or ``never``. A job
    that failed may have left a half-written cache.
    """
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {', '.join(KEEPS)}, not {keep!r}")
    if cache_key is None and keep != "success":
        raise ValueError("keep is about a cache: give a cache_key")
    if cache_key is not None:
        fields["cache_key"] = cache_key
    if cache_fallback:
        fields["cache_fallback"] = list(cache_fallback)
    if near is not None:
        fields["near"] = os.path.abspath(near)
    if pid is not None:
        fields["pid"] = os.getpid() if pid == _THIS_PROCESS else pid
    if ttl_seconds is not None:
        fields["ttl_seconds"] = ttl_seconds
    return LeaseBlock(client, fields, keep)


def keeps(keep: str, succeeded: bool) -> bool:
    """Whether a lease with a cache key is kept, by ``keep`` (one of ``KEEPS``) and how its job ended."""
    return keep == "always" or (keep == "success" and succeeded)


class LeaseBlock:
    """What ``lease()`` returns: the lease is taken on entering the block, released on leaving it.

    A class rather than ``contextlib.contextmanager``, whose import costs ``scratchd run``.
    """

    def __init__(self, client: Client | None, fields: dict[str, object], keep: str = "success") -> None:
        self._own_client = client is None
        self._client = client if client is not None else Client()
        self._fields = fields
        self._keep = keep
        self._lease: Lease | None = None
        self._renewer: Renewer | None = None

    def __enter__(self) -> Lease:
        try:
            self._lease = Lease(self._client.create_lease(**self._fields))
            self._renewer = Renewer(
                self._client, self._lease.id, self._lease.data["ttl_seconds"], on_error=_warn
            )
            self._renewer.__enter__()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self._lease

    def __exit__(self, exc_type: object = None, *exc_rest: object) -> None:
        try:
            if self._renewer is not None:
                self._renewer.__exit__()
            if self._lease is not None:
                keep = keeps(self._keep, exc_type is None) if "cache_key" in self._fields else None
                self._lease.data = self._client.release(self._lease.id, keep=keep)
        finally:
            if self._own_client:
                self._client.close()


def _warn(error: ScratchdError) -> None:
    import warnings

    warnings.warn(f"scratchd: renewing the lease failed: {error}", RuntimeWarning, stacklevel=2)

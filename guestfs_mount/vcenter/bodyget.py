"""The transfer GET, read by a worker thread with a blocking TLS socket.

Why not httpx here: under trio, TLS runs through ``ssl.MemoryBIO`` driven from Python, and
a 1 GiB body arrived at ~150 MB/s (httpx sync: ~245 MB/s, h11 bookkeeping per 64 KiB),
against ~450 MB/s for ``readinto`` on a blocking ``ssl`` socket in a thread, which also
releases the GIL while it decrypts and hashes. Everything else (API calls, the transfer
creation, error translation) stays on httpx. Only the byte stream of the single-use
transfer URL takes this path; it is still the vCenter layer's private business.

The thread hands >= 1 MiB chunks to the event loop through a memory channel; closing the
channel's receiving end (the download was cancelled) or ``abort()`` stops the thread.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import trio

from guestfs_mount.errors import RemoteTimeout, TlsError, TransferError, TransportError

from . import tls

FIRST_CHUNK = 16 << 10  # small first: the first reader is waiting for it
HASH_THREAD_MIN = 16 << 20
CHUNK = 4 << 20  # then large: each hand-over to the event loop costs a thread round trip


class ConnectionPool:
    """Idle keep-alive connections to transfer hosts, shared by the reader threads: a new
    TLS handshake per file cost ~10 % of a `grep -r` and most of the time to first byte."""

    def __init__(self, per_host: int = 8) -> None:
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._per_host = per_host

    def take(self, key: tuple[str, str, int]) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._per_host:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


@dataclass
class BodyGet:
    scheme: str
    host: str
    port: int
    target: str  # path?query, never logged (the query holds the URL's token)
    context: ssl.SSLContext | None
    connect_timeout: float
    stall_timeout: float
    expected: int
    desc: str
    where: str
    pool: ConnectionPool | None = None
    _hasher: ThreadPoolExecutor | None = None
    nbytes: int = 0
    digest: str = ""
    md5: str = ""
    _aborted: threading.Event = field(default_factory=threading.Event)
    _conn: http.client.HTTPConnection | None = None

    def abort(self) -> None:
        """Stop the reader thread soon (from any thread)."""
        self._aborted.set()
        conn = self._conn
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self, send: trio.MemorySendChannel[bytes]) -> None:
        """Thread body: connect, check the answer, stream the body into ``send``."""
        reusable = False
        # A thread of its own pays off only for large bodies; small files hash inline.
        self._hasher = (
            ThreadPoolExecutor(2, thread_name_prefix="guestfs-hash")  # SHA-256 and MD5
            if self.expected > HASH_THREAD_MIN
            else None
        )
        try:
            reusable = self._run(send)
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)
            conn, self._conn = self._conn, None
            if conn is not None:
                if reusable and self.pool is not None and not self._aborted.is_set():
                    self.pool.give(self._key, conn)
                else:
                    conn.close()

    @property
    def _key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def _new_connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.host, self.port, context=self.context, timeout=self.connect_timeout
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)

    def _connect(self) -> http.client.HTTPResponse:
        reused = self.pool.take(self._key) if self.pool is not None else None
        conn = reused or self._new_connection()
        self._conn = conn
        try:
            try:
                return self._request(conn)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if reused is None:
                    raise
                # The host closed an idle keep-alive connection: the request never got
                # an answer, so the single-use URL is still unused. Once more, afresh.
                conn.close()
                conn = self._conn = self._new_connection()
                return self._request(conn)
        except ssl.SSLError as e:
            reason = tls.ssl_reason(e)
            raise TlsError(
                f"TLS certificate of {self.where} not trusted: {reason}"
                " (use --esx-ca-file or --thumbprint)"
            ) from e
        except TimeoutError as e:
            raise RemoteTimeout(f"{self.desc}: no answer from {self.where} in time") from e
        except (OSError, http.client.HTTPException) as e:
            raise TransportError(f"{self.desc}: cannot talk to {self.where}: {_reason(e)}") from e

    def _request(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        conn.timeout = self.connect_timeout
        if conn.sock is not None:
            conn.sock.settimeout(self.connect_timeout)
        conn.request("GET", self.target, headers={"Accept-Encoding": "identity"})
        conn.sock.settimeout(self.stall_timeout)
        return conn.getresponse()

    def _run(self, send: trio.MemorySendChannel[bytes]) -> bool:
        """Stream the body; True when the connection may serve another transfer."""
        resp = self._connect()
        status = resp.status
        if 300 <= status < 400:
            raise TransferError(f"{self.desc}: {self.where} answered with a redirect; refused")
        if status != 200:
            raise TransferError(f"{self.desc}: {self.where} answered HTTP {status}")
        cl = resp.getheader("content-length")
        if cl is not None and (not cl.strip().isdigit() or int(cl) != self.expected):
            raise TransferError(
                f"{self.desc}: Content-Length {cl[:30]!r} differs from the expected size"
                f" {self.expected}"
            )
        enc = (resp.getheader("content-encoding") or "identity").strip().lower()
        if enc not in ("", "identity"):
            raise TransferError(f"{self.desc}: unexpected Content-Encoding {enc[:30]!r}")
        h = hashlib.sha256()
        # MD5 (415 MB/s here) beside SHA-256 (1150 MB/s): on a thread each for large files.
        h5 = hashlib.md5(usedforsecurity=False)
        # One byte more than expected: a body that runs long is caught at once.
        limit = self.expected + 1
        n = 0
        hashing: list[Future[None]] = []
        size = FIRST_CHUNK
        while not self._aborted.is_set():
            buf = bytearray(min(size, limit - n) or 1)
            size = CHUNK
            view = memoryview(buf)
            filled = 0
            try:
                while filled < len(buf):
                    k = resp.readinto(view[filled:])
                    if not k:
                        break
                    filled += k
            except TimeoutError as e:
                raise TransferError(
                    f"{self.desc}: no data for {self.stall_timeout:.0f}s after"
                    f" {n + filled} of {self.expected} bytes"
                ) from e
            except (OSError, http.client.HTTPException) as e:
                if self._aborted.is_set():
                    return False
                raise TransferError(
                    f"{self.desc}: connection broke after {n + filled} of {self.expected}"
                    f" bytes: {_reason(e)}"
                ) from e
            n += filled
            if n > self.expected:
                raise TransferError(f"{self.desc}: more than the expected {self.expected} bytes")
            if filled:
                data = bytes(view[:filled])
                # Hashed on another thread (hashlib releases the GIL), in step with the
                # reads: this thread's TLS decryption is the transfer's bottleneck.
                for f in hashing:
                    f.result()  # at most one chunk waits to be hashed
                if self._hasher is not None:
                    hashing = [self._hasher.submit(x.update, data) for x in (h, h5)]
                else:
                    h.update(data)
                    h5.update(data)
                try:
                    trio.from_thread.run(send.send, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
                    return False  # the download was cancelled
            if filled < len(buf):
                break
        if self._aborted.is_set():
            return False
        for f in hashing:
            f.result()
        if n != self.expected:
            raise TransferError(
                f"{self.desc}: got {n} of {self.expected} bytes (transfer cut short)"
            )
        self.nbytes = n
        self.digest = h.hexdigest()
        self.md5 = h5.hexdigest()
        return not resp.will_close and resp.isclosed()


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__

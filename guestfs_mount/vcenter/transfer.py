"""The transfer GET: the one path that downloads a file body, in a worker thread.

Why not httpx here: under trio, TLS runs through ``ssl.MemoryBIO`` driven from Python, and
a 1 GiB body arrived at ~150 MB/s (httpx sync: ~245 MB/s, h11 bookkeeping per 64 KiB),
against ~450 MB/s for ``readinto`` on a blocking ``ssl`` socket in a thread, which also
releases the GIL while it decrypts and hashes. API calls stay on httpx (:mod:`.session`);
only the byte stream of the single-use transfer URL takes this path.

The thread hashes (SHA-256 and MD5) as it reads and hands the bytes to the event loop
through a memory channel as they arrive: the first hand-over is small (16 KiB, a reader
is waiting for it), later ones grow up to 4 MiB only while data keeps flowing - bytes
never wait more than ``FLUSH_AFTER`` in the thread for a batch to fill. Closing the
channel's receiving end (the download was cancelled) or ``abort()`` stops the thread.
Transfer hosts (ESXi) may close the connection after each transfer: a kept-alive
connection that turns out closed is replaced once, before any byte of the answer.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import trio

from guestfs_mount.errors import (
    RemoteTimeout,
    TlsError,
    TransferError,
    TransportError,
    UnsafeTransferUrl,
    iter_chain,
)

from . import tls
from .retry import CircuitBreaker

__all__ = ["BodyGet", "ConnectionPool", "fetch_body"]

FIRST_CHUNK = 16 << 10  # small first: the first reader is waiting for it
HASH_THREAD_MIN = 16 << 20
CHUNK = 4 << 20  # at most this per hand-over (each costs a thread round trip)
READ = 1 << 20  # one read1() call
FLUSH_AFTER = 0.02  # seconds: bytes in hand are handed over once this old
# What a kept-alive connection that the host has closed meanwhile raises on reuse.
_CLOSED_BY_PEER = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


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
            ThreadPoolExecutor(1, thread_name_prefix="guestfs-sha256")
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
            except _CLOSED_BY_PEER:
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
            raise UnsafeTransferUrl(f"{self.desc}: {self.where} answered with a redirect; refused")
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
        m = hashlib.md5(usedforsecurity=False)

        def update(data: bytes) -> None:
            h.update(data)
            m.update(data)

        n = 0
        hashing: Future[None] | None = None
        batch = FIRST_CHUNK
        pending: list[bytes] = []
        pending_len = 0
        last = time.monotonic()
        eof = False
        while not self._aborted.is_set() and not eof:
            try:
                # One byte more than expected: a body that runs long is caught at once.
                want = min(READ, batch - pending_len, self.expected + 1 - n - pending_len)
                piece = resp.read1(max(1, want))
            except TimeoutError as e:
                raise TransferError(
                    f"{self.desc}: no data for {self.stall_timeout:.0f}s after"
                    f" {n + pending_len} of {self.expected} bytes"
                ) from e
            except (OSError, http.client.HTTPException) as e:
                if self._aborted.is_set():
                    return False
                raise TransferError(
                    f"{self.desc}: connection broke after {n + pending_len} of"
                    f" {self.expected} bytes: {_reason(e)}"
                ) from e
            if piece:
                pending.append(piece)
                pending_len += len(piece)
                # A known length read in full is the end: read1() would not say so.
                eof = resp.length == 0
                if n + pending_len > self.expected:
                    raise TransferError(
                        f"{self.desc}: more than the expected {self.expected} bytes"
                    )
            else:
                eof = True
            now = time.monotonic()
            if not pending or (not eof and pending_len < batch and now - last < FLUSH_AFTER):
                continue
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            pending_len = 0
            n += len(data)
            # Hashed on another thread (hashlib releases the GIL), in step with the
            # reads: this thread's TLS decryption is the transfer's bottleneck.
            if hashing is not None:
                hashing.result()  # at most one chunk waits to be hashed
            if self._hasher is not None:
                hashing = self._hasher.submit(update, data)
            else:
                update(data)
            try:
                trio.from_thread.run(send.send, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
                return False  # the download was cancelled
            last = time.monotonic()
            batch = min(CHUNK, batch * 4)
        if self._aborted.is_set():
            return False
        if hashing is not None:
            hashing.result()
        if n != self.expected:
            raise TransferError(
                f"{self.desc}: got {n} of {self.expected} bytes (transfer cut short)"
            )
        self.nbytes = n
        self.digest = h.hexdigest()
        self.md5 = m.hexdigest()
        if resp.length == 0:
            resp.read()  # marks the answer complete, so the connection may serve again
        return not resp.will_close and resp.isclosed()


async def fetch_body(
    body: BodyGet,
    sink: Callable[[bytes], Awaitable[None]],
    breaker: CircuitBreaker,
    on_data: Callable[[int], None],
) -> None:
    """Run ``body`` in a worker thread and feed what it reads into ``sink``; ``on_data``
    is told each hand-over's size before the sink sees it (the first one marks the
    download as started: it is not retried after that)."""
    send, recv = trio.open_memory_channel[bytes](4)
    probe = breaker.before_call()
    ok = False

    async def pump() -> None:
        try:
            async with send:
                await trio.to_thread.run_sync(body.run, send, abandon_on_cancel=True)
        finally:
            body.abort()  # a cancelled wait must not leave the thread reading

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            async with recv:
                async for data in recv:
                    on_data(len(data))
                    await sink(data)
        ok = True
    except BaseException as e:
        leaf = _sole(e)
        if isinstance(leaf, TransportError) and not isinstance(leaf, TlsError):
            breaker.failure(probe)
        else:
            breaker.release(probe)
        if leaf is e:
            raise
        # Callers expect this layer's own exceptions, not a nursery's group of one.
        raise leaf from leaf.__cause__
    finally:
        if ok:
            breaker.success(probe)


def _sole(e: BaseException) -> BaseException:
    """The one exception inside a group of one (else ``e`` itself)."""
    subs = getattr(e, "exceptions", None)
    if not isinstance(subs, tuple) or len(subs) != 1:
        return e
    return next((x for x in iter_chain(e) if getattr(x, "exceptions", None) is None), e)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__

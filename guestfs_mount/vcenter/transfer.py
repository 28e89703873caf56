"""The transfer GET: the one path that downloads a file body, in a worker thread.

Why not httpx here: under trio, TLS runs through ``ssl.MemoryBIO`` driven from Python, and
a 1 GiB body arrived at ~150 MB/s (httpx sync: ~245 MB/s, h11 bookkeeping per 64 KiB),
against ~450 MB/s for ``readinto`` on a blocking ``ssl`` socket in a thread, which also
releases the GIL while it decrypts and hashes. API calls stay on httpx (:mod:`.session`);
only the byte stream of the single-use transfer URL takes this path.

The thread hashes (SHA-256 and MD5) what it reads and stores it itself through the
caller's :class:`~guestfs_mount.model.BodyWriter` (the content cache's file): no byte
crosses to the event loop. Only "stored up to n" does, coalesced (one pending report at a
time), so readers wake as bytes arrive. Pieces are small first (16 KiB, a reader is
waiting for them) and grow up to ``CHUNK`` only while data keeps flowing - bytes never
wait more than ``FLUSH_AFTER`` in the thread for a piece to fill. Large bodies are hashed
and stored by a second thread, in step with the reads (TLS decryption in the reading
thread is the bottleneck). ``abort()`` (the download was cancelled) stops the threads.
Transfer hosts (ESXi) may close the connection after each transfer: a kept-alive
connection that turns out closed is replaced once, before any byte of the answer.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import select
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
)
from guestfs_mount.model import BodyWriter

from . import tls
from .retry import CircuitBreaker

log = logging.getLogger(__name__)

__all__ = ["BodyGet", "ConnectionPool", "fetch_body"]

FIRST_CHUNK = 16 << 10  # small first: the first reader is waiting for it
HASH_THREAD_MIN = 16 << 20
CHUNK = 1 << 20  # at most this per write (readers wake per write)
READ = 1 << 20  # one read1() call
FLUSH_AFTER = 0.02  # seconds: bytes in hand are written once this old
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
    # False when ``expected`` is only the size a stat showed earlier (REST gives no stat
    # with the URL): a different Content-Length is then the file as it is now.
    strict_length: bool = True
    # Called on the event loop once the body's length is known, before any byte.
    on_start: Callable[[int], None] | None = None
    # With strict_length False: asked (on the event loop) whether a Content-Length that
    # differs from ``expected`` is the file as the guest now stats it. A body cut or
    # padded on the way (same guest file, other length) must stay an error.
    confirm_length: Callable[[int], Awaitable[bool]] | None = None
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

    def run(self, writer: BodyWriter, report: _Reports) -> None:
        """Thread body: connect, check the answer, store the body through ``writer``."""
        reusable = False
        # A thread of its own pays off only for large bodies; small files hash inline.
        self._hasher = (
            ThreadPoolExecutor(1, thread_name_prefix="guestfs-sha256")
            if self.expected > HASH_THREAD_MIN
            else None
        )
        try:
            reusable = self._run(writer, report)
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

    def _more_ready(self, wait: float) -> bool:
        """Whether more bytes arrive within ``wait`` seconds (the rest of the batch's 20 ms),
        so batches stay large while data flows. When it would wait, the bytes in hand
        are handed over first: a reader may be waiting for them (a slow or stalled body
        must not keep what arrived in this thread)."""
        sock = getattr(self._conn, "sock", None)
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            ready, _, _ = select.select([sock], [], [], max(wait, 0.0))
        except (OSError, ValueError):
            return False
        return bool(ready)

    def _run(self, writer: BodyWriter, report: _Reports) -> bool:
        """Stream the body; True when the connection may serve another transfer."""
        resp = self._connect()
        status = resp.status
        if 300 <= status < 400:
            raise UnsafeTransferUrl(f"{self.desc}: {self.where} answered with a redirect; refused")
        if status != 200:
            raise TransferError(f"{self.desc}: {self.where} answered HTTP {status}")
        cl = resp.getheader("content-length")
        if (
            cl is not None
            and cl.strip().isdigit()
            and int(cl) != self.expected
            and not self.strict_length
            and self.confirm_length is not None
            and trio.from_thread.run(self.confirm_length, int(cl))
        ):
            self.expected = int(cl)  # the file changed since its stat: serve it as it is
        if cl is not None and (not cl.strip().isdigit() or int(cl) != self.expected):
            raise TransferError(
                f"{self.desc}: Content-Length {cl[:30]!r} differs from the expected size"
                f" {self.expected}"
            )
        enc = (resp.getheader("content-encoding") or "identity").strip().lower()
        if enc not in ("", "identity"):
            raise TransferError(f"{self.desc}: unexpected Content-Encoding {enc[:30]!r}")
        if self.on_start is not None:
            trio.from_thread.run_sync(self.on_start, self.expected)
        h = hashlib.sha256()
        m = hashlib.md5(usedforsecurity=False)

        def store(data: bytes, offset: int) -> None:
            h.update(data)
            m.update(data)
            writer.write(data, offset)
            report.stored(offset + len(data))

        n = 0
        storing: Future[None] | None = None
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
            if not pending or (
                not eof
                and pending_len < batch
                and now - last < FLUSH_AFTER
                and self._more_ready(FLUSH_AFTER - (now - last))
            ):
                continue  # more is there at once: fill the batch
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            pending_len = 0
            # Hashed and stored on another thread (hashlib and pwrite release the GIL),
            # in step with the reads: this thread's TLS decryption is the bottleneck.
            if storing is not None:
                storing.result()  # at most one piece waits to be stored
            if self._hasher is not None:
                storing = self._hasher.submit(store, data, n)
            else:
                store(data, n)
            n += len(data)
            last = time.monotonic()
            batch = min(CHUNK, batch * 4)
        if storing is not None:
            storing.result()
        if self._aborted.is_set():
            return False
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


class _Reports:
    """ "Stored up to n" from the body's threads to the event loop. A report is queued on
    the loop only when none is pending (the loop then reads the latest figure), so a fast
    body costs the loop one callback per batch of writes, not one per write."""

    def __init__(self, writer: BodyWriter, on_data: Callable[[int], None]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._writer = writer
        self._on_data = on_data
        self._lock = threading.Lock()
        self._latest = 0  # guarded by _lock
        self._queued = False  # guarded by _lock
        self._told = 0  # event loop only
        self._closed = False  # event loop only

    def stored(self, nbytes: int) -> None:
        """From a worker thread: bytes [0, nbytes) are stored."""
        with self._lock:
            self._latest = nbytes
            if self._queued:
                return
            self._queued = True
        try:
            self._token.run_sync_soon(self.deliver)
        except trio.RunFinishedError:
            pass  # the loop is gone: nobody waits for these bytes

    def deliver(self) -> None:
        """On the event loop: pass the latest figure on (never raises: a run_sync_soon
        callback that raises would crash the trio run)."""
        with self._lock:
            n = self._latest
            self._queued = False
        if self._closed or n <= self._told:
            return
        delta, self._told = n - self._told, n
        try:
            self._on_data(delta)
            self._writer.stored(n)
        except Exception:
            log.exception("progress report of a download failed")

    def close(self) -> None:
        """On the event loop, once the threads are done with this download (or abandoned):
        pass on what they stored; a report from an abandoned thread is dropped."""
        self.deliver()
        self._closed = True


async def fetch_body(
    body: BodyGet,
    writer: BodyWriter,
    breaker: CircuitBreaker,
    on_data: Callable[[int], None],
) -> None:
    """Run ``body`` in a worker thread that stores what it reads through ``writer``;
    ``on_data`` is told on the event loop how many more bytes were stored, before
    ``writer.stored`` (the first call marks the download as started: it is not retried
    after that). Everything stored is reported before this returns or raises."""
    probe = breaker.before_call()
    report = _Reports(writer, on_data)
    ok = False
    try:
        try:
            await trio.to_thread.run_sync(body.run, writer, report, abandon_on_cancel=True)
        finally:
            body.abort()  # a cancelled wait must not leave the thread reading
            report.close()
        ok = True
    except BaseException as e:
        if isinstance(e, TransportError) and not isinstance(e, TlsError):
            breaker.failure(probe)
        else:
            breaker.release(probe)
        raise
    finally:
        if ok:
            breaker.success(probe)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__

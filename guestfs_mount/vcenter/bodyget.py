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
from dataclasses import dataclass, field

import trio

from guestfs_mount.errors import RemoteTimeout, TlsError, TransferError, TransportError

from . import tls

CHUNK = 1 << 20


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
    nbytes: int = 0
    digest: str = ""
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
        try:
            self._run(send)
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _connect(self) -> http.client.HTTPResponse:
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, context=self.context, timeout=self.connect_timeout
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        self._conn = conn
        try:
            conn.request(
                "GET", self.target, headers={"Accept-Encoding": "identity", "Connection": "close"}
            )
            conn.sock.settimeout(self.stall_timeout)
            return conn.getresponse()
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

    def _run(self, send: trio.MemorySendChannel[bytes]) -> None:
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
        # One byte more than expected: a body that runs long is caught at once.
        limit = self.expected + 1
        n = 0
        while not self._aborted.is_set():
            buf = bytearray(min(CHUNK, limit - n) or 1)
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
                    return
                raise TransferError(
                    f"{self.desc}: connection broke after {n + filled} of {self.expected}"
                    f" bytes: {_reason(e)}"
                ) from e
            n += filled
            if n > self.expected:
                raise TransferError(f"{self.desc}: more than the expected {self.expected} bytes")
            if filled:
                data = bytes(view[:filled])
                h.update(data)  # releases the GIL: hashing overlaps the event loop's work
                try:
                    trio.from_thread.run(send.send, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
                    return  # the download was cancelled
            if filled < len(buf):
                break
        if self._aborted.is_set():
            return
        if n != self.expected:
            raise TransferError(
                f"{self.desc}: got {n} of {self.expected} bytes (transfer cut short)"
            )
        self.nbytes = n
        self.digest = h.hexdigest()


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__

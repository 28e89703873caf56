"""The one body download path (vcenter/transfer.py) and the API reply caps, against a
real local HTTP server: the worker thread reads a blocking socket exactly as in production,
and writes the content cache's file itself (the cache tests at the end).
The API side of the download tests is the in-memory FakeVCenter (httpx.MockTransport)."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from guestfs_mount.cache import ContentCache, ContentKey, Sink, TransferEvent
from guestfs_mount.errors import (
    CacheError,
    ProtocolError,
    TransferError,
    UnsafeTransferUrl,
    to_errno,
)
from guestfs_mount.model import TransferResult
from guestfs_mount.vcenter import VCenterClient
from tests.fake_vcenter import FakeVCenter, assert_no_secrets, config, err, stat_body
from tests.hostile_server import RawServer, json_route, send
from tests.memory_writer import MemoryWriter


@pytest.fixture
def server() -> Iterator[RawServer]:
    with RawServer() as s:
        yield s


def client_for(srv: RawServer, fake: FakeVCenter, **kw: Any) -> VCenterClient:
    """API calls in memory; transfer URLs on ``srv`` (plain http, its port named)."""
    fake.transfer_scheme = "http"
    fake.transfer_host = srv.netloc
    cfg = config(allow_http=True, esx_hosts=(srv.netloc,), api="rest", **kw)
    return VCenterClient(cfg, transport=fake.transport())


async def collect(c: VCenterClient, path: str, size: int) -> tuple[MemoryWriter, Any]:
    w = MemoryWriter()
    res = await c.download("vm-42", path, size, w)
    return w, res


def body_route(data: bytes, **kw: Any) -> Any:
    return lambda h: send(h, 200, data, **kw)


async def test_download_ok_hashes_and_first_write_small(server: RawServer) -> None:
    fake = FakeVCenter()
    data = bytes(range(256)) * (4096 * 3 + 7)  # ~3 MiB
    fake.contents["/big"] = b""
    server.routes["/guestFile"] = body_route(data, length=False)  # delimited by close
    async with client_for(server, fake) as c:
        w, res = await collect(c, "/big", len(data))
        assert w.data == data
        assert w.writes[0] <= 16 << 10  # a reader waits for the first bytes
        assert w.loop_thread not in w.writer_threads  # the body thread writes, not the loop
        assert w.reported == sorted(set(w.reported)) and w.reported[-1] == len(data)
        assert res.nbytes == len(data)
        assert res.sha256 == hashlib.sha256(data).hexdigest()
        assert res.md5 == hashlib.md5(data).hexdigest()
        assert res.stat is None  # REST reports no attributes with the URL
        assert c.stats.bytes_downloaded == len(data)
    sent = server.headers["/guestFile"]
    assert sent["accept-encoding"] == "identity"
    assert "vmware-api-session-id" not in sent


async def test_slow_body_handed_over_as_it_arrives(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/slow"] = b""
    data = b"s" * (64 << 10)
    # 8 KiB every 0.1 s: no write may wait for 1 MiB (or even 16 KiB) to fill, and the
    # loop hears of each (readers wake as bytes arrive).
    server.routes["/guestFile"] = body_route(data, chunk=8 << 10, pause=0.1)
    async with client_for(server, fake) as c:
        w, _ = await collect(c, "/slow", len(data))
    assert w.data == data
    assert len(w.writes) >= 4 and len(w.reported) >= 4


@pytest.mark.parametrize("actual", [5, 15])
async def test_download_size_mismatch(server: RawServer, actual: int) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = body_route(b"z" * actual, length=False)
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="bytes") as ei:
            await collect(c, "/f", 10)
    assert_no_secrets(str(ei.value))


async def test_download_content_length_differs_from_stat_size(server: RawServer) -> None:
    # REST gives no stat with the URL: a Content-Length other than the size stat'ed
    # earlier is the file as it is now (issue 10 item 1), announced before any byte.
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    fake.stats["/f"] = stat_body("FILE", 5)  # the guest now stats it at 5 bytes
    server.routes["/guestFile"] = body_route(b"z" * 5)
    started: list[tuple[int, object]] = []

    class Checked(MemoryWriter):
        def write(self, data: bytes, offset: int) -> None:
            assert started, "on_start must come before the first byte"
            super().write(data, offset)

    w = Checked()
    async with client_for(server, fake) as c:
        res = await c.download("vm-42", "/f", 10, w, lambda n, st: started.append((n, st)))
    assert [n for n, _ in started] == [5] and w.data == b"z" * 5 and res.nbytes == 5
    assert res.stat is not None and res.stat.size == 5  # the re-stat that confirmed it


async def test_download_content_length_not_confirmed_by_a_stat_is_an_error(
    server: RawServer,
) -> None:
    # The guest still stats the file at 10 bytes: a 5-byte body is damaged, never served.
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    fake.stats["/f"] = stat_body("FILE", 10)
    server.routes["/guestFile"] = body_route(b"z" * 5)
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="differs from the expected size"):
            await collect(c, "/f", 10)


async def test_download_content_length_invalid(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = body_route(b"z" * 5, headers={"Content-Length": "5x"})
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError):
            await collect(c, "/f", 5)


async def test_download_content_encoding_refused(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    packed = gzip.compress(b"a" * 1000)
    server.routes["/guestFile"] = body_route(packed, headers={"Content-Encoding": "gzip"})
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="Content-Encoding"):
            await collect(c, "/f", len(packed))


async def test_download_long_body_stops_early(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    written = [0]

    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            while written[0] < 10_000:
                h.wfile.write(b"a" * 65536)
                written[0] += 1
        except OSError:
            pass
        h.close_connection = True

    server.routes["/guestFile"] = endless
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="more than"):
            await collect(c, "/f", 100_000)
    assert written[0] < 10_000  # the client hung up; it did not read an endless body


async def test_download_redirect_is_eacces_and_status(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = lambda h: send(h, 302, headers={"Location": "https://evil/x"})
    async with client_for(server, fake) as c:
        with pytest.raises(UnsafeTransferUrl, match="redirect") as ei:
            await collect(c, "/f", 1)
    assert to_errno(ei.value) == errno.EACCES  # as docs/usage.md promises
    assert server.hits["/guestFile"] == 1
    server.routes["/guestFile"] = lambda h: send(h, 404, b"gone")
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="HTTP 404"):
            await collect(c, "/f", 1)


async def test_download_stall(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    release = threading.Event()

    def stall(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "20")
        h.end_headers()
        h.wfile.write(b"a" * 10)
        h.wfile.flush()
        release.wait(10)

    server.routes["/guestFile"] = stall
    try:
        async with client_for(server, fake, transfer_stall_timeout=0.5) as c:
            with pytest.raises(TransferError, match="no data for"):
                await collect(c, "/f", 20)
    finally:
        release.set()


async def test_broken_connection_not_retried_after_first_byte(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""

    def cut(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(3 << 20))
        h.end_headers()
        h.wfile.write(b"a" * (2 << 20))
        h.close_connection = True

    server.routes["/guestFile"] = cut
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="cut short|connection broke"):
            await collect(c, "/f", 3 << 20)
    assert server.hits["/guestFile"] == 1


async def test_retried_before_first_byte(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    n = [0]

    async def busy(req: httpx.Request) -> httpx.Response | None:
        n[0] += 1
        return err(500, "RESOURCE_BUSY", "busy") if n[0] <= 2 else None

    fake.hooks["transfer.create"] = busy
    server.routes["/guestFile"] = body_route(b"hello")
    async with client_for(server, fake, backoff_start=0.01, backoff_cap=0.02) as c:
        w, _ = await collect(c, "/f", 5)
        assert w.data == b"hello"
        assert c.stats.retries == 2


@pytest.mark.parametrize("mode", ["keep-alive", "close-header", "silent-close"])
async def test_host_closing_connections(server: RawServer, mode: str) -> None:
    """ESXi closes the connection after each transfer, with or without saying so."""
    fake = FakeVCenter()
    fake.contents["/f"] = b""

    def route(h: BaseHTTPRequestHandler) -> None:
        send(h, 200, b"0123456789", close=mode == "close-header")
        if mode == "silent-close":
            h.close_connection = True  # no Connection: close, the socket just ends

    server.routes["/guestFile"] = route
    async with client_for(server, fake) as c:
        for _ in range(3):
            w, _res = await collect(c, "/f", 10)
            assert w.data == b"0123456789"
            await trio.sleep(0.05)  # let the server's close reach us before the reuse
    assert server.hits["/guestFile"] == 3  # each single-use URL fetched once
    assert server.connections == (1 if mode == "keep-alive" else 3)


async def test_download_debug_log_redacts_token(
    server: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = body_route(b"data")
    async with client_for(server, fake, debug=True) as c:
        await collect(c, "/f", 4)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"GET http://{server.netloc}/guestFile?<redacted> 200" in text
    assert_no_secrets(text)


# --- the body thread writes the content cache's file itself ---------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def cache_over(
    srv: RawServer, fake: FakeVCenter, tmp_path: Path, **kw: Any
) -> AsyncIterator[tuple[ContentCache, VCenterClient]]:
    """A content cache whose fetch is the client's download from ``srv``: the path a
    mount's cache takes, without FUSE."""
    async with client_for(srv, fake) as c, trio.open_nursery() as nursery:

        async def fetch(path: str, size: int, writer: Sink, on_start: Any) -> TransferResult:
            return await c.download("vm-42", path, size, writer, on_start)

        cache = ContentCache(str(tmp_path / "cache"), 64 << 20, fetch, nursery=nursery, **kw)
        try:
            yield cache, c
        finally:
            await cache.aclose()


async def test_cache_readers_get_bytes_while_the_body_arrives(
    server: RawServer, tmp_path: Path
) -> None:
    fake = FakeVCenter()
    data = os.urandom(3 << 20)
    fake.contents["/f"] = b""
    rest = threading.Event()

    def held(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: 100 << 10])  # less than one write's full size
        h.wfile.flush()
        rest.wait(10)
        h.wfile.write(data[100 << 10 :])

    server.routes["/guestFile"] = held
    key = ContentKey("/f", len(data), 1)
    try:
        async with cache_over(server, fake, tmp_path) as (cache, c):
            h = await cache.open(key)
            with trio.fail_after(5):
                # Served from the cache file while the server still holds the rest.
                assert await cache.read(h, 0, 64 << 10) == data[: 64 << 10]
                assert await cache.read(h, 90 << 10, 10 << 10) == data[90 << 10 : 100 << 10]
            assert cache.sha256(key) is None
            rest.set()
            with trio.fail_after(10):
                assert await cache.read(h, len(data) - 10, 100) == data[-10:]
            assert cache.sha256(key) == hashlib.sha256(data).hexdigest()
            assert cache.stats["bytes_downloaded"] == len(data) == c.stats.bytes_downloaded
            cache.release(h)
    finally:
        rest.set()


async def test_cache_disk_full_is_enospc_not_retried(server: RawServer, tmp_path: Path) -> None:
    fake = FakeVCenter()
    data = os.urandom(2 << 20)
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = body_route(data)

    def pwrite(fd: int, buf: bytes | memoryview, off: int) -> int:
        if off + len(buf) > 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, buf, off)

    events: list[TransferEvent] = []
    key = ContentKey("/f", len(data), 1)
    async with cache_over(server, fake, tmp_path, pwrite=pwrite, on_transfer_end=events.append) as (
        cache,
        _,
    ):
        h = await cache.open(key)
        with trio.fail_after(10), pytest.raises(CacheError) as ei:
            await cache.read(h, 0, len(data))
        cache.release(h)
    assert ei.value.errno == errno.ENOSPC and to_errno(ei.value) == errno.ENOSPC
    assert isinstance(events[-1].error, CacheError)
    assert server.hits["/guestFile"] == 1  # a full disk is not a reason to fetch again


async def test_cache_longer_body_than_announced_stops_early(
    server: RawServer, tmp_path: Path
) -> None:
    # No Content-Length: only the cache's writer and the thread's count bound the body.
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = body_route(b"x" * (3 << 20), length=False)
    key = ContentKey("/f", 1 << 20, 1)
    async with cache_over(server, fake, tmp_path) as (cache, _):
        h = await cache.open(key)
        with trio.fail_after(10), pytest.raises(TransferError, match="more than|longer than"):
            await cache.read(h, (1 << 20) - 1, 1)
        cache.release(h)
        assert cache.usage == 0


async def test_cache_cancelled_download_stops_the_thread_and_frees_fds(
    server: RawServer, tmp_path: Path
) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    size = 48 << 20
    sent = [0]
    ended = threading.Event()

    def slow(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(size))
        h.end_headers()
        try:
            while sent[0] < size:
                h.wfile.write(b"y" * 65536)
                h.wfile.flush()
                sent[0] += 65536
                time.sleep(0.005)
        except OSError:
            h.close_connection = True
        finally:
            ended.set()

    server.routes["/guestFile"] = slow
    before = open_fds()
    key = ContentKey("/f", size, 1)
    async with cache_over(server, fake, tmp_path) as (cache, c):
        h = await cache.open(key)
        with trio.fail_after(5):
            assert await cache.read(h, 0, 4096) == b"y" * 4096
        cache.release(h)  # large and unread: cancelled at once
        with trio.fail_after(10):
            while not ended.is_set():
                await trio.sleep(0.01)
        assert cache.stats["cancelled"] == 1
        assert c.stats.bytes_downloaded < size
    assert sent[0] < size  # the client hung up
    with trio.fail_after(5):
        while open_fds() > before:  # cache file, its writer's duplicate, the socket
            await trio.sleep(0.01)
    assert os.listdir(tmp_path) == []


# --- caps on API replies (issue 10 item 4) -------------------------------------------------


def vcenter_on(srv: RawServer, **kw: Any) -> VCenterClient:
    srv.routes["/api/session"] = json_route(201, "tok")
    return VCenterClient(config(server=srv.url, allow_http=True, api="rest", **kw))


async def test_api_gzip_bomb_refused(server: RawServer) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    server.routes["/api/vcenter/vm"] = lambda h: send(
        h, 200, bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    async with vcenter_on(server) as c:
        with pytest.raises(ProtocolError, match="Content-Encoding 'gzip'; refused"):
            await c.find_vm("web")
    assert server.headers["/api/vcenter/vm"]["accept-encoding"] == "identity"


async def test_api_huge_declared_body_refused(server: RawServer) -> None:
    def huge(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(2 << 30))
        h.end_headers()
        h.wfile.write(b"[" + b" " * 65536)

    server.routes["/api/vcenter/vm"] = huge
    async with vcenter_on(server) as c:
        with pytest.raises(ProtocolError, match="larger than"):
            await c.find_vm("web")


async def test_api_endless_body_cut_at_cap(server: RawServer) -> None:
    written = [0]

    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            while written[0] < 4096:  # 256 MiB if nobody hung up
                h.wfile.write(b" " * 65536)
                written[0] += 1
        except OSError:
            pass

    server.routes["/api/vcenter/vm"] = endless
    async with vcenter_on(server, max_reply=1 << 20) as c:
        with pytest.raises(ProtocolError, match="larger than 1048576 bytes"):
            await c.find_vm("web")
    assert written[0] < 4096

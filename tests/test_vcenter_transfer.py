"""The one body download path (vcenter/transfer.py) and the API reply caps, against a
real local HTTP server: the worker thread reads a blocking socket exactly as in production.
The API side of the download tests is the in-memory FakeVCenter (httpx.MockTransport)."""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
import trio

from guestfs_mount.errors import ProtocolError, TransferError, UnsafeTransferUrl, to_errno
from guestfs_mount.vcenter import VCenterClient
from tests.fake_vcenter import FakeVCenter, assert_no_secrets, config, err
from tests.hostile_server import RawServer, json_route, send


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


async def collect(c: VCenterClient, path: str, size: int) -> tuple[list[bytes], Any]:
    chunks: list[bytes] = []

    async def sink(b: bytes) -> None:
        chunks.append(b)

    res = await c.download("vm-42", path, size, sink)
    return chunks, res


def body_route(data: bytes, **kw: Any) -> Any:
    return lambda h: send(h, 200, data, **kw)


async def test_download_ok_hashes_and_first_hand_over_small(server: RawServer) -> None:
    fake = FakeVCenter()
    data = bytes(range(256)) * (4096 * 3 + 7)  # ~3 MiB
    fake.contents["/big"] = b""
    server.routes["/guestFile"] = body_route(data, length=False)  # delimited by close
    async with client_for(server, fake) as c:
        chunks, res = await collect(c, "/big", len(data))
        assert b"".join(chunks) == data
        assert len(chunks[0]) <= 16 << 10  # a reader waits for the first bytes
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
    got_first = threading.Event()
    # 8 KiB every 0.1 s: no batch may wait for 4 MiB (or even 16 KiB) to fill.
    server.routes["/guestFile"] = body_route(data, chunk=8 << 10, pause=0.1)
    async with client_for(server, fake) as c:
        chunks: list[bytes] = []

        async def sink(b: bytes) -> None:
            chunks.append(b)
            got_first.set()

        await c.download("vm-42", "/slow", len(data), sink)
    assert b"".join(chunks) == data
    assert len(chunks) >= 4


@pytest.mark.parametrize("actual", [5, 15])
async def test_download_size_mismatch(server: RawServer, actual: int) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = body_route(b"z" * actual, length=False)
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="bytes") as ei:
            await collect(c, "/f", 10)
    assert_no_secrets(str(ei.value))


async def test_download_content_length_mismatch(server: RawServer) -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b""
    server.routes["/guestFile"] = body_route(b"z" * 5)
    async with client_for(server, fake) as c:
        with pytest.raises(TransferError, match="Content-Length"):
            await collect(c, "/f", 10)


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
        chunks, _ = await collect(c, "/f", 5)
        assert b"".join(chunks) == b"hello"
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
            chunks, _res = await collect(c, "/f", 10)
            assert b"".join(chunks) == b"0123456789"
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

"""TLS verification, CA files, SHA-256 pinning and error messages against a real local TLS
server (trustme certificates + hypercorn under trio)."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPResponseStartEvent, Scope

from guestfs_mount.errors import ConfigError, TlsError
from guestfs_mount.vcenter import VCenterClient
from guestfs_mount.vcenter.tls import normalize_thumbprint, split_pin_key

from .fake_vcenter import assert_no_secrets, config


async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/api/session" and scope["method"] == "POST":
        status, body = 201, b'"tok-123"'
    elif scope["path"] == "/api/vcenter/vm":
        status, body = 200, b'[{"vm":"vm-1","name":"web","power_state":"POWERED_ON"}]'
    else:
        status, body = 204, b""
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json")],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass
class TlsServer:
    port: int
    ca_file: str
    sha256: str


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[TlsServer]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.certfile = cfg.keyfile = str(tmp_path / "server.pem")
    cfg.loglevel = "WARNING"
    cfg.accesslog = None
    done = trio.Event()
    async with trio.open_nursery() as n:
        binds = await n.start(
            lambda task_status: serve(
                app, cfg, shutdown_trigger=done.wait, task_status=task_status
            )
        )
        port = int(binds[0].rsplit(":", 1)[1])
        yield TlsServer(port, str(tmp_path / "ca.pem"), hashlib.sha256(der).hexdigest())
        done.set()


async def _vm(srv: TlsServer, host: str = "127.0.0.1", **kw: Any) -> str:
    async with VCenterClient(config(server=f"{host}:{srv.port}", retry_budget=0, **kw)) as c:
        return (await c.find_vm("web")).vm


async def test_ca_file_verifies(tls_server: TlsServer) -> None:
    assert await _vm(tls_server, ca_file=tls_server.ca_file) == "vm-1"


async def test_untrusted_certificate_message(tls_server: TlsServer) -> None:
    with pytest.raises(TlsError) as ei:
        await _vm(tls_server)
    msg = str(ei.value)
    assert msg.startswith(f"TLS certificate of 127.0.0.1:{tls_server.port} not trusted: ")
    assert "certificate verify failed" in msg and "(use --ca-file or --thumbprint)" in msg
    assert ei.value.__cause__ is not None
    assert_no_secrets(msg)


async def test_hostname_mismatch(tls_server: TlsServer) -> None:
    with pytest.raises(TlsError, match="mismatch"):
        await _vm(tls_server, host="localhost", ca_file=tls_server.ca_file)


async def test_pin_only_mode(tls_server: TlsServer) -> None:
    colon = ":".join(tls_server.sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    pins = {f"127.0.0.1:{tls_server.port}": colon}
    assert await _vm(tls_server, thumbprints=pins) == "vm-1"
    assert await _vm(tls_server, thumbprints={"127.0.0.1": tls_server.sha256}) == "vm-1"


async def test_wrong_pin_rejected_even_with_ca(tls_server: TlsServer) -> None:
    with pytest.raises(TlsError, match="does not match the pinned thumbprint"):
        await _vm(
            tls_server,
            ca_file=tls_server.ca_file,
            thumbprints={f"127.0.0.1:{tls_server.port}": "00" * 32},
        )


async def test_pin_for_other_port_does_not_apply(tls_server: TlsServer) -> None:
    with pytest.raises(TlsError, match="verify failed"):
        await _vm(tls_server, thumbprints={"127.0.0.1:1": tls_server.sha256})


async def test_insecure(tls_server: TlsServer, caplog: pytest.LogCaptureFixture) -> None:
    assert await _vm(tls_server, insecure=True) == "vm-1"
    assert any("verification is disabled" in r.getMessage() for r in caplog.records)


def test_thumbprint_and_key_parsing() -> None:
    assert normalize_thumbprint("AB:" * 31 + "AB") == "ab" * 32
    with pytest.raises(ConfigError):
        normalize_thumbprint("abc")
    assert split_pin_key("Host:8443") == ("host", 8443)
    assert split_pin_key("[::1]:443") == ("::1", 443)
    assert split_pin_key("esx1") == ("esx1", None)
    with pytest.raises(ConfigError):
        split_pin_key("h:0")


def test_bad_server_address() -> None:
    for bad in ("", "http://vc", "ftp://vc", "https://u:p@vc", "https://vc/path", "vc:99999"):
        with pytest.raises(ConfigError):
            VCenterClient(config(server=bad))
    VCenterClient(config(server="http://vc:8080", allow_http=True))


async def test_bad_ca_file(tmp_path: Path) -> None:
    c = VCenterClient(config(server="127.0.0.1:1", ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="CA file"):
        async with c:
            pass

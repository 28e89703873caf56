"""A hostile vCenter double over real (plain) HTTP, for end-to-end tests of the mount.

It serves a :class:`tests.fake_vcenter.FakeVCenter` (the scriptable in-memory
vCenter of the client's unit tests) through a ThreadingHTTPServer in a thread, so that
``guestfs-mount http://127.0.0.1:PORT ...`` can mount crafted listings, stats, symlink
targets and transfer URLs. Each request runs ``fake.handle`` in its own ``trio.run``.
"""

from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import trio

from tests.fake_vcenter import FakeVCenter, stat_body

__all__ = ["HostileVCenter", "stat_body"]


class HostileVCenter:
    def __init__(self, fake: FakeVCenter | None = None) -> None:
        self.fake = fake or FakeVCenter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                req = httpx.Request(
                    self.command, outer.url + self.path,
                    headers=[(k, v) for k, v in self.headers.items() if k.lower() != "host"],
                    content=body,
                )  # fmt: skip

                async def run() -> tuple[httpx.Response, bytes]:
                    resp = await outer.fake.handle(req)
                    return resp, await resp.aread()

                resp, data = trio.run(run)
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.fake.transfer_host = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

        async def http_transfer(req: httpx.Request) -> httpx.Response | None:
            import json

            body = json.loads(req.content)
            path = body["spec"]["path"]
            if path not in self.fake.contents:
                return None
            q = urllib.parse.urlencode({"id": path, "token": "UrLtOkEnXyZ"})
            return httpx.Response(201, json=f"http://{self.fake.transfer_host}/guestFile?{q}")

        self.fake.hooks.setdefault("transfer.create", http_transfer)

    def __enter__(self) -> HostileVCenter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # what guestfs_mount.testing.mount_argv / mount_env need
    @property
    def vcenter_url(self) -> str:
        return self.url

    ca_file = None
    esx_ca_file = None
    user = "admin@vsphere.local"

    @property
    def password(self) -> str:
        return self.fake.password

    guest_user = "root"

    @property
    def guest_password(self) -> str:
        return self.fake.guest_password

    @property
    def vms(self) -> list[dict[str, Any]]:
        return [{"name": v["name"], "vm": v["vm"]} for v in self.fake.vms]


def symlink_stat(target: str) -> dict[str, Any]:
    b = stat_body("SYMLINK", len(target))
    b["attributes"]["symlink_target"] = target
    return b

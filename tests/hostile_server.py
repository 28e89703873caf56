"""Hostile servers over real (plain) HTTP: a vCenter double for end-to-end tests of the
mount, and :class:`RawServer` for byte-exact answers (transfer bodies, API reply caps).

It serves a :class:`tests.fake_vcenter.FakeVCenter` (the scriptable in-memory
vCenter of the client's unit tests) through a ThreadingHTTPServer in a thread, so that
``guestfs-mount http://127.0.0.1:PORT ...`` can mount crafted listings, stats, symlink
targets and transfer URLs. Each request runs ``fake.handle`` in its own ``trio.run``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import httpx
import trio

from tests.fake_vcenter import FakeVCenter, stat_body

__all__ = [
    "FakeServer",
    "HostileVCenter",
    "RawServer",
    "WideVCenter",
    "json_route",
    "send",
    "stat_body",
]


_S = TypeVar("_S", bound="FakeServer")


class FakeServer:
    """Serves an in-memory fake over real HTTP: ``handle`` turns an httpx request into the
    fake's answer, in its own ``trio.run`` per request, on a ThreadingHTTPServer thread.
    Gives what ``guestfs_mount.testing.mount_argv`` / ``mount_env`` need but the VMs,
    which subclasses list from their fake."""

    ca_file = None
    esx_ca_file = None
    user = "admin@vsphere.local"
    guest_user = "root"
    fake: Any  # the fake served: its password and guest_password are the ones to use

    def __init__(self, handle: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> None:
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
                    resp = await handle(req)
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
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self: _S) -> _S:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def vcenter_url(self) -> str:
        return self.url

    @property
    def password(self) -> str:
        return str(self.fake.password)

    @property
    def guest_password(self) -> str:
        return str(self.fake.guest_password)


class HostileVCenter(FakeServer):
    def __init__(self, fake: FakeVCenter | None = None) -> None:
        self.fake = fake or FakeVCenter()
        super().__init__(self.fake.handle)
        self.fake.transfer_host = f"127.0.0.1:{self.server.server_address[1]}"

        async def http_transfer(req: httpx.Request) -> httpx.Response | None:
            body = json.loads(req.content)
            path = body["spec"]["path"]
            if path not in self.fake.contents:
                return None
            q = urllib.parse.urlencode({"id": path, "token": "UrLtOkEnXyZ"})
            return httpx.Response(201, json=f"http://{self.fake.transfer_host}/guestFile?{q}")

        self.fake.hooks.setdefault("transfer.create", http_transfer)

    @property
    def vms(self) -> list[dict[str, Any]]:
        return [{"name": v["name"], "vm": v["vm"]} for v in self.fake.vms]


class WideVCenter(HostileVCenter):
    """``dirs`` directories ``/wide0``.. of ``files`` files each (32 x 200k by default, as
    in issue 10 item 5), made up page by page so that nothing that size is held; counts
    the list pages served per directory in ``pages``."""

    def __init__(self, dirs: int = 32, files: int = 200_000) -> None:
        super().__init__()
        self.dirs, self.files = dirs, files
        self.pages: dict[str, int] = {}
        self._lock = threading.Lock()
        f = self.fake
        f.stats["/"] = stat_body("DIRECTORY", 4096)
        f.files["/"] = [
            {"filename": f"wide{i}", "type": "DIRECTORY", "size": 4096} for i in range(dirs)
        ]
        f.hooks["files.list"] = self._list
        f.hooks["files.get"] = self._stat

    def _wide(self, path: str) -> bool:
        name = path[1:]
        return name.startswith("wide") and name[4:].isdigit() and int(name[4:]) < self.dirs

    def _authorized(self, req: httpx.Request) -> bool:
        return req.headers.get("vmware-api-session-id") in self.fake.tokens

    async def _list(self, req: httpx.Request) -> httpx.Response | None:
        path = json.loads(req.content)["path"]
        if not self._authorized(req) or not self._wide(path):
            return None  # the fake's own answer (401, the root)
        it = json.loads(req.content).get("iteration", {})
        start, size = int(it.get("index", 0)), int(it.get("size", 50))
        stop = min(start + size, self.files)
        with self._lock:
            self.pages[path] = self.pages.get(path, 0) + 1
        page = [{"filename": f"f{j:06d}", "type": "FILE", "size": 1} for j in range(start, stop)]
        status = "END_OF_DATA" if stop >= self.files else "READY"
        return httpx.Response(200, json={"files": page, "total": self.files, "status": status})

    async def _stat(self, req: httpx.Request) -> httpx.Response | None:
        enc = req.url.raw_path.decode().split("/files/", 1)[1].split("?")[0]
        path = urllib.parse.unquote(enc)
        parent, _, name = path.rpartition("/")
        if not self._authorized(req):
            return None
        if self._wide(path):
            return httpx.Response(200, json=stat_body("DIRECTORY", 4096))
        if self._wide(parent) and name.startswith("f") and name[1:].isdigit():
            return httpx.Response(200, json=stat_body("FILE", 1))
        return None

    def pages_served(self) -> int:
        with self._lock:
            return sum(self.pages.values())


def symlink_stat(target: str) -> dict[str, Any]:
    b = stat_body("SYMLINK", len(target))
    b["attributes"]["symlink_target"] = target
    return b


# --- a raw HTTP server: every byte of the answer under the test's control ------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class RawServer:
    """A real local HTTP server (a thread) whose answers tests write byte by byte: for the
    transfer-body path (the client's worker thread reads it with a blocking socket, as in
    production) and for the caps on API replies. ``routes`` maps a path (no query) to a
    function that writes the whole answer to ``handler.wfile``; ``hits`` counts requests
    per path, ``headers`` keeps the last request's headers per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.connections = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                self.body = self.rfile.read(n) if n else b""
                path = self.path.split("?", 1)[0]
                outer.hits[path] = outer.hits.get(path, 0) + 1
                outer.headers[path] = {k.lower(): v for k, v in self.headers.items()}
                route = outer.routes.get(path)
                if route is None:
                    send(self, 404, b"no such route")
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.netloc = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.netloc}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(
    h: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    length: bool = True,
    close: bool = False,
    chunk: int = 65536,
    pause: float = 0.0,
) -> None:
    """Answer ``status`` with ``body`` in ``chunk``-sized writes, ``pause`` seconds apart;
    without ``length`` the body is delimited by closing the connection."""
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if length:
        h.send_header("Content-Length", str(len(body)))
    if close or not length:
        h.send_header("Connection", "close")
        h.close_connection = True
    h.end_headers()
    for i in range(0, len(body), chunk):
        h.wfile.write(body[i : i + chunk])
        h.wfile.flush()
        if pause:
            time.sleep(pause)


def json_route(status: int, value: Any, headers: dict[str, str] | None = None) -> Route:
    data = json.dumps(value).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return lambda h: send(h, status, data, headers=hdrs)

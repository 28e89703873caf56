"""A scriptable in-memory vCenter + ESX for httpx.MockTransport tests of VCenterClient."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from guestfs_mount.model import CredentialType, GuestCredentials
from guestfs_mount.vcenter import ClientConfig, VCenterClient

VC_PASSWORD = "vc-Secret-Pa55"
GUEST_PASSWORD = "gu3st-Secret-Pw"
TOKEN_PREFIX = "SeSsIoNtOkEn"
URL_TOKEN = "UrLtOkEnXyZ"
SECRETS = (VC_PASSWORD, GUEST_PASSWORD, TOKEN_PREFIX, URL_TOKEN)


def err(status: int, error_type: str, message: str = "oops", **data: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "error_type": error_type,
        "messages": [{"id": "x.y", "default_message": message, "args": []}],
    }
    if data:
        body["data"] = data
    return httpx.Response(status, json=body)


def stat_body(ftype: str = "FILE", size: int = 10) -> dict[str, Any]:
    return {
        "type": ftype,
        "size": size,
        "attributes": {
            "last_modified": "2024-01-02T03:04:05.5Z",
            "last_accessed": "2024-01-02T03:04:05+01:00",
            "filesystem_family": "POSIX",
            "posix_attributes": {"owner": 0, "group": 0, "permissions": "0644"},
        },
    }


class _Stream(httpx.AsyncByteStream):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk


Handler = Callable[[httpx.Request], Awaitable[httpx.Response | None]]


@dataclass
class FakeVCenter:
    """Default behaviour of a healthy vCenter; override with ``hooks[name]``."""

    password: str = VC_PASSWORD
    guest_password: str = GUEST_PASSWORD
    files: dict[str, list[Any]] = field(default_factory=dict)  # entries, hostile ones too
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    vms: list[dict[str, Any]] = field(
        default_factory=lambda: [{"vm": "vm-42", "name": "web", "power_state": "POWERED_ON"}]
    )
    released: bool = True
    transfer_host: str = "*"
    transfer_scheme: str = "https"
    tokens: set[str] = field(default_factory=set)
    n_logins: int = 0
    requests: list[httpx.Request] = field(default_factory=list)
    hooks: dict[str, Handler] = field(default_factory=dict)
    login_delay: float = 0.0
    content_length: bool = True

    def expire_sessions(self) -> None:
        self.tokens.clear()

    def transport(self) -> httpx.MockTransport:
        async def streamed(req: httpx.Request) -> httpx.Response:
            # As from a network transport: the body is a stream, read by the client.
            resp = await self.handle(req)
            return httpx.Response(resp.status_code, headers=resp.headers, stream=_Stream(resp.stream))

        return httpx.MockTransport(streamed)

    def op(self, req: httpx.Request) -> str:
        p = req.url.raw_path.decode().split("?")[0]
        action = req.url.params.get("action")
        if p == "/api/session":
            return "session." + req.method.lower()
        if p.startswith("/guestFile"):
            return "esx.get"
        if p == "/api/vcenter/vm":
            return "vm.list"
        rest = p.split("/")[5:]  # after /api/vcenter/vm/{vm}
        if rest == ["power"]:
            return "vm.power"
        if rest == ["guest", "operations"]:
            return "vm.guest.operations"
        if rest == ["tools"]:
            return "vm.tools"
        if rest == ["guest", "filesystem"]:
            return "transfer.create" if req.method == "POST" else "transfer.preview"
        if rest[:3] == ["guest", "filesystem", "files"]:
            return f"files.{action}"
        return "unknown"

    async def handle(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        name = self.op(req)
        hook = self.hooks.get(name)
        if hook is not None:
            r = await hook(req)
            if r is not None:
                return r
        if name == "session.post":
            return await self.login(req)
        if name == "esx.get":
            return self.esx_get(req)
        if name == "session.delete":
            return httpx.Response(204)
        if req.headers.get("vmware-api-session-id") not in self.tokens:
            return err(401, "UNAUTHENTICATED", "session expired")
        if name == "session.get":
            return httpx.Response(200, json={"user": "u", "created_time": "2024-01-01T00:00:00Z",
                                             "last_accessed_time": "2024-01-01T00:00:00Z"})
        body = json.loads(req.content) if req.content else {}
        if "credentials" in body and body["credentials"].get("password") != self.guest_password:
            return err(401, "UNAUTHENTICATED", "guest auth failed")
        if name == "vm.list":
            names = req.url.params.get_list("names")
            ids = req.url.params.get_list("vms")
            out = [v for v in self.vms if (not names or v["name"] in names)]
            out = [v for v in out if (not ids or v["vm"] in ids)]
            return httpx.Response(200, json=out)
        if name == "vm.power":
            return httpx.Response(200, json={"state": "POWERED_ON"})
        if name == "vm.guest.operations":
            return httpx.Response(
                200, json={"guest_operations_ready": True, "interactive_guest_operations_ready": False}
            )
        if name == "files.list":
            entries = self.files.get(body["path"])
            if entries is None:
                return err(404, "NOT_FOUND", f"no such directory {body['path']}")
            it = body.get("iteration", {})
            i, n = it.get("index", 0), it.get("size", 50)
            page = entries[i : i + n]
            result = {
                "files": page,
                "total": len(entries),
                "status": "END_OF_DATA" if i + n >= len(entries) else "READY",
            }
            return httpx.Response(200, content=json.dumps(result).encode())
        if name == "files.get":
            enc = req.url.raw_path.decode().split("/files/", 1)[1].split("?")[0]
            path = os.fsdecode(urllib.parse.unquote_to_bytes(enc))
            if path not in self.stats:
                return err(404, "NOT_FOUND", f"file {path} not found")
            return httpx.Response(200, json=self.stats[path])
        if name in ("transfer.create", "transfer.preview"):
            if name == "transfer.create" and not self.released:
                return err(404, "OPERATION_NOT_FOUND", "unknown operation")
            path = body["spec"]["path"] if name == "transfer.create" else body["path"]
            if path not in self.contents:
                return err(404, "NOT_FOUND", f"file {path} not found")
            q = urllib.parse.urlencode({"id": path, "token": URL_TOKEN})
            return httpx.Response(
                201 if name == "transfer.create" else 200,
                json=f"{self.transfer_scheme}://{self.transfer_host}/guestFile?{q}",
            )
        return err(404, "OPERATION_NOT_FOUND", "unknown")

    async def login(self, req: httpx.Request) -> httpx.Response:
        if self.login_delay:
            await trio.sleep(self.login_delay)
        auth = req.headers.get("authorization", "")
        try:
            user, _, pw = base64.b64decode(auth.split()[1]).decode().partition(":")
        except Exception:
            return err(401, "UNAUTHENTICATED", "no auth")
        if pw != self.password:
            return err(401, "UNAUTHENTICATED", "Authentication required.")
        self.n_logins += 1
        tok = f"{TOKEN_PREFIX}{self.n_logins}"
        self.tokens.add(tok)
        return httpx.Response(201, json=tok)

    def esx_get(self, req: httpx.Request) -> httpx.Response:
        path = req.url.params["id"]
        data = self.contents[path]
        headers = {"content-length": str(len(data))} if self.content_length else {}

        async def body() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        return httpx.Response(200, headers=headers, content=body())


def config(**kw: Any) -> ClientConfig:
    base: dict[str, Any] = dict(
        server="vc.example.com",
        user="admin@vsphere.local",
        password=VC_PASSWORD,
        guest=GuestCredentials(
            type=CredentialType.USERNAME_PASSWORD, user_name="root", password=GUEST_PASSWORD
        ),
        retry_budget=5.0,
        call_timeout=5.0,
    )
    base.update(kw)
    return ClientConfig(**base)


def make_client(fake: FakeVCenter, **kw: Any) -> VCenterClient:
    return VCenterClient(config(**kw), transport=fake.transport())


def assert_no_secrets(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"secret {s!r} leaked: {text!r}"

"""A hostile vim25 server over real (plain) HTTP, for end-to-end tests of the VI/JSON and
SOAP transports: :class:`tests.vim_fake.FakeVim` (the in-memory vim25 fake of the
transport unit tests) served by :class:`tests.hostile_server.FakeServer`, as
:class:`~tests.hostile_server.HostileVCenter` serves the REST fake. Tests script answers per guest path with ``lists`` (a function of
the ListFilesInGuest arguments, for endless or repeated pages) and ``raw`` (a whole HTTP
answer for any call about that path: bombs, malformed bodies); file bodies come from
``fake.rest.contents`` through the ``/guestFile`` URL the transfer answer names."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import httpx

from tests.hostile_server import FakeServer
from tests.vim_fake import FakeVim, posix_file

__all__ = ["HostileVim", "RawAnswer", "posix_file"]


class RawAnswer(Exception):
    """Raised from inside the fake to send ``response`` as the whole HTTP answer."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response


class _ScriptedVim(FakeVim):
    def __init__(self, owner: HostileVim) -> None:
        super().__init__()
        self._owner = owner

    def guest(self, method: str, args: dict[str, Any]) -> Any:
        path = str(args.get("filePath") or args.get("guestFilePath") or "")
        o = self._owner
        o.calls_per_path[path] = o.calls_per_path.get(path, 0) + 1
        if path in o.raw:
            raise RawAnswer(o.raw[path]())
        if method == "ListFilesInGuest" and path in o.lists:
            self.calls.append((method, args))
            return o.lists[path](args)
        if method == "ListFilesInGuest" and args.get("matchPattern") and path in self.dirs:
            # the stat of one entry: hostile entries (a number for a name) must not trip it
            saved = self.dirs[path]
            self.dirs[path] = [
                e for e in saved if isinstance(e, dict) and isinstance(e["path"], str)
            ]
            try:
                return super().guest(method, args)
            finally:
                self.dirs[path] = saved
        result = super().guest(method, args)
        if method == "InitiateFileTransferFromGuest":
            q = urllib.parse.urlencode({"id": path, "token": "UrLtOkEnXyZ"})
            result["url"] = o.transfer_url.get(path, f"http://*/guestFile?{q}")
        return result


class HostileVim(FakeServer):
    def __init__(self, api: str) -> None:
        self.api = api  # what guestfs_mount.testing.mount_argv passes as --api
        self.fake = _ScriptedVim(self)
        self.fake.vi_json = api == "vi-json"
        self.fake.soap = api == "soap"
        self.lists: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self.raw: dict[str, Callable[[], httpx.Response]] = {}
        self.transfer_url: dict[str, str] = {}
        self.calls_per_path: dict[str, int] = {}
        transport = self.fake.transport()

        async def handle(req: httpx.Request) -> httpx.Response:
            try:
                return await transport.handle_async_request(req)
            except RawAnswer as a:
                return a.response

        super().__init__(handle)

    def add_file(self, path: str, data: bytes) -> None:
        self.fake.files[path] = len(data)
        self.fake.rest.contents[path] = data

    @property
    def vms(self) -> list[dict[str, Any]]:
        return [{"name": n, "vm": v} for n, v in self.fake.vms.items()]

"""The vCenter REST transport (``/api``, 7.0 U2+), with the 7.0 U1 "preview" transfer form.

Session: ``POST /api/session`` with Basic auth, the token in ``vmware-api-session-id``.
Listings give name, type and size only (``files?action=list``); a stat is one
``files/{path}?action=get``; a transfer URL comes from ``filesystem?action=create``, or
on 7.0 U1 from the preview form ``GET filesystem`` with a body. The two forms differ only
there, so "preview" is this transport with the other transfer form.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

from guestfs_mount.errors import (
    ApiError,
    ConfigError,
    GuestAuthFailed,
    NotAllowedInCurrentState,
    NotFound,
    ProtocolError,
    RemoteError,
    ServiceUnavailable,
    Unauthenticated,
)
from guestfs_mount.model import GuestStat, PowerState, VmInfo

from . import parse
from .guestauth import guest_credentials
from .session import Http, NoSuchOperation, Reply, SessionSlot, show
from .transport import OpenedTransfer, Page

log = logging.getLogger("guestfs_mount.vcenter.client")

__all__ = ["RestTransport"]


def _q(segment: str) -> str:
    return urllib.parse.quote(os.fsencode(segment), safe="")


def _server_text(err: ApiError) -> str:
    return "; ".join(err.messages) or err.type_name


class RestTransport:
    """``form``: "released", "preview", or None to find out at the first transfer."""

    def __init__(self, http: Http, *, form: str | None = None) -> None:
        self.http = http
        self.form = form
        self._auto_form = form is None
        self.slot = SessionSlot()

    @property
    def name(self) -> str:
        return "preview" if self.form == "preview" else "rest"

    @property
    def cfg(self) -> Any:
        return self.http.config

    # --- session ----------------------------------------------------------------------

    async def login(self) -> None:
        await self.http.retry(self._login_once, "login")

    async def _login_once(self) -> None:
        cfg = self.http.config
        cred = base64.b64encode(f"{cfg.user}:{cfg.password}".encode()).decode("ascii")
        desc = f"vCenter login as {cfg.user}"
        reply = await self.http.send(
            "POST", self.http.server.base_url + "/api/session", name="session.create",
            desc=desc, headers={"Authorization": f"Basic {cred}", "Accept": "application/json"},
        )  # fmt: skip
        if reply.status not in (200, 201):
            err = self._api_error(reply, desc)
            if isinstance(err, Unauthenticated):
                err = Unauthenticated(
                    f"vCenter login as {cfg.user} failed: {_server_text(err)}",
                    status=err.status,
                    messages=err.messages,
                )
            raise err
        self.slot.set(parse.parse_session_token(parse.decode_json(reply.content, desc)))

    async def logout(self) -> None:
        token, self.slot.token = self.slot.token, None
        if token is None:
            return
        try:
            await self.http.send(
                "DELETE", self.http.server.base_url + "/api/session", name="session.delete",
                desc="vCenter logout", headers={"vmware-api-session-id": token},
            )  # fmt: skip
        except RemoteError:
            pass

    async def _session_alive(self, gen: int) -> bool:
        token = self.slot.token
        if gen != self.slot.gen or token is None:
            return False  # someone logged in again meanwhile: retry with the new session
        reply = await self.http.send(
            "GET", self.http.server.base_url + "/api/session", name="session.get",
            desc="check vCenter session",
            headers={"Accept": "application/json", "vmware-api-session-id": token},
        )  # fmt: skip
        return reply.status == 200

    # --- API calls --------------------------------------------------------------------

    def _api_error(self, reply: Reply, desc: str, guest_path: str | None = None) -> RemoteError:
        status = reply.status
        if 300 <= status < 400:
            return ProtocolError(f"{desc}: unexpected redirect (HTTP {status}); not followed")
        v = parse.parse_error(reply.content)
        if v is None:
            if status in (404, 405):
                return NoSuchOperation(f"{desc}: HTTP {status} without an API error body")
            if status in (429, 502, 503, 504):
                return ServiceUnavailable(
                    f"{desc}: HTTP {status} without an API error body", status=status
                )
            if 200 <= status < 300:
                return ProtocolError(f"{desc}: unexpected HTTP status {status}")
            return ProtocolError(f"{desc}: HTTP {status} without an API error body")
        if v.error_type == "OPERATION_NOT_FOUND":
            return NoSuchOperation(f"{desc}: the server does not know this operation")
        text = self.http.scrub("; ".join(v.messages) or "no message")
        return v.exception(f"{desc} failed: {v.error_type}: {text}", status=status, path=guest_path)

    async def api(
        self,
        name: str,
        method: str,
        path: str,
        *,
        desc: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        guest_path: str | None = None,
        guest: bool = False,
        ok: tuple[int, ...] = (200,),
        retry: bool = True,
    ) -> Any:
        async def once() -> Any:
            return await self._api_once(
                name, method, path, desc=desc, params=params, body=body,
                guest=guest, guest_path=guest_path, ok=ok,
            )  # fmt: skip

        if retry:
            return await self.http.retry(once, desc)
        return await once()

    async def _api_once(
        self,
        name: str,
        method: str,
        path: str,
        *,
        desc: str,
        params: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        guest: bool,
        guest_path: str | None,
        ok: tuple[int, ...],
    ) -> Any:
        await self.slot.ensure(self._login_once)
        content = None
        headers = {"Accept": "application/json"}
        if body is not None:
            content = json.dumps(body, ensure_ascii=True).encode("ascii")
            headers["Content-Type"] = "application/json"
        url = self.http.server.base_url + path
        if params:
            url = url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        relogged = False
        while True:
            gen = self.slot.gen
            token = self.slot.token
            assert token is not None
            reply = await self.http.send(
                method, url, name=name, desc=desc, content=content,
                headers={**headers, "vmware-api-session-id": token},
            )  # fmt: skip
            if reply.status in ok:
                if not reply.content:
                    return None
                return parse.decode_json(reply.content, desc)
            err = self._api_error(reply, desc, guest_path)
            if isinstance(err, Unauthenticated):
                # vCenter answers UNAUTHENTICATED both for an expired session and for
                # refused guest credentials. Right after a login, or while the session
                # still answers GET /api/session, it is the guest account.
                if guest and (relogged or await self._session_alive(gen)):
                    user = guest_credentials(self.http.config).user_name or "(default user)"
                    raise GuestAuthFailed(
                        f"guest login as {user} refused by {desc.split(' on ', 1)[-1]}:"
                        f" {_server_text(err)}",
                        status=err.status,
                        messages=err.messages,
                        path=guest_path,
                    ) from err
                if not relogged:
                    await self.slot.renew(gen, self._login_once, self.http.stats, "vCenter")
                    relogged = True
                    continue
            raise err

    # --- VMs --------------------------------------------------------------------------

    async def find_vm(self, name_or_id: str) -> VmInfo:
        found: list[VmInfo] = []
        desc = f"look up VM {name_or_id}"
        if name_or_id.startswith("vm-") and name_or_id[3:].isdigit():
            data = await self.api(
                "vm.list", "GET", "/api/vcenter/vm", params={"vms": name_or_id}, desc=desc
            )
            found = [v for v in parse.parse_vm_list(data) if v.vm == name_or_id]
        if not found:
            data = await self.api(
                "vm.list", "GET", "/api/vcenter/vm", params={"names": name_or_id}, desc=desc
            )
            found = [v for v in parse.parse_vm_list(data) if v.name == name_or_id]
        if not found:
            raise NotFound(
                f"no VM named {name_or_id!r} (or with that id) on vCenter {self.http.server.host}"
            )
        if len(found) > 1:
            ids = ", ".join(sorted(v.vm for v in found))
            raise ConfigError(
                f"{len(found)} VMs are named {name_or_id!r}: {ids}; give the VM id instead"
            )
        return dataclasses.replace(found[0], instance_uuid=await self._instance_uuid(found[0].vm))

    async def _instance_uuid(self, vm: str) -> str | None:
        """The VM's ``identity.instance_uuid`` (None if this server does not give it: only
        a kept cache needs it, so the mount goes on without)."""
        try:
            data = await self.api(
                "vm.get", "GET", f"/api/vcenter/vm/{_q(vm)}", desc=f"identity of VM {vm}"
            )
            return parse.parse_vm_identity(data)
        except Unauthenticated:
            raise
        except (ApiError, ProtocolError) as exc:
            log.info("no instance UUID for VM %s: %s", vm, exc)
            return None

    async def check_guest(self, vm: str) -> None:
        base = f"/api/vcenter/vm/{_q(vm)}"
        data = await self.api("vm.power", "GET", base + "/power", desc=f"power state of VM {vm}")
        state = parse.parse_power_state(data)
        if state is not PowerState.POWERED_ON:
            word = "powered off" if state is PowerState.POWERED_OFF else "suspended"
            raise NotAllowedInCurrentState(f"VM {vm} is {word}")
        try:
            data = await self.api(
                "vm.guest.operations", "GET", base + "/guest/operations",
                desc=f"guest operations state of VM {vm}",
            )  # fmt: skip
            ready = parse.parse_guest_operations(data)
        except NoSuchOperation:
            data = await self.api(
                "vm.tools", "GET", base + "/tools", desc=f"VMware Tools state of VM {vm}"
            )
            ready = parse.parse_tools_running(data)
        if not ready:
            raise ServiceUnavailable(
                f"VMware Tools is not running in VM {vm} (guest operations not ready)"
            )

    # --- files ------------------------------------------------------------------------

    def _creds(self) -> dict[str, object]:
        return guest_credentials(self.http.config).to_json()

    async def list_page(self, vm: str, path: str, index: int, size: int) -> Page:
        desc = f"list {show(path)} on VM {vm}"
        body = {"credentials": self._creds(), "path": path,
                "iteration": {"size": size, "index": index}}  # fmt: skip
        data = await self.api(
            "files.list", "POST", f"/api/vcenter/vm/{_q(vm)}/guest/filesystem/files?action=list",
            desc=desc, body=body, guest=True, guest_path=path,
        )  # fmt: skip
        try:
            return parse.parse_list_page(data)
        except ProtocolError as e:
            raise ProtocolError(f"{desc}: {e}") from e

    async def stat(self, vm: str, path: str) -> GuestStat:
        desc = f"stat {show(path)} on VM {vm}"
        url = f"/api/vcenter/vm/{_q(vm)}/guest/filesystem/files/{_q(path)}?action=get"
        data = await self.api(
            "files.get", "POST", url, desc=desc, body={"credentials": self._creds()},
            guest=True, guest_path=path,
        )  # fmt: skip
        try:
            return parse.parse_stat(data)
        except ProtocolError as e:
            raise ProtocolError(f"{desc}: {e}") from e

    async def open_transfer(self, vm: str, path: str) -> OpenedTransfer:
        desc = f"create transfer of {show(path)} on VM {vm}"
        base = f"/api/vcenter/vm/{_q(vm)}/guest/filesystem"
        raw: Any = None
        if self.form != "preview":
            try:
                raw = await self.api(
                    "transfer.create", "POST", base + "?action=create", desc=desc,
                    body={"credentials": self._creds(), "spec": {"path": path}},
                    guest=True, guest_path=path, ok=(200, 201), retry=False,
                )  # fmt: skip
                self.form = "released"
            except NoSuchOperation:
                if not self._auto_form or self.form == "released":
                    raise
                log.info("vCenter has no released transfer API; using the preview form")
                self.form = "preview"
        if self.form == "preview":
            raw = await self.api(
                "transfer.get", "GET", base, desc=desc,
                body={"path": path, "credentials": self._creds()},
                guest=True, guest_path=path, ok=(200, 201), retry=False,
            )  # fmt: skip
        try:
            return OpenedTransfer(parse.parse_transfer_url(raw))
        except ProtocolError as e:
            raise ProtocolError(f"{desc}: {e}") from e

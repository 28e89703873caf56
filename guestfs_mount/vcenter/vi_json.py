"""The VI/JSON transport (vCenter 8.0 U1+): the vim25 GuestFileManager as plain JSON.

``POST https://VC/sdk/vim25/{release}/{MoType}/{moId}/{Method}`` with a JSON body;
``RetrieveServiceContent`` (anonymous) names the SessionManager and the
GuestOperationsManager, ``Login`` returns the session id in the ``vmware-api-session-id``
response header, which every later call sends back. A listing page is one
``ListFilesInGuest`` with every attribute per entry, an open one
``InitiateFileTransferFromGuest`` (URL and attributes), the start-up check one
``ValidateCredentialsInGuest``. Faults come as HTTP 500 with a ``VimFault`` body.
The subset used: ``../shared/specs/vi-json-guestfile-subset.json``.

VI/JSON has no VM lookup by name in that subset; it exists only on a vCenter, which
always has ``/api``, so VMs are looked up through the REST transport given as ``lookup``.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any

from guestfs_mount.errors import (
    ProtocolError,
    RemoteError,
    ServiceUnavailable,
    Unauthenticated,
)
from guestfs_mount.model import VmInfo

from . import vim
from .parse import decode_json
from .rest import RestTransport
from .session import Http, NoSuchOperation, Reply, SessionSlot

log = logging.getLogger("guestfs_mount.vcenter.client")

__all__ = ["RELEASE", "ViJsonTransport", "probe_path"]

# The first release that has VI/JSON; the guest operations are older (vim 5.0), and a
# newer server serves every older release.
RELEASE = "8.0.1.0"


def probe_path(release: str = RELEASE) -> str:
    return f"/sdk/vim25/{release}/ServiceInstance/ServiceInstance/RetrieveServiceContent"


class ViJsonTransport(vim.GuestOps):
    name = "vi-json"

    def __init__(
        self,
        http: Http,
        *,
        lookup: RestTransport,
        release: str = RELEASE,
        content: Any = None,
    ) -> None:
        self.http = http
        self.lookup = lookup
        self.base = http.server.base_url + f"/sdk/vim25/{release}"
        self.slot = SessionSlot()
        self._content = content  # ServiceContent, when the probe already fetched it
        self._file_manager: str | None = None
        self._auth_manager: str | None = None

    # --- plumbing ---------------------------------------------------------------------

    def _fault(self, reply: Reply, desc: str, path: str | None) -> RemoteError:
        status = reply.status
        try:
            data = json.loads(reply.content) if reply.content else None
        except (ValueError, RecursionError):
            data = None
        name = vim.fault_name(data.get("_typeName")) if isinstance(data, dict) else None
        if name is None or not isinstance(data, dict):
            if status in (404, 405):
                return NoSuchOperation(f"{desc}: HTTP {status} without a fault body")
            if status in (429, 502, 503, 504):
                return ServiceUnavailable(f"{desc}: HTTP {status}", status=status)
            if status == 401:
                return Unauthenticated(
                    f"{desc}: HTTP 401", status=status, error_type="NotAuthenticated"
                )
            return ProtocolError(f"{desc}: HTTP {status} without a fault body")
        message = ""
        for key in ("faultstring", "localizedMessage", "message"):
            if isinstance(data.get(key), str):
                message = data[key]
                break
        else:
            fm = data.get("faultMessage")
            if isinstance(fm, list):
                message = "; ".join(
                    m["message"]
                    for m in fm[:5]
                    if isinstance(m, dict) and isinstance(m.get("message"), str)
                )
        return vim.fault_error(
            name, self.http.scrub(message[:1000]), desc=desc, status=status, path=path
        )

    async def _post(
        self,
        name: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        desc: str,
        token: str | None,
        method: str = "POST",
        guest_path: str | None = None,
    ) -> Reply:
        headers = {"Accept": "application/json"}
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=True).encode("ascii")
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["vmware-api-session-id"] = token
        return await self.http.send(
            method, self.base + path, name=name, desc=desc, headers=headers, content=content
        )

    async def service_content(self) -> Any:
        if self._content is None:
            desc = "read vCenter service content (VI/JSON)"
            path = "/ServiceInstance/ServiceInstance/RetrieveServiceContent"
            reply = await self._post(
                "vim.RetrieveServiceContent", path, None, desc=desc, token=None
            )
            if reply.status != 200:
                raise self._fault(reply, desc, None)
            self._content = decode_json(reply.content, desc)
        return self._content

    def _content_ref(self, key: str) -> str:
        sc = self._content
        if not isinstance(sc, dict):
            raise ProtocolError("VI/JSON service content is not an object")
        return vim.moref_value(sc.get(key), f"service content {key}")

    async def _login_once(self) -> None:
        cfg = self.http.config
        await self.service_content()
        sm = self._content_ref("sessionManager")
        desc = f"vCenter login as {cfg.user}"
        reply = await self._post(
            "vim.Login", f"/SessionManager/{urllib.parse.quote(sm, safe='')}/Login",
            {"userName": cfg.user, "password": cfg.password}, desc=desc, token=None,
        )  # fmt: skip
        if reply.status != 200:
            err = self._fault(reply, desc, None)
            if isinstance(err, Unauthenticated):
                text = "; ".join(err.messages) or err.type_name
                raise Unauthenticated(
                    f"vCenter login as {cfg.user} failed: {text}",
                    status=err.status,
                    error_type=err.type_name,
                )
            raise err
        token = reply.headers.get("vmware-api-session-id", "")
        if not token or len(token) > 4096 or any(c in token for c in "\r\n\x00"):
            raise ProtocolError(f"{desc}: no usable vmware-api-session-id in the answer")
        self.slot.set(token)

    async def login(self) -> None:
        await self.http.retry(self._login_once, "login")
        await self.lookup.login()

    async def logout(self) -> None:
        token, self.slot.token = self.slot.token, None
        if token is not None:
            try:
                sm = self._content_ref("sessionManager")
                await self._post(
                    "vim.Logout", f"/SessionManager/{urllib.parse.quote(sm, safe='')}/Logout",
                    None, desc="vCenter logout", token=token,
                )  # fmt: skip
            except RemoteError:
                pass
        await self.lookup.logout()

    async def call(
        self,
        name: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        desc: str,
        method: str = "POST",
        guest_path: str | None = None,
        retry: bool = True,
    ) -> Any:
        """One authenticated call: the JSON answer (None for 204), or the fault raised."""

        async def send(token: str | None) -> Any:
            reply = await self._post(
                name, path, body, desc=desc, token=token, method=method, guest_path=guest_path
            )
            if reply.status in (200, 204):
                return decode_json(reply.content, desc) if reply.content else None
            raise self._fault(reply, desc, guest_path)

        return await self._session_call(send, desc, retry=retry, what="vCenter")

    async def _managers(self) -> tuple[str, str]:
        if self._file_manager is None or self._auth_manager is None:
            await self.service_content()
            gom = urllib.parse.quote(self._content_ref("guestOperationsManager"), safe="")
            found = []
            for prop in ("fileManager", "authManager"):
                data = await self.call(
                    f"vim.{prop}", f"/GuestOperationsManager/{gom}/{prop}", None,
                    desc=f"find the guest {prop}", method="GET",
                )  # fmt: skip
                found.append(vim.moref_value(data, prop))
            self._file_manager, self._auth_manager = found
        return self._file_manager, self._auth_manager

    async def _invoke(
        self,
        method: str,
        this: Mapping[str, str],
        args: Mapping[str, Any],
        *,
        desc: str,
        guest_path: str | None,
        retry: bool,
    ) -> Any:
        return await self.call(
            f"vim.{method}",
            f"/{this['type']}/{urllib.parse.quote(this['value'], safe='')}/{method}", dict(args),
            desc=desc, guest_path=guest_path, retry=retry,
        )  # fmt: skip

    # --- the interface ----------------------------------------------------------------

    async def find_vm(self, name_or_id: str) -> VmInfo:
        return await self.lookup.find_vm(name_or_id)

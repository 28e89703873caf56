"""An in-memory vim25 server (VI/JSON and SOAP from one state) for httpx.MockTransport
tests of the vim transports. Written from ../shared/specs (not from the client's code):
requests are read the way a server would (JSON bodies, namespace-aware XML), answers
follow the spec's shapes. Non-/sdk paths go to a FakeVCenter (the REST VM lookup)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.fake_vcenter import FakeVCenter, _Stream

SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
VIM = "urn:vim25"
JSON_BASE = "/sdk/vim25/8.0.1.0"


def posix_file(name: str, ftype: str = "file", size: int = 10, mode: int = 0o100644,
               uid: int = 0, gid: int = 0, target: str | None = None) -> dict[str, Any]:  # fmt: skip
    attrs: dict[str, Any] = {
        "_typeName": "GuestPosixFileAttributes",
        "modificationTime": "2025-01-14T08:01:12Z",
        "accessTime": "2025-01-15T09:00:00Z",
        "ownerId": uid,
        "groupId": gid,
        "permissions": mode,
    }
    if target is not None:
        attrs["symlinkTarget"] = target
    return {"_typeName": "GuestFileInfo", "path": name, "type": ftype, "size": size,
            "attributes": attrs}  # fmt: skip


def dots() -> list[dict[str, Any]]:
    return [
        posix_file(".", "directory", 4096, 0o40755),
        posix_file("..", "directory", 4096, 0o40755),
    ]


Hook = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass
class FakeVim:
    rest: FakeVCenter = field(default_factory=FakeVCenter)
    password: str = ""
    guest_password: str = ""
    api_type: str = "VirtualCenter"
    vi_json: bool = True
    soap: bool = True
    dirs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # path -> size (for transfers)
    sessions: set[str] = field(default_factory=set)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    faults: dict[str, str] = field(default_factory=dict)  # method -> fault type
    raw: dict[str, httpx.Response] = field(default_factory=dict)  # method -> answer
    vms: dict[str, str] = field(default_factory=lambda: {"web": "vm-42"})
    n_logins: int = 0

    def __post_init__(self) -> None:
        self.password = self.password or self.rest.password
        self.guest_password = self.guest_password or self.rest.guest_password

    def transport(self) -> httpx.MockTransport:
        rest = self.rest.transport()

        def streamed(resp: httpx.Response) -> httpx.Response:
            return httpx.Response(
                resp.status_code, headers=resp.headers, stream=_Stream(resp.stream)
            )

        async def handle(req: httpx.Request) -> httpx.Response:
            path = req.url.path
            if path == "/sdk" and self.soap:
                return streamed(self.soap_handle(req))
            if path.startswith(JSON_BASE) and self.vi_json:
                return streamed(self.json_handle(req))
            if path.startswith("/sdk"):
                return streamed(httpx.Response(404, text="<html>not here</html>"))
            return await rest.handle_async_request(req)

        return httpx.MockTransport(handle)

    # --- the shared logic: method(args) -> result dict, or raises _Fault ---------------

    def service_content(self) -> dict[str, Any]:
        def ref(t: str, v: str) -> dict[str, str]:
            return {"_typeName": "ManagedObjectReference", "type": t, "value": v}

        return {
            "_typeName": "ServiceContent",
            "rootFolder": ref("Folder", "group-d1"),
            "propertyCollector": ref("PropertyCollector", "propertyCollector"),
            "sessionManager": ref("SessionManager", "SessionManager"),
            "searchIndex": ref("SearchIndex", "SearchIndex"),
            "guestOperationsManager": ref("GuestOperationsManager", "guestOperationsManager"),
            "about": {
                "_typeName": "AboutInfo",
                "name": "VMware",
                "fullName": "Fake vim 8.0",
                "apiType": self.api_type,
                "apiVersion": "8.0.1.0",
            },
        }

    def guest(self, method: str, args: dict[str, Any]) -> Any:
        self.calls.append((method, args))
        if method in self.faults:
            raise _Fault(self.faults[method])
        auth = args.get("auth") or {}
        if auth.get("password") != self.guest_password:
            raise _Fault("InvalidGuestLogin")
        if method == "ValidateCredentialsInGuest":
            return None
        if method == "ListFilesInGuest":
            d = args["filePath"]
            if d not in self.dirs:
                raise _Fault("FileNotFound")
            entries = dots() + self.dirs[d]
            pattern = args.get("matchPattern")
            if pattern:
                entries = [e for e in entries if re.search(pattern, e["path"])]
            i, n = int(args.get("index") or 0), int(args.get("maxResults") or 50)
            page = entries[i : i + n]
            return {"_typeName": "GuestListFileInfo", "files": page,
                    "remaining": max(0, len(entries) - i - len(page))}  # fmt: skip
        if method == "InitiateFileTransferFromGuest":
            p = args["guestFilePath"]
            if p in self.dirs:
                raise _Fault("NotAFile")
            if p not in self.files:
                raise _Fault("FileNotFound")
            return {"_typeName": "FileTransferInformation",
                    "attributes": posix_file("x", size=self.files[p])["attributes"],
                    "size": self.files[p], "url": "https://*/guestFile?id=1&token=UrLtOkEnXyZ"}  # fmt: skip
        raise _Fault("InvalidArgument")

    # --- VI/JSON ------------------------------------------------------------------------

    def json_handle(self, req: httpx.Request) -> httpx.Response:
        parts = req.url.path[len(JSON_BASE) + 1 :].split("/")
        mo_type, _moid, method = parts[0], parts[1], parts[2]
        args = json.loads(req.content) if req.content else {}
        if method in self.raw:
            return self.raw[method]
        if method == "RetrieveServiceContent":
            return httpx.Response(200, json=self.service_content())
        if method == "Login":
            if args.get("password") != self.password:
                return self._json_fault("InvalidLogin", "Cannot complete login")
            self.n_logins += 1
            sid = f"SeSsIoNtOkEn{self.n_logins}"
            self.sessions.add(sid)
            return httpx.Response(200, json={"_typeName": "UserSession", "key": sid},
                                  headers={"vmware-api-session-id": sid})  # fmt: skip
        if req.headers.get("vmware-api-session-id") not in self.sessions:
            return self._json_fault("NotAuthenticated", "session is not authenticated")
        if method == "Logout":
            return httpx.Response(204)
        if mo_type == "GuestOperationsManager":
            value = (
                "guestOperationsFileManager"
                if method == "fileManager"
                else "guestOperationsAuthManager"
            )
            return httpx.Response(200, json={"_typeName": "ManagedObjectReference",
                                             "type": "GuestFileManager", "value": value})  # fmt: skip
        try:
            result = self.guest(method, args)
        except _Fault as f:
            return self._json_fault(f.name, "fault " + f.name)
        return httpx.Response(204) if result is None else httpx.Response(200, json=result)

    @staticmethod
    def _json_fault(name: str, msg: str) -> httpx.Response:
        return httpx.Response(500, json={"_typeName": name, "faultMessage": [
            {"_typeName": "LocalizableMessage", "key": "k", "message": msg}]})  # fmt: skip

    # --- SOAP ---------------------------------------------------------------------------

    def soap_handle(self, req: httpx.Request) -> httpx.Response:
        root = ET.fromstring(req.content)
        op = root.find(f"{{{SOAPENV}}}Body")[0]  # type: ignore[index]
        method = op.tag.split("}")[1]
        args = {c.tag.split("}")[1]: _to_py(c) for c in op}
        if method in self.raw:
            return self.raw[method]
        if method == "RetrieveServiceContent":
            return self._soap_ok(method, self.service_content())
        if method == "Login":
            if args.get("password") != self.password:
                return self._soap_fault("InvalidLogin", "Cannot complete login")
            self.n_logins += 1
            sid = f'"SeSsIoNtOkEn{self.n_logins}"'
            self.sessions.add(sid)
            return self._soap_ok(method, {"_typeName": "UserSession", "key": sid},
                                 headers={"set-cookie": f"vmware_soap_session={sid}; Path=/; HttpOnly; Secure;"})  # fmt: skip
        cookie = req.headers.get("cookie", "").partition("vmware_soap_session=")[2]
        if cookie not in self.sessions:
            return self._soap_fault("NotAuthenticated", "not authenticated")
        if method == "Logout":
            return self._soap_ok(method, None)
        if method == "RetrievePropertiesEx":
            obj = args["specSet"]["objectSet"]["obj"]
            paths = args["specSet"]["propSet"]["pathSet"]
            paths = paths if isinstance(paths, list) else [paths]
            props = []
            for p in paths:
                if p == "fileManager":
                    val: Any = _Ref("GuestFileManager", "guestOperationsFileManager")
                elif p == "authManager":
                    val = _Ref("GuestAuthManager", "guestOperationsAuthManager")
                elif p == "name":
                    val = next((n for n, v in self.vms.items() if v == obj["value"]), None)
                    if val is None:
                        return self._soap_fault("ManagedObjectNotFound", "no such object")
                else:
                    val = "poweredOn"
                props.append({"name": p, "val": val})
            return self._soap_ok(method, {"_typeName": "RetrieveResult",
                                          "objects": [{"obj": _Ref(obj["type"], obj["value"]), "propSet": props}]})  # fmt: skip
        if method == "FindByInventoryPath":
            name = args["inventoryPath"].rpartition("/")[2]
            vm = self.vms.get(name)
            return self._soap_ok(method, None if vm is None else _Ref("VirtualMachine", vm))
        for k in ("index", "maxResults"):
            if k in args:
                args[k] = int(args[k])
        try:
            result = self.guest(method, args)
        except _Fault as f:
            return self._soap_fault(f.name, "fault " + f.name)
        return self._soap_ok(method, result)

    def _soap_ok(
        self, method: str, value: Any, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        env = ET.Element(f"{{{SOAPENV}}}Envelope")
        body = ET.SubElement(env, f"{{{SOAPENV}}}Body")
        resp = ET.SubElement(body, f"{{{VIM}}}{method}Response")
        if value is not None:
            _from_py(resp, "returnval", value)
        return httpx.Response(
            200, content=ET.tostring(env), headers={"content-type": "text/xml", **(headers or {})}
        )

    @staticmethod
    def _soap_fault(name: str, msg: str) -> httpx.Response:
        env = ET.Element(f"{{{SOAPENV}}}Envelope")
        body = ET.SubElement(env, f"{{{SOAPENV}}}Body")
        f = ET.SubElement(body, f"{{{SOAPENV}}}Fault")
        ET.SubElement(f, "faultcode").text = "ServerFaultCode"
        ET.SubElement(f, "faultstring").text = msg
        detail = ET.SubElement(f, "detail")
        ET.SubElement(detail, f"{{{VIM}}}{name}Fault", {f"{{{XSI}}}type": name})
        return httpx.Response(500, content=ET.tostring(env), headers={"content-type": "text/xml"})


class _Fault(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


@dataclass
class _Ref:
    type: str
    value: str


def _to_py(el: ET.Element) -> Any:
    children = list(el)
    if not children:
        if el.get("type") is not None:
            return {"type": el.get("type"), "value": el.text or ""}
        return el.text or ""
    out: dict[str, Any] = {}
    if el.get(f"{{{XSI}}}type"):
        out["_typeName"] = el.get(f"{{{XSI}}}type")
    for c in children:
        k = c.tag.split("}")[1]
        v = _to_py(c)
        if k in out:
            out[k] = out[k] + [v] if isinstance(out[k], list) else [out[k], v]
        else:
            out[k] = v
    return out


def _from_py(parent: ET.Element, name: str, value: Any) -> None:
    tag = f"{{{VIM}}}{name}"
    if isinstance(value, list):
        for v in value:
            _from_py(parent, name, v)
        return
    if isinstance(value, _Ref):
        el = ET.SubElement(parent, tag, {"type": value.type})
        el.text = value.value
        return
    if isinstance(value, dict):
        if value.get("_typeName") == "ManagedObjectReference":
            el = ET.SubElement(parent, tag, {"type": value["type"]})
            el.text = value["value"]
            return
        attrs = {f"{{{XSI}}}type": value["_typeName"]} if "_typeName" in value else {}
        el = ET.SubElement(parent, tag, attrs)
        for k, v in value.items():
            if k != "_typeName":
                _from_py(el, k, v)
        return
    el = ET.SubElement(parent, tag)
    el.text = ("true" if value else "false") if isinstance(value, bool) else str(value)

"""The SOAP transport: the vim25 GuestFileManager on every vCenter and every ESXi host.

``POST https://HOST/sdk``, SOAP 1.1 document/literal, namespace ``urn:vim25``; the session
is the ``vmware_soap_session`` cookie that ``Login`` sets. The operations and their
answers are those of :mod:`.vi_json` (the readers are shared in :mod:`.vim`); this module
only writes envelopes (with ``xml.etree``, never by pasting text) and reads them back
with ``defusedxml`` (no DTDs, no entities: an entity bomb or an external entity is a
ProtocolError), turning the XML into the JSON shape of VI/JSON. Types and a worked
envelope: ``../shared/specs/vim-guestfile-soap.md``.

VM lookup: on a vCenter (``about.apiType`` ``VirtualCenter``) through the REST transport;
on a standalone ESXi host (``HostAgent``, no ``/api``) with
``SearchIndex.FindByInventoryPath("ha-datacenter/vm/NAME")`` or, for an id, directly,
then ``RetrievePropertiesEx`` for its name and power state.
"""

from __future__ import annotations

import http.cookies
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from guestfs_mount.errors import (
    InvalidArgument,
    NotFound,
    ProtocolError,
    RemoteError,
    ServiceUnavailable,
    Unauthenticated,
)
from guestfs_mount.model import PowerState, VmInfo

from . import parse, vim
from .rest import RestTransport
from .session import Http, NoSuchOperation, Reply, SessionSlot

log = logging.getLogger("guestfs_mount.vcenter.client")

__all__ = ["SoapTransport", "envelope", "read_envelope", "service_content_request"]

SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
VIM = "urn:vim25"
# The oldest version every server still in service answers, and new enough (>= 5.0)
# for ServiceContent to include the guestOperationsManager.
VERSION = "6.5"
SOAP_ACTION = f'"urn:vim25/{VERSION}"'
COOKIE = "vmware_soap_session"
MAX_DEPTH = 24
_XSI_TYPE = f"{{{XSI}}}type"
_POWER = {
    "poweredOn": PowerState.POWERED_ON,
    "poweredOff": PowerState.POWERED_OFF,
    "suspended": PowerState.SUSPENDED,
}

ET.register_namespace("soapenv", SOAPENV)
ET.register_namespace("xsi", XSI)


# --- writing --------------------------------------------------------------------------------


def _xml_safe(text: str, what: str) -> str:
    # XML 1.0 cannot carry most control characters, nor the lone surrogates that stand
    # for a guest name's non-UTF-8 bytes: such a value cannot be sent at all.
    for c in text:
        o = ord(c)
        if (o < 0x20 and c not in "\t\n\r") or 0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF):
            raise InvalidArgument(f"{what}: contains characters that SOAP cannot carry")
    return text


def _add(parent: ET.Element, name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            _add(parent, name, item)
        return
    if isinstance(value, Mapping):
        if value.get("_typeName") == "ManagedObjectReference":
            el = ET.SubElement(parent, name, {"type": str(value["type"])})
            el.text = _xml_safe(str(value["value"]), name)
            return
        attrs = {_XSI_TYPE: str(value["_typeName"])} if "_typeName" in value else {}
        el = ET.SubElement(parent, name, attrs)
        for k, v in value.items():
            if k != "_typeName":
                _add(el, k, v)
        return
    el = ET.SubElement(parent, name)
    if isinstance(value, bool):
        el.text = "true" if value else "false"
    elif isinstance(value, int):
        el.text = str(value)
    else:
        el.text = _xml_safe(str(value), name)


def envelope(method: str, this: Mapping[str, str], args: Sequence[tuple[str, Any]] = ()) -> bytes:
    """The request body of ``method`` on ``this`` (a MoRef dict) with ``args`` in order."""
    env = ET.Element(f"{{{SOAPENV}}}Envelope")
    body = ET.SubElement(env, f"{{{SOAPENV}}}Body")
    # Unqualified children under a default namespace, as pyvmomi writes them, so that
    # xsi:type values such as "NamePasswordAuthentication" resolve to urn:vim25.
    op = ET.SubElement(body, method, {"xmlns": VIM})
    _add(op, "_this", this)
    for name, value in args:
        _add(op, name, value)
    out: bytes = ET.tostring(env, encoding="utf-8", xml_declaration=True)
    return out


def service_content_request() -> bytes:
    return envelope("RetrieveServiceContent", vim.moref("ServiceInstance", "ServiceInstance"))


# --- reading --------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _value(el: ET.Element, depth: int = 0) -> Any:
    """An element as VI/JSON would carry it: a dict (``_typeName`` from xsi:type, repeated
    children as lists), a MoRef dict, or the text of a leaf."""
    if depth > MAX_DEPTH:
        raise ProtocolError("SOAP answer nested too deeply")
    xsi_type = el.get(_XSI_TYPE)
    type_name = xsi_type.rpartition(":")[2] if xsi_type else None
    children = list(el)
    if not children:
        text = el.text or ""
        mo_type = el.get("type")
        if mo_type is not None and type_name in (None, "ManagedObjectReference"):
            return {"_typeName": "ManagedObjectReference", "type": mo_type, "value": text.strip()}
        if type_name and not (xsi_type or "").startswith("xsd:") and not text.strip():
            return {"_typeName": type_name}
        return text
    out: dict[str, Any] = {"_typeName": type_name} if type_name else {}
    repeated: set[str] = set()
    for child in children:
        key = _local(child.tag)
        v = _value(child, depth + 1)
        if key in _LISTS:
            out.setdefault(key, []).append(v)
        elif key in repeated:
            out[key].append(v)
        elif key in out:
            out[key] = [out[key], v]
            repeated.add(key)
        else:
            out[key] = v
    return out


# Array-valued properties of the answers read here: a list even with one element.
_LISTS = frozenset({"files", "objects", "propSet", "faultMessage"})


def read_envelope(content: bytes, desc: str) -> tuple[str, Any]:
    """``("result", returnval)`` or ``("fault", (type name, message))`` from a SOAP reply;
    anything that is not a SOAP envelope raises ProtocolError."""
    try:
        root = SafeET.fromstring(content, forbid_dtd=True)
    except (ET.ParseError, DefusedXmlException, ValueError, RecursionError) as e:
        raise ProtocolError(f"{desc}: answer is not acceptable XML ({type(e).__name__})") from e
    if root.tag != f"{{{SOAPENV}}}Envelope":
        raise ProtocolError(f"{desc}: answer is not a SOAP envelope")
    body = root.find(f"{{{SOAPENV}}}Body")
    if body is None or len(body) == 0:
        raise ProtocolError(f"{desc}: SOAP envelope without a body")
    first = body[0]
    if first.tag == f"{{{SOAPENV}}}Fault":
        message = (first.findtext("faultstring") or "")[:1000]
        name: str | None = None
        detail = first.find("detail")
        if detail is not None and len(detail):
            d = detail[0]
            name = vim.fault_name(d.get(_XSI_TYPE) or _local(d.tag))
        return "fault", (name, message)
    returns = first.findall(f"{{{VIM}}}returnval")
    if not returns:
        return "result", None
    if len(returns) == 1:
        return "result", _value(returns[0])
    return "result", [_value(r) for r in returns]


# --- the transport --------------------------------------------------------------------------


class SoapTransport(vim.GuestOps):
    name = "soap"

    def __init__(
        self,
        http: Http,
        *,
        lookup: RestTransport | None,
        content: Any = None,
    ) -> None:
        self.http = http
        self.lookup = lookup  # None: a standalone ESXi host (no /api)
        self.url = http.server.base_url + "/sdk"
        self.slot = SessionSlot()
        self._content = content
        self._file_manager: str | None = None
        self._auth_manager: str | None = None

    def _error(self, reply: Reply, desc: str, path: str | None) -> RemoteError:
        status = reply.status
        if status in (200, 500):
            try:
                kind, value = read_envelope(reply.content, desc)
            except ProtocolError:
                kind, value = "", None
            if kind == "fault":
                name, message = value
                if name is None:
                    return ProtocolError(
                        f"{desc}: SOAP fault without a type: {self.http.scrub(message)}"
                    )
                return vim.fault_error(
                    name, self.http.scrub(message), desc=desc, status=status, path=path
                )
        if status in (404, 405):
            return NoSuchOperation(f"{desc}: HTTP {status}: no SOAP endpoint")
        if status in (429, 502, 503, 504):
            return ServiceUnavailable(f"{desc}: HTTP {status}", status=status)
        return ProtocolError(f"{desc}: HTTP {status} without a SOAP fault")

    async def _post(self, name: str, body: bytes, *, desc: str, cookie: str | None) -> Reply:
        headers = {
            "Content-Type": "text/xml; charset=utf-8",
            "SOAPAction": SOAP_ACTION,
            "Accept": "text/xml",
        }
        if cookie is not None:
            headers["Cookie"] = f"{COOKIE}={cookie}"
        return await self.http.send(
            "POST", self.url, name=name, desc=desc, headers=headers, content=body
        )

    async def service_content(self) -> Any:
        if self._content is None:
            desc = "read service content (SOAP)"
            reply = await self._post(
                "soap.RetrieveServiceContent", service_content_request(), desc=desc, cookie=None
            )
            if reply.status != 200:
                raise self._error(reply, desc, None)
            kind, value = read_envelope(reply.content, desc)
            if kind != "result" or not isinstance(value, dict):
                raise ProtocolError(f"{desc}: no ServiceContent in the answer")
            self._content = value
        return self._content

    def _ref(self, key: str) -> str:
        return vim.moref_value((self._content or {}).get(key), f"service content {key}")

    async def _login_once(self) -> None:
        cfg = self.http.config
        await self.service_content()
        desc = f"login as {cfg.user}"
        body = envelope(
            "Login",
            vim.moref("SessionManager", self._ref("sessionManager")),
            [("userName", cfg.user), ("password", cfg.password)],
        )
        reply = await self._post("soap.Login", body, desc=desc, cookie=None)
        if reply.status != 200:
            err = self._error(reply, desc, None)
            if isinstance(err, Unauthenticated):
                raise Unauthenticated(
                    f"login as {cfg.user} on {self.http.server.host} failed:"
                    f" {'; '.join(err.messages) or err.type_name}",
                    status=err.status,
                    error_type=err.type_name,
                )
            raise err
        cookie = None
        for header in reply.headers.get_list("set-cookie"):
            jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
            try:
                jar.load(header)
            except http.cookies.CookieError:
                continue
            if COOKIE in jar:
                cookie = jar[COOKIE].coded_value
        if not cookie or len(cookie) > 4096 or any(c in cookie for c in "\r\n\x00;"):
            raise ProtocolError(f"{desc}: no usable {COOKIE} cookie in the answer")
        self.slot.set(cookie)

    async def login(self) -> None:
        await self.http.retry(self._login_once, "login")
        if self.lookup is not None:
            await self.lookup.login()

    async def logout(self) -> None:
        token, self.slot.token = self.slot.token, None
        if token is not None:
            try:
                body = envelope("Logout", vim.moref("SessionManager", self._ref("sessionManager")))
                await self._post("soap.Logout", body, desc="logout", cookie=token)
            except RemoteError:
                pass
        if self.lookup is not None:
            await self.lookup.logout()

    async def call(
        self,
        method: str,
        this: Mapping[str, str],
        args: Sequence[tuple[str, Any]],
        *,
        desc: str,
        guest_path: str | None = None,
        retry: bool = True,
    ) -> Any:
        body = envelope(method, this, args)

        async def send(token: str | None) -> Any:
            reply = await self._post(f"soap.{method}", body, desc=desc, cookie=token)
            if reply.status == 200:
                kind, value = read_envelope(reply.content, desc)
                if kind == "result":
                    return value
            raise self._error(reply, desc, guest_path)

        return await self._session_call(send, desc, retry=retry, what="vim25")

    async def _properties(
        self, mo_type: str, moid: str, paths: Sequence[str], desc: str
    ) -> dict[str, Any]:
        """``RetrievePropertiesEx`` of one object: {property path: value}."""
        await self.service_content()
        spec = {
            "propSet": {"type": mo_type, "all": False, "pathSet": list(paths)},
            "objectSet": {"obj": vim.moref(mo_type, moid), "skip": False},
        }
        data = await self.call(
            "RetrievePropertiesEx",
            vim.moref("PropertyCollector", self._ref("propertyCollector")),
            [("specSet", spec), ("options", {})],
            desc=desc,
        )
        out: dict[str, Any] = {}
        objects = data.get("objects") if isinstance(data, dict) else None
        for obj in objects if isinstance(objects, list) else []:
            props = obj.get("propSet") if isinstance(obj, dict) else None
            for prop in props if isinstance(props, list) else []:
                if isinstance(prop, dict) and isinstance(prop.get("name"), str):
                    out[prop["name"]] = prop.get("val")
        return out

    async def _managers(self) -> tuple[str, str]:
        if self._file_manager is None or self._auth_manager is None:
            await self.service_content()
            gom = self._ref("guestOperationsManager")
            props = await self._properties(
                "GuestOperationsManager", gom, ("authManager", "fileManager"),
                "find the guest file and auth managers",
            )  # fmt: skip
            self._file_manager = vim.moref_value(props.get("fileManager"), "fileManager")
            self._auth_manager = vim.moref_value(props.get("authManager"), "authManager")
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
            method, this, list(args.items()), desc=desc, guest_path=guest_path, retry=retry
        )

    # --- the interface ----------------------------------------------------------------

    async def find_vm(self, name_or_id: str) -> VmInfo:
        if self.lookup is not None:
            return await self.lookup.find_vm(name_or_id)
        await self.service_content()
        desc = f"look up VM {name_or_id}"
        moid: str | None = (
            name_or_id if name_or_id.isdigit() or name_or_id.startswith("vm-") else None
        )
        if moid is None:
            # Inventory path syntax escapes '/', '\' and '%' inside a name.
            esc = name_or_id.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")
            found = await self.call(
                "FindByInventoryPath",
                vim.moref("SearchIndex", self._ref("searchIndex")),
                [("inventoryPath", f"ha-datacenter/vm/{esc}")],
                desc=desc,
            )
            if isinstance(found, dict):
                moid = vim.moref_value(found, "VM")
        if moid is None:
            raise NotFound(f"no VM named {name_or_id!r} on host {self.http.server.host}")
        props = await self._properties(
            "VirtualMachine", moid, ("name", "runtime.powerState", "config.instanceUuid"), desc
        )
        name = props.get("name")
        if not isinstance(name, str):
            raise NotFound(
                f"no VM named {name_or_id!r} (or with that id) on host {self.http.server.host}"
            )
        state = _POWER.get(str(props.get("runtime.powerState")), PowerState.POWERED_OFF)
        uuid = parse.instance_uuid(props.get("config.instanceUuid"))
        return VmInfo(vm=moid, name=name[:1024], power_state=state, instance_uuid=uuid)

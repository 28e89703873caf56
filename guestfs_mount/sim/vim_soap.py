"""vim25 SOAP 1.1 (``POST /sdk``, document/literal, ``urn:vim25``), as every vCenter and
ESXi host serves it; session cookie ``vmware_soap_session``.

Requests are parsed with defusedxml (no DTD, so no entity expansion and no external
entities) after a size check; answers are built with ``xml.etree`` (every guest string
is escaped by the serialiser). Shapes: ``../shared/specs/vim-guestfile-soap.md``.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from http.cookies import CookieError, SimpleCookie
from typing import Any

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from starlette.requests import Request
from starlette.responses import Response

from .vim_data import (
    API_VERSION,
    PARAMS,
    PRIOR_VERSIONS,
    AnyValue,
    Data,
    DateTime,
    PropertySpec,
    Value,
    as_any,
)
from .vim_endpoint import VimApp
from .vim_faults import MoRef, VimFault, invalid_argument, invalid_request
from .vim_ops import VimService

log = logging.getLogger("guestfs_mount.sim.vim_soap")

SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAPENC = "http://schemas.xmlsoap.org/soap/encoding/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XSD = "http://www.w3.org/2001/XMLSchema"
VIM = "urn:vim25"
COOKIE = "vmware_soap_session"
XML_TYPE = "text/xml; charset=utf-8"
XSD_PRIMITIVES = {"string", "boolean", "int", "long", "dateTime", "short", "anyURI"}


# ---- serialising -------------------------------------------------------------------------
def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, DateTime):
        return value.text()
    return str(value)


def put(parent: ET.Element, name: str, value: Value) -> None:
    """Append ``value`` under ``parent`` as element(s) ``name`` (a list repeats it)."""
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            put(parent, name, item)
        return
    el = ET.SubElement(parent, name)
    _fill(el, value)


def _fill(el: ET.Element, value: Value) -> None:
    if isinstance(value, AnyValue):
        inner = value.value
        t = value.type_name
        el.set(f"{{{XSI}}}type", f"xsd:{t}" if t in XSD_PRIMITIVES else t)
        if isinstance(inner, list):  # ArrayOfManagedObjectReference
            for item in inner:
                put(el, "ManagedObjectReference", item)
            return
        if isinstance(inner, Data):
            for name, v in inner.fields:
                put(el, name, v)
            return
        _fill(el, inner)
        return
    if isinstance(value, Data):
        if value.polymorphic:
            el.set(f"{{{XSI}}}type", value.type_name)
        for name, v in value.fields:
            put(el, name, v)
    elif isinstance(value, MoRef):
        el.set("type", value.type)
        el.text = value.value
    else:
        el.text = _text(value)


def envelope() -> tuple[ET.Element, ET.Element]:
    env = ET.Element(f"{{{SOAPENV}}}Envelope")
    # prefixes used inside attribute values (xsi:type="xsd:string") must be declared
    env.set("xmlns:xsd", XSD)
    env.set("xmlns:soapenc", SOAPENC)
    body = ET.SubElement(env, f"{{{SOAPENV}}}Body")
    return env, body


def render(env: ET.Element) -> bytes:
    text: bytes = ET.tostring(env, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + text


def response_xml(method: str, result: Value, fetch: bool = False) -> bytes:
    env, body = envelope()
    resp = ET.SubElement(body, f"{method}Response")
    resp.set("xmlns", VIM)
    if fetch and result is not None:
        put(resp, "returnval", as_any(result))
    else:
        put(resp, "returnval", result)
    return render(env)


def fault_xml(fault: VimFault) -> bytes:
    env, body = envelope()
    f = ET.SubElement(body, f"{{{SOAPENV}}}Fault")
    code = "ClientFaultCode" if fault.type_name == "InvalidRequest" else "ServerFaultCode"
    ET.SubElement(f, "faultcode").text = code
    ET.SubElement(f, "faultstring").text = fault.message
    detail = ET.SubElement(ET.SubElement(f, "detail"), f"{fault.type_name}Fault")
    detail.set("xmlns", VIM)
    detail.set(f"{{{XSI}}}type", fault.type_name)
    for name, v in fault.fields:
        put(detail, name, v)
    return render(env)


ET.register_namespace("soapenv", SOAPENV)
ET.register_namespace("xsi", XSI)


def service_versions_xml() -> bytes:
    """``/sdk/vimServiceVersions.xml``, which pyVim's SmartConnect reads to pick a version."""
    root = ET.Element("namespaces", version="1.0")
    ns = ET.SubElement(root, "namespace")
    ET.SubElement(ns, "name").text = "urn:vim25"
    ET.SubElement(ns, "version").text = API_VERSION
    prior = ET.SubElement(ns, "priorVersions")
    for v in PRIOR_VERSIONS:
        ET.SubElement(prior, "version").text = v
    return b'<?xml version="1.0" encoding="UTF-8" ?>\n' + bytes(ET.tostring(root, encoding="utf-8"))


# ---- parsing -----------------------------------------------------------------------------
def _local(tag: str) -> tuple[str, str]:
    ns, _, name = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
    return ns, name


def _xsi_type(el: ET.Element) -> str | None:
    value = el.get(f"{{{XSI}}}type")
    return value.rpartition(":")[2] if value else None


def _moref(el: ET.Element, name: str) -> MoRef:
    t = el.get("type")
    if not t or not (el.text or "").strip() or len(el):
        raise invalid_argument(name, f"'{name}' must be a ManagedObjectReference.")
    return MoRef(t, (el.text or "").strip())


def _bool(el: ET.Element, name: str) -> bool:
    text = (el.text or "").strip()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise invalid_argument(name, f"'{name}' must be an xsd:boolean.")


def _children(el: ET.Element) -> list[tuple[str, ET.Element]]:
    out = []
    for child in el:
        ns, name = _local(child.tag)
        if ns != VIM:
            raise invalid_request(f"Element {child.tag} is not in urn:vim25.")
        out.append((name, child))
    return out


def _auth(el: ET.Element) -> dict[str, Any]:
    kind = _xsi_type(el)
    if kind is None:
        raise invalid_argument(
            "auth", "'auth' needs an xsi:type (e.g. NamePasswordAuthentication)."
        )
    out: dict[str, Any] = {"_typeName": kind}
    for name, child in _children(el):
        if name == "interactiveSession":
            out[name] = _bool(child, name)
        elif name in ("username", "password", "token"):
            out[name] = child.text or ""
        else:
            raise invalid_argument(f"auth.{name}", f"Unknown element auth/{name}.")
    return out


def _spec(el: ET.Element) -> PropertySpec:
    props: list[tuple[str, list[str]]] = []
    objs: list[tuple[MoRef, bool, bool]] = []
    for name, child in _children(el):
        if name == "propSet":
            t, paths = "", []
            for n, c in _children(child):
                if n == "type":
                    t = (c.text or "").strip()
                elif n == "pathSet":
                    paths.append((c.text or "").strip())
            props.append((t, paths))
        elif name == "objectSet":
            obj, skip, select = None, False, False
            for n, c in _children(child):
                if n == "obj":
                    obj = _moref(c, "obj")
                elif n == "skip":
                    skip = _bool(c, "skip")
                elif n == "selectSet":
                    select = True
            if obj is None:
                raise invalid_argument("specSet.objectSet.obj")
            objs.append((obj, skip, select))
    return PropertySpec(props, objs)


def _options(el: ET.Element) -> dict[str, Any]:
    """A RetrieveOptions: ``maxObjects`` is the one field the simulator reads."""
    out: dict[str, Any] = {}
    for name, child in _children(el):
        if name == "maxObjects":
            try:
                out["maxObjects"] = int((child.text or "").strip())
            except ValueError:
                raise invalid_argument("options.maxObjects") from None
    return out


def parse_request(raw: bytes) -> tuple[str, MoRef, dict[str, Any]]:
    """(method, _this, params) of a SOAP request body; VimFault InvalidRequest if malformed."""
    try:
        root = fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ET.ParseError, DefusedXmlException, ValueError) as exc:
        raise invalid_request(f"Malformed SOAP request: {type(exc).__name__}") from None
    if root.tag != f"{{{SOAPENV}}}Envelope":
        raise invalid_request("Not a SOAP 1.1 envelope.")
    bodies = [c for c in root if c.tag == f"{{{SOAPENV}}}Body"]
    if len(bodies) != 1 or len(bodies[0]) != 1:
        raise invalid_request("A SOAP envelope needs one Body with one element.")
    call = bodies[0][0]
    ns, method = _local(call.tag)
    if ns != VIM:
        raise invalid_request(f"Body element {call.tag} is not in urn:vim25.")
    kinds = PARAMS.get(method)
    if kinds is None:
        raise VimFault(
            "MethodNotFound", f"Method {method} is not served here.", (("method", method),)
        )
    by_kind = {name: kind for name, kind, _r in kinds}
    this: MoRef | None = None
    params: dict[str, Any] = {}
    for name, child in _children(call):
        if name == "_this":
            this = _moref(child, "_this")
            continue
        kind = by_kind.get(name)
        if kind is None:
            raise invalid_argument(name, f"Unknown parameter {name!r} of {method}.")
        if kind == "moref":
            params[name] = _moref(child, name)
        elif kind == "auth":
            params[name] = _auth(child)
        elif kind == "string":
            params[name] = child.text or ""
        elif kind == "int":
            try:
                value = int((child.text or "").strip())
            except ValueError:
                raise invalid_argument(name, f"'{name}' must be an xsd:int.") from None
            if not -(2**31) <= value < 2**31:
                raise invalid_argument(name, f"'{name}' must be an xsd:int.")
            params[name] = value
        elif kind == "bool":
            params[name] = _bool(child, name)
        elif kind == "strings":
            params.setdefault(name, []).append((child.text or "").strip())
        elif kind == "specSet":
            params.setdefault(name, []).append(_spec(child))
        elif kind == "options":
            params[name] = _options(child)
        else:
            params[name] = None
    if this is None:
        raise invalid_argument("_this", "Missing _this.")
    for name, _kind, required in kinds:
        if required and name not in params and _kind != "options":
            raise invalid_argument(name, f"Required parameter '{name}' is missing.")
    return method, this, params


def session_cookie(header: str | None) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value.strip('"') if morsel is not None else None


class SoapApp(VimApp):
    """ASGI app for ``/sdk`` (POST) and ``/sdk/vimServiceVersions.xml`` (GET)."""

    transport = "soap"

    def __init__(self, service: VimService, count: Any, secure_cookie: bool = True) -> None:
        super().__init__(service, count)
        self.secure_cookie = secure_cookie

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        if path == "/sdk/vimServiceVersions.xml" and request.method == "GET":
            return Response(service_versions_xml(), media_type=XML_TYPE)
        if path not in ("/sdk", "/sdk/") or request.method != "POST":
            return Response("not found\n", status_code=404, media_type="text/plain")
        ctx = self.context(request, session_cookie(request.headers.get("cookie")))
        method = "?"
        try:
            raw = await self.read_body(request)
            method, this, params = parse_request(raw)
            self.count(method)
            result = await self.service.invoke(ctx, method, this, params)
        except VimFault as fault:
            if method == "?":
                self.count("invalid")
            if not fault.is_a("FileFault"):
                log.info("soap %s -> %s", method, fault.type_name)
            return Response(fault_xml(fault), status_code=500, media_type=XML_TYPE)
        response = Response(
            response_xml(method, result, fetch=method == "Fetch"), media_type=XML_TYPE
        )
        if ctx.new_token:
            # the recorded vCenter form: vmware_soap_session="..."; Path=/; HttpOnly; Secure
            secure = "; Secure" if self.secure_cookie else ""
            response.headers.append(
                "set-cookie", f'{COOKIE}="{ctx.new_token}"; Path=/; HttpOnly{secure}'
            )
        return response

"""``--api``: build the chosen transport, or for ``auto`` probe once and pick one.

``auto`` prefers the transport with the fewest guest operations per command: VI/JSON
(listings with attributes, open = one call), then SOAP (the same calls; every vCenter and
ESXi host), then REST (a stat per listed entry), whose transfer form (released or
preview) is found at the first open. The probe sends at most two anonymous requests,
each vim25's ``RetrieveServiceContent``:

1. ``POST /sdk/vim25/8.0.1.0/ServiceInstance/ServiceInstance/RetrieveServiceContent``
   (VI/JSON; vCenter 8.0 U1+),
2. ``POST /sdk`` with the SOAP envelope of the same call (``about.apiType`` tells a
   vCenter, whose VMs are then looked up over ``/api``, from a standalone ESXi host).

An answer that is not the expected one (404, HTML, a fault) moves on to the next; a TLS
or connection failure stops the mount, as it would on any transport.
"""

from __future__ import annotations

import json
from typing import Any

from guestfs_mount.errors import ProtocolError

from . import soap, vi_json
from .rest import RestTransport
from .session import Http
from .transport import Transport

__all__ = ["choose"]


def _about(content: Any) -> dict[str, Any]:
    about = content.get("about") if isinstance(content, dict) else None
    return about if isinstance(about, dict) else {}


def _version(content: Any) -> str:
    about = _about(content)
    name = str(about.get("fullName") or about.get("name") or "")[:80]
    return "".join(c for c in name if c.isprintable()) or "unknown version"


async def _probe_vi_json(http: Http) -> tuple[Any, str]:
    try:
        reply = await http.send(
            "POST", http.server.base_url + vi_json.probe_path(), name="probe.vi-json",
            desc="probe VI/JSON", headers={"Accept": "application/json"},
        )  # fmt: skip
    except ProtocolError as e:
        return None, str(e)
    if reply.status != 200:
        return None, f"HTTP {reply.status}"
    try:
        content = json.loads(reply.content)
    except (ValueError, RecursionError):
        return None, "answer is not JSON"
    if not isinstance(content, dict) or not isinstance(content.get("guestOperationsManager"), dict):
        return None, "no guestOperationsManager in the service content"
    return content, ""


async def _probe_soap(http: Http) -> tuple[Any, str]:
    try:
        reply = await http.send(
            "POST", http.server.base_url + "/sdk", name="probe.soap", desc="probe SOAP",
            headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": soap.SOAP_ACTION},
            content=soap.service_content_request(),
        )  # fmt: skip
        if reply.status != 200:
            return None, f"HTTP {reply.status}"
        kind, content = soap.read_envelope(reply.content, "probe SOAP")
    except ProtocolError as e:
        return None, str(e)
    if kind != "result" or not isinstance(content, dict):
        return None, "no service content"
    if not isinstance(content.get("guestOperationsManager"), dict):
        return None, "no guestOperationsManager in the service content"
    return content, ""


def _soap(http: Http, content: Any) -> Transport:
    host_agent = _about(content).get("apiType") == "HostAgent"
    lookup = None if host_agent else RestTransport(http, form="released")
    return soap.SoapTransport(http, lookup=lookup, content=content)


async def choose(http: Http, api: str) -> tuple[Transport, str]:
    """The transport for ``api`` (one of ``session.API_CHOICES``) and why it was chosen."""
    if api == "rest":
        return RestTransport(http, form="released"), "chosen with --api rest"
    if api == "preview":
        return RestTransport(http, form="preview"), "chosen with --api preview"
    if api == "vi-json":
        return vi_json.ViJsonTransport(
            http, lookup=RestTransport(http)
        ), "chosen with --api vi-json"
    if api == "soap":
        content, _ = await _probe_soap(http)
        if content is None:  # let the first call report what the server answers
            return soap.SoapTransport(http, lookup=RestTransport(http)), "chosen with --api soap"
        return _soap(http, content), "chosen with --api soap"
    content, why_not_json = await _probe_vi_json(http)
    if content is not None:
        return (
            vi_json.ViJsonTransport(http, lookup=RestTransport(http), content=content),
            f"auto: {_version(content)} answers VI/JSON (release {vi_json.RELEASE}):"
            " listings with attributes, one call per open",
        )
    content, why_not_soap = await _probe_soap(http)
    if content is not None:
        kind = (
            "standalone ESXi host" if _about(content).get("apiType") == "HostAgent" else "vCenter"
        )
        return (
            _soap(http, content),
            f"auto: {_version(content)} ({kind}) answers SOAP at /sdk but not VI/JSON"
            f" ({why_not_json}): listings with attributes, one call per open",
        )
    return (
        RestTransport(http),
        f"auto: no vim25 endpoint (VI/JSON: {why_not_json}; SOAP: {why_not_soap}); using /api,"
        " transfer form found at the first open",
    )

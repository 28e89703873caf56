"""VI/JSON (vCenter 8.0 U1+): ``/sdk/vim25/{release}/{MoType}/{moId}/{Method|property}``.

``POST`` invokes a method with a JSON body of its ``*RequestType``; ``GET`` reads a property.
The session id travels in the ``vmware-api-session-id`` header that ``Login`` answers with.
Faults are HTTP 500 with the fault object (``_typeName`` names the fault type). Shapes:
``../shared/specs/vi-json-guestfile-subset.json``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .vapi import JsonResponse
from .vim_data import (
    PARAMS,
    VI_JSON_RELEASES,
    AnyValue,
    Data,
    DateTime,
    PropertySpec,
    Value,
)
from .vim_endpoint import VimApp
from .vim_faults import MoRef, VimFault, invalid_argument, invalid_request

log = logging.getLogger("guestfs_mount.sim.vim_json")

SESSION_HEADER = "vmware-api-session-id"
PREFIX = "/sdk/vim25/"
# Properties readable without a session (the spec's ``security: [{Session: []}, {}]``).
ANONYMOUS_PROPERTIES = frozenset(
    {
        ("GuestOperationsManager", "fileManager"),
        ("GuestOperationsManager", "authManager"),
        ("ServiceInstance", "content"),
    }
)
PRIMITIVES = {"string", "boolean", "int", "long", "dateTime"}


def to_json(value: Value) -> Any:
    """A vim25 value in its VI/JSON form (every data object carries ``_typeName``)."""
    if isinstance(value, Data):
        out: dict[str, Any] = {"_typeName": value.type_name}
        for name, v in value.fields:
            if v is not None:
                out[name] = to_json(v)
        return out
    if isinstance(value, MoRef):
        return {"_typeName": "ManagedObjectReference", "type": value.type, "value": value.value}
    if isinstance(value, DateTime):
        return value.text()
    if isinstance(value, AnyValue):
        inner = to_json(value.value)
        if isinstance(value.value, (Data, MoRef)):
            return inner
        return {"_typeName": value.type_name, "_value": inner}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def fault_json(fault: VimFault) -> dict[str, Any]:
    out: dict[str, Any] = {"_typeName": fault.type_name}
    for name, v in fault.fields:
        out[name] = to_json(v)
    out["faultMessage"] = [
        {
            "_typeName": "LocalizableMessage",
            "key": f"vim.fault.{fault.type_name}",
            "message": fault.message,
        }
    ]
    return out


def _moref(value: Any, name: str) -> MoRef:
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("type"), str)
        or not isinstance(value.get("value"), str)
        or value.get("_typeName", "ManagedObjectReference") != "ManagedObjectReference"
    ):
        raise invalid_argument(name, f"'{name}' must be a ManagedObjectReference.")
    return MoRef(value["type"], value["value"])


def _specs(value: Any) -> list[PropertySpec]:
    if not isinstance(value, list) or not value:
        raise invalid_argument("specSet")
    specs = []
    for spec in value:
        if not isinstance(spec, dict):
            raise invalid_argument("specSet")
        props = []
        for ps in spec.get("propSet") or []:
            paths = ps.get("pathSet") or [] if isinstance(ps, dict) else None
            if not isinstance(ps, dict) or not isinstance(ps.get("type"), str):
                raise invalid_argument("specSet.propSet")
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise invalid_argument("specSet.propSet.pathSet")
            props.append((ps["type"], paths))
        objs = []
        for os_ in spec.get("objectSet") or []:
            if not isinstance(os_, dict):
                raise invalid_argument("specSet.objectSet")
            objs.append(
                (_moref(os_.get("obj"), "obj"), os_.get("skip") is True, bool(os_.get("selectSet")))
            )
        specs.append(PropertySpec(props, objs))
    return specs


def params_from_json(method: str, body: dict[str, Any]) -> dict[str, Any]:
    """Check and convert a request body against the method's parameter kinds."""
    kinds = PARAMS[method]
    known = {name for name, _k, _r in kinds}
    extra = set(body) - known - {"_typeName"}
    if extra:
        raise invalid_argument(sorted(extra)[0], f"Unknown parameter {sorted(extra)[0]!r}.")
    out: dict[str, Any] = {}
    for name, kind, required in kinds:
        value = body.get(name)
        if value is None:
            if required:
                raise invalid_argument(name, f"Required parameter '{name}' is missing.")
            continue
        if kind == "moref":
            out[name] = _moref(value, name)
        elif kind == "auth":
            if not isinstance(value, dict) or not isinstance(value.get("_typeName"), str):
                raise invalid_argument(
                    name, "'auth' needs a '_typeName' (e.g. NamePasswordAuthentication)."
                )
            out[name] = value
        elif kind == "string":
            if not isinstance(value, str):
                raise invalid_argument(name, f"'{name}' must be a string.")
            out[name] = value
        elif kind == "int":
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not -(2**31) <= value < 2**31
            ):
                raise invalid_argument(name, f"'{name}' must be an int32.")
            out[name] = value
        elif kind == "bool":
            if not isinstance(value, bool):
                raise invalid_argument(name, f"'{name}' must be a boolean.")
            out[name] = value
        elif kind == "strings":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise invalid_argument(name, f"'{name}' must be an array of strings.")
            out[name] = value
        elif kind == "specSet":
            out[name] = _specs(value)
        else:
            out[name] = value
    return out


class ViJsonApp(VimApp):
    """ASGI app for ``/sdk/vim25/...``."""

    transport = "vi-json"

    async def handle(self, request: Request) -> Response:
        parts = request.url.path[len(PREFIX) :].split("/")
        if len(parts) != 4 or parts[0] not in VI_JSON_RELEASES or not all(parts):
            return JsonResponse({"error": "no such VI/JSON resource"}, status_code=404)
        _release, mo_type, mo_id, member = parts
        this = MoRef(mo_type, mo_id)
        ctx = self.context(request, request.headers.get(SESSION_HEADER))
        self.count(member)
        try:
            if request.method == "GET":
                if (mo_type, member) not in ANONYMOUS_PROPERTIES:
                    self.service.check_session(ctx)
                return JsonResponse(to_json(self.service.get_property(this, member)))
            if request.method != "POST":
                return JsonResponse({"error": "method not allowed"}, status_code=405)
            if member not in PARAMS:
                return JsonResponse({"error": f"no such method {member}"}, status_code=404)
            self.service.lookup(this, member)
            body = await self._body(request)
            params = params_from_json(member, body)
            result = await self.service.invoke(ctx, member, this, params)
        except VimFault as fault:
            if not fault.is_a("FileFault"):
                log.info("vi-json %s %s/%s -> %s", request.method, mo_type, member, fault.type_name)
            return JsonResponse(fault_json(fault), status_code=500)
        headers = {SESSION_HEADER: ctx.new_token} if ctx.new_token else None
        if result is None:
            return Response(status_code=204, headers=headers)
        return JsonResponse(to_json(result), headers=headers)

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await self.read_body(request)
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_request(f"Request body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise invalid_request("Request body must be a JSON object.")
        return value

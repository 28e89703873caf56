"""Mount the vim25 endpoints (SOAP ``/sdk``, VI/JSON ``/sdk/vim25/...``) beside the vCenter
listener's ``/api``, and ``--as-esxi``: a standalone host that serves ``/sdk`` only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .state import SimState
from .vim_json import ViJsonApp
from .vim_ops import VimService
from .vim_soap import SoapApp


@dataclass
class VimOptions:
    as_esxi: bool = False  # look like a standalone ESXi host: SOAP only, apiType HostAgent
    soap: bool = True
    vi_json: bool = True  # never served with as_esxi (ESXi has no VI/JSON)

    def apis(self) -> list[str]:
        """The APIs of the vCenter listener, for the ready line."""
        out = [] if self.as_esxi else ["rest"]
        if self.soap:
            out.append("soap")
        if self.vi_json and not self.as_esxi:
            out.append("vi-json")
        return out


def counter(state: SimState, transport: str) -> Callable[[str], None]:
    """Count one call of ``method`` on ``transport`` in the state's statistics."""

    def count(method: str) -> None:
        state.stats.calls[f"{transport}.{method}"] += 1

    return count


async def _not_found(send: Any) -> None:
    body = b"not found\n"
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def wrap_vim(app: Any, state: SimState, options: VimOptions, tls: bool) -> Any:
    """The vCenter listener's ASGI app with the vim25 endpoints in front of it."""
    service = VimService(state, esxi=options.as_esxi)
    soap = SoapApp(service, counter(state, "soap"), secure_cookie=tls) if options.soap else None
    vi_json = (
        ViJsonApp(service, counter(state, "vi-json"))
        if options.vi_json and not options.as_esxi
        else None
    )

    async def api_faults() -> None:
        # stall_api / api_latency hold every API endpoint, /sdk as well as /api.
        await state.faults.hold_api()

    async def vim_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/sdk" or path.startswith("/sdk/"):
                await api_faults()
            if path.startswith("/sdk/vim25/"):
                await (vi_json or _NotFound())(scope, receive, send)
                return
            if path == "/sdk" or path.startswith("/sdk/"):
                await (soap or _NotFound())(scope, receive, send)
                return
            if options.as_esxi and (
                path in ("/api", "/rest") or path.startswith(("/api/", "/rest/"))
            ):
                await _not_found(send)
                return
        await app(scope, receive, send)

    return vim_app


class _NotFound:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await _not_found(send)

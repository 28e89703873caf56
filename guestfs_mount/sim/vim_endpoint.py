"""The base of the simulator's two vim25 endpoints (VI/JSON, SOAP): the ASGI entry, the
call context of a request and reading a request body within its cap. Each endpoint
(:mod:`.vim_json`, :mod:`.vim_soap`) knows only its wire format; :mod:`.vim_app` mounts
them."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .vim_faults import invalid_request
from .vim_ops import CallContext, VimService

MAX_BODY = 1024 * 1024


class VimApp:
    """An ASGI app over the shared :class:`VimService`; ``count(name)`` counts a call."""

    transport = ""  # CallContext's: "vi-json" or "soap"

    def __init__(self, service: VimService, count: Any) -> None:
        self.service = service
        self.count = count

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        raise NotImplementedError

    def context(self, request: Request, token: str | None) -> CallContext:
        return CallContext(
            self.transport,
            token,
            client=request.client.host if request.client else "",
            user_agent=request.headers.get("user-agent", ""),
        )

    async def read_body(self, request: Request) -> bytes:
        raw = b""
        too_big = False
        async for chunk in request.stream():
            # an oversized body is read to its end but not kept, so that the client
            # sees the fault rather than a connection reset mid-upload
            if not too_big:
                raw += chunk
                too_big = len(raw) > MAX_BODY
        if too_big:
            raise invalid_request("Request body too large.")
        return raw

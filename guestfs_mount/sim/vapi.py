"""vAPI wire details shared by the simulator's apps: error bodies and JSON encoding.

The ``/api`` error body is the error structure itself (spec ``VapiStdErrors*``)::

    {"error_type": "NOT_FOUND",
     "messages": [{"id": "...", "default_message": "...", "args": ["..."]}],
     "data": {"reason": "FILE_NOT_FOUND", "file_path": "/x"}}

JSON is always encoded with ``ensure_ascii=True`` so that guest names carrying lone
surrogates (non-UTF-8 bytes decoded with ``surrogateescape``) travel as ``\\udcXX``
escapes instead of making the encoder fail.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import Response

# error_type -> HTTP status on /api (the aggregated table of the 7.0.3 spec).
STATUS_OF: dict[str, int] = {
    "ALREADY_EXISTS": 400,
    "INVALID_ARGUMENT": 400,
    "NOT_ALLOWED_IN_CURRENT_STATE": 400,
    "UNSUPPORTED": 400,
    "UNAUTHENTICATED": 401,
    "UNAUTHORIZED": 403,
    "NOT_FOUND": 404,
    "OPERATION_NOT_FOUND": 404,
    "ERROR": 500,
    "RESOURCE_BUSY": 500,
    "UNABLE_TO_ALLOCATE_RESOURCE": 500,
    "SERVICE_UNAVAILABLE": 503,
}

# FileErrorDetails.reason values (Vcenter.Vm.Guest.Filesystem.ErrorReason).
NOT_A_FILE = "NOT_A_FILE"
NOT_A_DIRECTORY = "NOT_A_DIRECTORY"
PATH_TOO_LONG = "PATH_TOO_LONG"
FILE_NOT_FOUND = "FILE_NOT_FOUND"


class VapiError(Exception):
    """An error the simulator answers with a vAPI error body."""

    def __init__(
        self,
        error_type: str,
        default_message: str,
        *,
        msg_id: str | None = None,
        args: Sequence[str] = (),
        data: Mapping[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{error_type}: {default_message}")
        self.error_type = error_type
        self.default_message = default_message
        self.msg_id = msg_id or f"com.vmware.vapi.std.errors.{error_type.lower()}"
        self.args_ = [str(a) for a in args]
        self.data = dict(data) if data is not None else None
        self.status = status if status is not None else STATUS_OF.get(error_type, 500)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "error_type": self.error_type,
            "messages": [
                {"id": self.msg_id, "default_message": self.default_message, "args": self.args_}
            ],
        }
        if self.data is not None:
            out["data"] = self.data
        return out


def file_error(error_type: str, reason: str, path: str, message: str) -> VapiError:
    """An error carrying ``FileErrorDetails`` in ``data``."""
    return VapiError(
        error_type,
        message,
        msg_id=f"com.vmware.api.vcenter.vm.guest.filesystem.{reason.lower()}",
        args=[path],
        data={"reason": reason, "file_path": path},
    )


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class JsonResponse(Response):
    """JSON with ``ensure_ascii=True`` (Starlette's JSONResponse is strict UTF-8)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(err: VapiError) -> JsonResponse:
    return JsonResponse(err.body(), status_code=err.status)


def operation_not_found() -> VapiError:
    return VapiError(
        "OPERATION_NOT_FOUND",
        "Unable to find operations for URL",
        msg_id="vapi.rest.operation.not_found",
    )

"""vim25 faults of the simulator's SOAP and VI/JSON endpoints, and how the shared state's
vAPI errors map to them.

The state raises :class:`~.vapi.VapiError` (the ``/api`` vocabulary); a vim25 client sees
the fault a real vCenter or ESXi host sends for the same condition
(``../shared/specs/vim-guestfile-soap.md`` §6, ``vi-json-guestfile-subset.json``):

=======================================  ==========================================
state error                              vim25 fault
=======================================  ==========================================
UNAUTHENTICATED ``invalid_guest_login``  ``InvalidGuestLogin``
UNAUTHENTICATED (session)                ``NotAuthenticated``
NOT_FOUND ``FILE_NOT_FOUND``             ``FileNotFound{file}``
INVALID_ARGUMENT ``NOT_A_FILE``          ``NotAFile{file}``
UNAUTHORIZED (subtree, EACCES)           ``GuestPermissionDenied``
NOT_FOUND (VM)                           ``ManagedObjectNotFound{obj}``
NOT_ALLOWED_IN_CURRENT_STATE (power)     ``InvalidPowerState{requestedState, existingState}``
NOT_ALLOWED_IN_CURRENT_STATE (other)     ``InvalidState``
RESOURCE_BUSY                            ``InvalidState`` (what users report, real-guest-ops §1)
SERVICE_UNAVAILABLE                      ``GuestOperationsUnavailable``
INVALID_ARGUMENT (other)                 ``InvalidArgument{invalidProperty}``
anything else                            ``GuestOperationsFault``
=======================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .vapi import FILE_NOT_FOUND, NOT_A_FILE, VapiError

# Parent of each fault type the simulator raises (for clients that catch a base class,
# and for the SOAP ``faultcode``-independent detail element name).
PARENT: dict[str, str] = {
    "MethodFault": "",
    "RuntimeFault": "MethodFault",
    "VimFault": "MethodFault",
    "InvalidArgument": "RuntimeFault",
    "InvalidRequest": "RuntimeFault",
    "ManagedObjectNotFound": "RuntimeFault",
    "MethodNotFound": "InvalidRequest",
    "SecurityError": "RuntimeFault",
    "NoPermission": "SecurityError",
    "NotAuthenticated": "NoPermission",
    "InvalidLogin": "VimFault",
    "InvalidState": "VimFault",
    "InvalidPowerState": "InvalidState",
    "TaskInProgress": "VimFault",
    "FileFault": "VimFault",
    "FileNotFound": "FileFault",
    "NotAFile": "FileFault",
    "GuestOperationsFault": "VimFault",
    "GuestOperationsUnavailable": "GuestOperationsFault",
    "GuestPermissionDenied": "GuestOperationsFault",
    "InvalidGuestLogin": "GuestOperationsFault",
}

POWER_STATE = {"POWERED_ON": "poweredOn", "POWERED_OFF": "poweredOff", "SUSPENDED": "suspended"}


@dataclass(frozen=True)
class MoRef:
    type: str
    value: str


FieldValue = str | int | bool | MoRef


@dataclass
class VimFault(Exception):
    """A fault answered to a vim25 call: its type, message and fields (in XSD order)."""

    type_name: str
    message: str
    fields: Sequence[tuple[str, FieldValue]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        super().__init__(f"{self.type_name}: {self.message}")

    def is_a(self, base: str) -> bool:
        t: str | None = self.type_name
        while t:
            if t == base:
                return True
            t = PARENT.get(t)
        return False


def not_authenticated() -> VimFault:
    return VimFault(
        "NotAuthenticated",
        "The session is not authenticated.",
        (("object", MoRef("SessionManager", "SessionManager")), ("privilegeId", "System.View")),
    )


def invalid_argument(prop: str, message: str | None = None) -> VimFault:
    return VimFault(
        "InvalidArgument",
        message or f"A specified parameter was not correct: {prop}",
        (("invalidProperty", prop),),
    )


def invalid_request(message: str) -> VimFault:
    return VimFault("InvalidRequest", message)


def method_not_found(mo_type: str, method: str) -> VimFault:
    return VimFault(
        "MethodNotFound",
        f"Method {method} of {mo_type} is not served here.",
        (("receiver", MoRef(mo_type, mo_type)), ("method", method)),
    )


def object_not_found(ref: MoRef) -> VimFault:
    return VimFault(
        "ManagedObjectNotFound",
        "The object has already been deleted or has not been completely created",
        (("obj", ref),),
    )


def from_vapi(err: VapiError, vm_id: str | None = None, path_param: str = "filePath") -> VimFault:
    """The vim25 fault a real server sends where the REST API answers ``err``."""
    etype, msg_id, data = err.error_type, err.msg_id, err.data or {}
    message = err.default_message
    reason = data.get("reason")
    if reason == FILE_NOT_FOUND:
        return VimFault("FileNotFound", message, (("file", str(data.get("file_path", ""))),))
    if reason == NOT_A_FILE:
        return VimFault("NotAFile", message, (("file", str(data.get("file_path", ""))),))
    if etype == "UNAUTHENTICATED":
        if msg_id.endswith("invalid_guest_login"):
            return VimFault("InvalidGuestLogin", message)
        return not_authenticated()
    if etype == "UNAUTHORIZED":
        return VimFault("GuestPermissionDenied", message)
    if etype == "NOT_FOUND" and vm_id is not None and msg_id.endswith("vm.not_found"):
        return object_not_found(MoRef("VirtualMachine", vm_id))
    if etype == "NOT_ALLOWED_IN_CURRENT_STATE":
        if msg_id.endswith("guest.not_running") and len(err.args_) >= 2:
            existing = POWER_STATE.get(err.args_[1], "poweredOff")
            return VimFault(
                "InvalidPowerState",
                message,
                (("requestedState", "poweredOn"), ("existingState", existing)),
            )
        return VimFault("InvalidState", message)
    if etype == "RESOURCE_BUSY":
        return VimFault("InvalidState", message)
    if etype == "SERVICE_UNAVAILABLE":
        return VimFault("GuestOperationsUnavailable", message)
    if etype == "INVALID_ARGUMENT":
        prop = "matchPattern" if msg_id.endswith("invalid_pattern") else path_param
        if err.args_ and err.args_[0].startswith("credentials"):
            prop = "auth"
        return invalid_argument(prop, message)
    return VimFault("GuestOperationsFault", message)

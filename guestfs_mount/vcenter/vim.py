"""What the two vim25 transports (VI/JSON and SOAP) share: reading their answers, and
the guest operations themselves (:class:`GuestOps`), written once over each transport's
``_guest_call``.

Both carry the same data objects; :mod:`.soap` turns its XML into the JSON shape of
VI/JSON (objects as dicts with ``_typeName``, leaf values as strings), so one set of
readers here turns ``GuestListFileInfo``, ``GuestFileInfo``, ``FileTransferInformation``
and faults into the model types and the error tree. Every value is untrusted: wrong
types, absurd numbers, hostile names give :class:`ProtocolError` or a skipped entry.

The fault table maps vim fault types to the same classes (so the same errnos) as their
REST equivalents: ``InvalidGuestLogin`` is the REST guest UNAUTHENTICATED, ``NotAFile``
the REST INVALID_ARGUMENT with reason NOT_A_FILE (EISDIR), and so on.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from guestfs_mount.errors import (
    ApiError,
    GuestAuthFailed,
    InvalidArgument,
    NotAllowedInCurrentState,
    NotFound,
    ProtocolError,
    ResourceBusy,
    ServiceUnavailable,
    Unauthenticated,
    Unauthorized,
    Unsupported,
)
from guestfs_mount.model import (
    CredentialType,
    DirEntry,
    FilesystemFamily,
    FileType,
    GuestCredentials,
    GuestStat,
)

from .guestauth import guest_credentials
from .parse import DOT_NAMES, INT64_MAX, name_problem, parse_timestamp, parse_transfer_url
from .session import Http, SessionSlot, show
from .transport import OpenedTransfer, Page

__all__ = [
    "GuestOps",
    "fault_error",
    "file_name_pattern",
    "guest_auth",
    "moref",
    "parse_list",
    "parse_transfer",
    "split_guest_path",
]

_TYPES = {"file": FileType.FILE, "directory": FileType.DIRECTORY, "symlink": FileType.SYMLINK}
_INT = re.compile(r"-?[0-9]{1,20}", re.ASCII)
MAX_FILES = 100_000  # entries in one page, whatever the server claims

# vim fault type -> (class, REST error type it stands for, FileErrorDetails.reason)
_FAULTS: dict[str, tuple[type[ApiError], str | None]] = {
    "InvalidGuestLogin": (GuestAuthFailed, None),
    "GuestPermissionDenied": (Unauthorized, None),
    "NoPermission": (Unauthorized, None),
    "FileNotFound": (NotFound, None),
    "NotAFile": (InvalidArgument, "NOT_A_FILE"),
    "InvalidArgument": (InvalidArgument, None),
    "GuestOperationsUnavailable": (ServiceUnavailable, None),
    # A guest busy with another operation answers InvalidState (real-guest-ops.md §1):
    # transient, retried like REST's RESOURCE_BUSY. InvalidPowerState stays final.
    "InvalidState": (ResourceBusy, None),
    "InvalidPowerState": (NotAllowedInCurrentState, None),
    "TaskInProgress": (ResourceBusy, None),
    "InvalidLogin": (Unauthenticated, None),
    "NotAuthenticated": (Unauthenticated, None),
    "GuestComponentsOutOfDate": (Unsupported, None),
    "OperationNotSupportedByGuest": (Unsupported, None),
    "OperationDisabledByGuest": (Unsupported, None),
}
_FAULT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,63}", re.ASCII)


def fault_error(
    type_name: str, message: str, *, desc: str, status: int | None, path: str | None
) -> ApiError:
    """The exception for a vim fault (``type_name`` already checked by :func:`fault_name`)."""
    cls, reason = _FAULTS.get(type_name, (ApiError, None))
    data = {"reason": reason} if reason else None
    text = f"{desc} failed: {type_name}" + (f": {message}" if message else "")
    if type_name == "InvalidPowerState":
        # Guest operations need a running VM; say so in the user's words, as REST does.
        text = f"{desc} failed: the VM is powered off or suspended ({type_name})"
    return cls(
        text,
        status=status,
        error_type=type_name,
        messages=(message,) if message else (),
        data=data,
        path=path,
    )


def fault_name(v: Any) -> str | None:
    """A fault type name from ``_typeName``/``xsi:type`` (prefix dropped), or None."""
    if not isinstance(v, str):
        return None
    v = v.rpartition(":")[2]
    if v.endswith("Fault") and v[:-5] in _FAULTS:
        v = v[:-5]
    return v if _FAULT_NAME.fullmatch(v) else None


# --- requests -----------------------------------------------------------------------------


def guest_auth(g: GuestCredentials) -> dict[str, Any]:
    """The ``auth`` argument (``NamePasswordAuthentication`` or ``SAMLTokenAuthentication``)
    in VI/JSON form; :mod:`.soap` writes the same fields as XML, in this order."""
    if g.type is CredentialType.SAML_BEARER_TOKEN:
        out: dict[str, Any] = {
            "_typeName": "SAMLTokenAuthentication",
            "interactiveSession": g.interactive_session,
            "token": g.saml_token or "",
        }
        if g.user_name is not None:
            out["username"] = g.user_name
        return out
    return {
        "_typeName": "NamePasswordAuthentication",
        "interactiveSession": g.interactive_session,
        "username": g.user_name or "",
        "password": g.password or "",
    }


def split_guest_path(path: str) -> tuple[str, str] | None:
    """``(parent, name)`` of a guest path, None for a root (``/``, ``C:\\``)."""
    trimmed = path.rstrip("/\\") if len(path) > 1 else path
    cut = max(trimmed.rfind("/"), trimmed.rfind("\\"))
    if cut < 0 or cut == len(trimmed) - 1:
        return None
    name = trimmed[cut + 1 :]
    parent = trimmed[: cut + 1]
    if len(parent) > 1 and not re.fullmatch(r"[A-Za-z]:[\\/]", parent):
        parent = parent[:-1]
    return parent, name


def file_name_pattern(name: str) -> str:
    """A ``matchPattern`` (PCRE) that matches exactly ``name``."""
    return "^" + re.escape(name) + "$"


# --- answers ------------------------------------------------------------------------------


def _obj(v: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ProtocolError(f"{what}: expected an object, got {type(v).__name__}")
    return v


def _int(v: Any, what: str, *, lo: int = 0, hi: int = INT64_MAX) -> int:
    # VI/JSON sends numbers, SOAP sends their text; bool is an int subclass: refused.
    if isinstance(v, str) and _INT.fullmatch(v.strip()):
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{what}: expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{what}: integer {v if abs(v) < 10**30 else '(huge)'} out of range")
    return v


def _bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise ProtocolError(f"{what}: expected a boolean")


def _time(a: Mapping[str, Any], key: str) -> int:
    v = a.get(key)
    return 0 if v is None else parse_timestamp(v, key)


def _uid(v: Any, what: str) -> int:
    # xsd:int: a uid above 2**31 arrives negative.
    return _int(v, what, lo=-(2**31), hi=2**32 - 1) & 0xFFFFFFFF


def to_stat(ftype: Any, size: Any, attributes: Any, what: str) -> GuestStat:
    """A ``GuestStat`` from a file's type, size and ``GuestFileAttributes``."""
    if not isinstance(ftype, str) or ftype not in _TYPES:
        raise ProtocolError(f"{what}: unknown type")
    a = _obj(attributes, what + " attributes")
    typename = str(a.get("_typeName") or "").rpartition(":")[2]
    target = a.get("symlinkTarget")
    if target is not None and (
        not isinstance(target, str) or len(target) > 8192 or "\x00" in target
    ):
        raise ProtocolError(f"{what}: invalid symlinkTarget")
    common: dict[str, Any] = dict(
        type=_TYPES[ftype],
        size=_int(size, what + " size"),
        mtime_ns=_time(a, "modificationTime"),
        atime_ns=_time(a, "accessTime"),
        symlink_target=target or None,
    )
    if typename == "GuestWindowsFileAttributes":
        created = a.get("createTime")
        return GuestStat(
            family=FilesystemFamily.WINDOWS,
            hidden=_bool(a["hidden"], "hidden") if a.get("hidden") is not None else None,
            read_only=(_bool(a["readOnly"], "readOnly") if a.get("readOnly") is not None else None),
            created_ns=None if created is None else parse_timestamp(created, "createTime"),
            **common,
        )
    owner = a.get("ownerId")
    group = a.get("groupId")
    perms = a.get("permissions")
    return GuestStat(
        family=FilesystemFamily.POSIX,
        owner=None if owner is None else _uid(owner, "ownerId"),
        group=None if group is None else _uid(group, "groupId"),
        # stat(2) st_mode with the file-type bits; the model keeps the chmod(2) bits.
        permissions=None if perms is None else _int(perms, "permissions") & 0o7777,
        **common,
    )


def entry_name(raw: Any, listed: str) -> str | None:
    """Guests send the bare name; a server that sends ``dir/name`` gets it trimmed."""
    if not isinstance(raw, str):
        return None
    for sep in ("/", "\\"):
        prefix = listed.rstrip(sep) + sep
        if raw.startswith(prefix) and len(raw) > len(prefix):
            return raw[len(prefix) :]
    return raw


def parse_list(data: Any, listed: str) -> Page:
    """A ``GuestListFileInfo``: structure errors raise, hostile entries are skipped,
    ``.`` and ``..`` are skipped silently (every guest lists them first)."""
    w = "file list"
    d = _obj(data, w)
    if "remaining" not in d:
        raise ProtocolError(f"{w}: missing required field 'remaining'")
    remaining = _int(d["remaining"], w + " remaining", hi=2**31 - 1)
    files = d.get("files") or []
    if isinstance(files, Mapping):
        files = [files]
    if not isinstance(files, list):
        raise ProtocolError(f"{w}: 'files' is not an array")
    if len(files) > MAX_FILES:
        raise ProtocolError(f"{w}: more than {MAX_FILES} entries in one page")
    entries: list[DirEntry] = []
    skipped: list[str] = []
    for item in files:
        if not isinstance(item, Mapping):
            skipped.append(f"entry is a {type(item).__name__}, not an object")
            continue
        name = entry_name(item.get("path"), listed)
        if name is None:
            skipped.append("path missing or not a string")
            continue
        if name in DOT_NAMES:
            continue
        problem = name_problem(name)
        if problem is not None:
            skipped.append(problem)
            continue
        try:
            st = to_stat(
                item.get("type"), item.get("size"), item.get("attributes"), repr(name[:60])
            )
        except ProtocolError as e:
            skipped.append(str(e))
            continue
        entries.append(DirEntry(name=name, type=st.type, size=st.size, stat=st))
    return Page(
        entries=tuple(entries),
        raw_count=len(files),
        skipped=tuple(skipped),
        end=remaining == 0,
        remaining=remaining,
    )


def parse_transfer(data: Any) -> OpenedTransfer:
    """A ``FileTransferInformation``: the URL with the file's attributes."""
    w = "file transfer information"
    d = _obj(data, w)
    url = parse_transfer_url(d.get("url"))
    st = to_stat("file", d.get("size"), d.get("attributes") or {}, w)
    return OpenedTransfer(url=url, stat=st)


def moref(mo_type: str, value: str) -> dict[str, str]:
    """A ``ManagedObjectReference`` in VI/JSON form (:mod:`.soap` writes it as XML)."""
    return {"_typeName": "ManagedObjectReference", "type": mo_type, "value": value}


def moref_value(v: Any, what: str) -> str:
    """The id of a ``ManagedObjectReference``."""
    d = _obj(v, what)
    value = d.get("value")
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", value):
        raise ProtocolError(f"{what}: invalid managed object id")
    return value


class GuestOps(abc.ABC):
    """The guest operations of a vim25 transport (each one ``_guest_call``: a method of the
    GuestFileManager or GuestAuthManager with the ``vm`` and guest ``auth`` arguments) and
    the session handling of every call (:meth:`_session_call`), written once; a subclass
    knows only its wire format (``_invoke``, ``_managers``, ``_login_once``)."""

    http: Http
    slot: SessionSlot

    @abc.abstractmethod
    async def _login_once(self) -> None:
        """One login attempt; sets ``slot``'s token."""

    async def _session_call(
        self, send: Callable[[str | None], Awaitable[Any]], desc: str, *, retry: bool, what: str
    ) -> Any:
        """``send(token)``'s answer, or the error it raises; logged in first if need be,
        and once more (the session expired) when the answer is ``NotAuthenticated``;
        retried on transient errors with ``retry``. ``what`` names the session in the log."""

        async def once() -> Any:
            await self.slot.ensure(self._login_once)
            relogged = False
            while True:
                gen = self.slot.gen
                try:
                    return await send(self.slot.token)
                except ApiError as err:
                    if err.type_name != "NotAuthenticated" or relogged:
                        raise
                await self.slot.renew(gen, self._login_once, self.http.stats, what)
                relogged = True

        if retry:
            return await self.http.retry(once, desc)
        return await once()

    @abc.abstractmethod
    async def _managers(self) -> tuple[str, str]:
        """The ids of the GuestFileManager and the GuestAuthManager."""

    @abc.abstractmethod
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
        """One authenticated call of ``method`` on ``this`` with ``args`` (in this order):
        the answer in VI/JSON shape, or the fault raised."""

    async def vim_call(
        self, method: str, this: Mapping[str, str], args: Mapping[str, Any], *, desc: str
    ) -> Any:
        """One authenticated call of any vim25 method (the inventory's view and property
        collector calls), its answer in VI/JSON shape."""
        return await self._invoke(method, this, args, desc=desc, guest_path=None, retry=True)

    async def _guest_call(
        self,
        method: str,
        vm: str,
        extra: Mapping[str, Any],
        *,
        desc: str,
        guest_path: str | None,
        retry: bool = True,
        manager: str = "file",
    ) -> Any:
        fm, am = await self._managers()
        this = moref("GuestFileManager", fm) if manager == "file" else moref("GuestAuthManager", am)
        args = {
            "vm": moref("VirtualMachine", vm),
            "auth": guest_auth(guest_credentials(self.http.config)),
            **extra,
        }
        return await self._invoke(method, this, args, desc=desc, guest_path=guest_path, retry=retry)

    async def check_guest(self, vm: str) -> None:
        await self._guest_call(
            "ValidateCredentialsInGuest", vm, {}, desc=f"check guest login on VM {vm}",
            guest_path=None, manager="auth",
        )  # fmt: skip

    async def list_page(self, vm: str, path: str, index: int, size: int) -> Page:
        desc = f"list {show(path)} on VM {vm}"
        data = await self._guest_call(
            "ListFilesInGuest", vm, {"filePath": path, "index": index, "maxResults": size},
            desc=desc, guest_path=path,
        )  # fmt: skip
        try:
            return parse_list(data, path)
        except ProtocolError as e:
            raise ProtocolError(f"{desc}: {e}") from e

    async def stat(self, vm: str, path: str) -> GuestStat:
        """vim25 has no stat: list the parent with a pattern that matches only the name
        (the root: its own ``.``), which returns the full attributes in one call."""
        desc = f"stat {show(path)} on VM {vm}"
        split = split_guest_path(path)
        listed, name = (path, ".") if split is None else split
        data = await self._guest_call(
            "ListFilesInGuest", vm,
            {"filePath": listed, "index": 0, "maxResults": 2,
             "matchPattern": file_name_pattern(name)},
            desc=desc, guest_path=path,
        )  # fmt: skip
        try:
            info = data if isinstance(data, dict) else {}
            files = info.get("files") or []
            if isinstance(files, dict):
                files = [files]
            for item in files if isinstance(files, list) else []:
                if isinstance(item, dict) and entry_name(item.get("path"), listed) == name:
                    return to_stat(item.get("type"), item.get("size"), item.get("attributes"), desc)
        except ProtocolError as e:
            raise ProtocolError(f"{desc}: {e}") from e
        raise NotFound(
            f"{desc} failed: FileNotFound: no such file", error_type="FileNotFound", path=path
        )

    async def open_transfer(self, vm: str, path: str) -> OpenedTransfer:
        desc = f"create transfer of {show(path)} on VM {vm}"
        data = await self._guest_call(
            "InitiateFileTransferFromGuest", vm, {"guestFilePath": path},
            desc=desc, guest_path=path, retry=False,
        )  # fmt: skip
        try:
            return parse_transfer(data)
        except ProtocolError as e:
            raise ProtocolError(f"{desc}: {e}") from e

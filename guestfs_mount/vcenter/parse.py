"""Pure parsers: vCenter JSON responses -> model types.

Every function here takes untrusted input (bytes or an already decoded JSON value) and
returns a model object or raises :class:`ProtocolError`. Nothing else may escape: the
hypothesis tests feed arbitrary JSON values to each parser.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guestfs_mount.errors import ApiError, ProtocolError, api_error_class
from guestfs_mount.model import (
    DirEntry,
    FilesystemFamily,
    FileType,
    GuestStat,
    PowerState,
    VmInfo,
)
from guestfs_mount.paths import NAME_MAX, is_safe_name

from .transport import Page

INT64_MAX = 2**63 - 1
MAX_TEXT = 64 * 1024  # longest string accepted from the server in any field
_FILE_TYPES = {t.value: t for t in FileType}
_POWER = {p.value: p for p in PowerState}
_FAMILY = {f.value: f for f in FilesystemFamily}

__all__ = [
    "INT64_MAX",
    "decode_json",
    "name_problem",
    "parse_error",
    "parse_guest_operations",
    "parse_list_page",
    "parse_power_state",
    "parse_session_token",
    "parse_stat",
    "parse_timestamp",
    "parse_tools_running",
    "parse_transfer_url",
    "parse_vm_list",
    "unwrap_value",
]


def decode_json(body: bytes, what: str) -> Any:
    """``json.loads`` that only raises ProtocolError (bad UTF-8, bad JSON, huge nesting)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{what}: response is not valid JSON") from e


def unwrap_value(data: Any) -> Any:
    """``/rest``-style replies are ``{"value": ...}``; ``/api`` replies are raw."""
    if isinstance(data, dict) and set(data) == {"value"}:
        return data["value"]
    return data


def _str(v: Any, what: str, *, max_len: int = MAX_TEXT) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{what}: expected a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise ProtocolError(f"{what}: string too long ({len(v)} characters)")
    return v


def _int(v: Any, what: str, *, lo: int = 0, hi: int = INT64_MAX) -> int:
    # bool is an int subclass: refuse it explicitly.
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{what}: expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{what}: integer {v if abs(v) < 10**30 else '(huge)'} out of range")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(f"{what}: expected a boolean, got {type(v).__name__}")
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ProtocolError(f"{what}: expected an object, got {type(v).__name__}")
    return v


def _req(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise ProtocolError(f"{what}: missing required field {key!r}")
    return d[key]


def _enum(v: Any, table: Mapping[str, Any], what: str) -> Any:
    s = _str(v, what, max_len=64)
    try:
        return table[s]
    except KeyError:
        raise ProtocolError(f"{what}: unknown value {s!r}") from None


# --- timestamps -------------------------------------------------------------------------------

_TS = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,30}))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,
)


def parse_timestamp(v: Any, what: str = "timestamp") -> int:
    """ISO 8601 date-time (any fractional digits, ``Z`` or ``±hh:mm``) -> ns since epoch.

    A time without a zone is taken as UTC (vCenter always sends ``Z``).
    """
    s = _str(v, what, max_len=80)
    m = _TS.fullmatch(s)
    if not m:
        raise ProtocolError(f"{what}: not an ISO 8601 date-time: {s!r}")
    year, mon, day, hh, mi, ss = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7) or ""
    leap = ss == 60
    if leap:
        ss = 59
    try:
        tz = _dt.timezone.utc
        if m.group(9):
            oh, om = int(m.group(10)), int(m.group(11))
            if oh > 23 or om > 59:
                raise ValueError("bad offset")
            off = _dt.timedelta(hours=oh, minutes=om)
            tz = _dt.timezone(off if m.group(9) == "+" else -off)
        d = _dt.datetime(year, mon, day, hh, mi, ss, tzinfo=tz)
    except (ValueError, OverflowError) as e:
        raise ProtocolError(f"{what}: invalid date-time {s!r}") from e
    epoch = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    delta = d - epoch
    seconds = delta.days * 86400 + delta.seconds + (1 if leap else 0)
    ns = int((frac + "000000000")[:9]) if frac else 0
    return seconds * 1_000_000_000 + ns


# --- session, VMs, state ----------------------------------------------------------------------


def parse_session_token(data: Any) -> str:
    tok = _str(unwrap_value(data), "session token", max_len=4096)
    if not tok or any(c in tok for c in "\r\n\x00"):
        raise ProtocolError("session token: empty or contains control characters")
    return tok


def parse_vm_list(data: Any) -> list[VmInfo]:
    data = unwrap_value(data)
    if not isinstance(data, list):
        raise ProtocolError(f"VM list: expected an array, got {type(data).__name__}")
    if len(data) > 100_000:
        raise ProtocolError("VM list: too many entries")
    out = []
    for i, item in enumerate(data):
        w = f"VM list entry {i}"
        d = _obj(item, w)
        out.append(
            VmInfo(
                vm=_str(_req(d, "vm", w), w + " vm", max_len=256),
                name=_str(_req(d, "name", w), w + " name", max_len=1024),
                power_state=_enum(_req(d, "power_state", w), _POWER, w + " power_state"),
            )
        )
    return out


_UUID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}")


def instance_uuid(v: Any) -> str | None:
    """A VM's instance UUID as the server gave it, or None if it is absent or not one (it
    keys a kept cache and is written into evidence: only a plain token is accepted)."""
    if isinstance(v, str) and _UUID.fullmatch(v):
        return v.lower()
    return None


def parse_vm_identity(data: Any) -> str | None:
    """``GET /api/vcenter/vm/{vm}`` (VM.Info): ``identity.instance_uuid`` (since 6.7.1)."""
    identity = _obj(unwrap_value(data), "VM info").get("identity")
    return instance_uuid(identity.get("instance_uuid")) if isinstance(identity, dict) else None


def parse_power_state(data: Any) -> PowerState:
    d = _obj(unwrap_value(data), "power info")
    result: PowerState = _enum(_req(d, "state", "power info"), _POWER, "power info state")
    return result


def parse_guest_operations(data: Any) -> bool:
    d = _obj(unwrap_value(data), "guest operations info")
    return _bool(
        _req(d, "guest_operations_ready", "guest operations info"),
        "guest_operations_ready",
    )


def parse_tools_running(data: Any) -> bool:
    d = _obj(unwrap_value(data), "tools info")
    state = _str(_req(d, "run_state", "tools info"), "tools run_state", max_len=64)
    if state not in ("NOT_RUNNING", "RUNNING", "EXECUTING_SCRIPTS"):
        raise ProtocolError(f"tools run_state: unknown value {state!r}")
    return state != "NOT_RUNNING"


# --- files ------------------------------------------------------------------------------------


DOT_NAMES = (".", "..")  # every real guest lists them first: normal, skipped silently


def name_problem(name: str) -> str | None:
    """Why a listed guest name cannot be a directory entry, or None if it can."""
    short = repr(name[:60])
    try:
        if is_safe_name(name):
            return None
    except (UnicodeError, ValueError):
        return f"name {short} cannot be encoded"
    if "/" in name or "\x00" in name:
        return f"name {short} contains '/' or NUL"
    if name == "":
        return "empty name"
    return f"name {short}... is longer than {NAME_MAX} bytes"


def _entry_problem(d: dict[str, Any]) -> tuple[DirEntry | None, str | None]:
    name = d.get("filename")
    if not isinstance(name, str):
        return None, "filename missing or not a string"
    problem = name_problem(name)
    if problem is not None:
        return None, problem
    short = repr(name[:60])
    t = d.get("type")
    if not isinstance(t, str) or t not in _FILE_TYPES:
        return None, f"{short} has unknown type"
    size = d.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= INT64_MAX:
        return None, f"{short} has invalid size"
    return DirEntry(name=name, type=_FILE_TYPES[t], size=size), None


def parse_list_page(data: Any) -> Page:
    """``files?action=list`` result. Structure errors raise; hostile entries are skipped."""
    w = "file list"
    d = _obj(unwrap_value(data), w)
    files = _req(d, "files", w)
    if not isinstance(files, list):
        raise ProtocolError(f"{w}: 'files' is not an array")
    _int(_req(d, "total", w), w + " total")  # required by the API; the paging ignores it
    status = _str(_req(d, "status", w), w + " status", max_len=64)
    if status not in ("READY", "END_OF_DATA"):
        raise ProtocolError(f"{w}: unknown status {status!r}")
    entries: list[DirEntry] = []
    skipped: list[str] = []
    for item in files:
        if not isinstance(item, dict):
            skipped.append(f"entry is a {type(item).__name__}, not an object")
            continue
        if item.get("filename") in DOT_NAMES:
            continue
        entry, problem = _entry_problem(item)
        if entry is None:
            skipped.append(problem or "invalid")
        else:
            entries.append(entry)
    return Page(
        entries=tuple(entries),
        raw_count=len(files),
        skipped=tuple(skipped),
        end=status == "END_OF_DATA",
    )


def _permissions(v: Any) -> int:
    s = _str(v, "permissions", max_len=16)
    if not s or not re.fullmatch(r"0?[0-7]{1,7}", s, re.ASCII):
        raise ProtocolError(f"permissions: not an octal string: {s!r}")
    return int(s, 8) & 0o7777


def parse_stat(data: Any) -> GuestStat:
    """``files/{path}?action=get`` result."""
    w = "file info"
    d = _obj(unwrap_value(data), w)
    ftype = _enum(_req(d, "type", w), _FILE_TYPES, w + " type")
    size = _int(_req(d, "size", w), w + " size")
    a = _obj(_req(d, "attributes", w), w + " attributes")
    mtime = parse_timestamp(_req(a, "last_modified", w), "last_modified")
    atime = parse_timestamp(_req(a, "last_accessed", w), "last_accessed")
    family = _enum(_req(a, "filesystem_family", w), _FAMILY, "filesystem_family")
    target = None
    if a.get("symlink_target") is not None:
        target = _str(a["symlink_target"], "symlink_target", max_len=8192)
        if "\x00" in target:
            raise ProtocolError("symlink_target contains NUL")
    owner = group = perms = None
    hidden = read_only = None
    created = None
    if family is FilesystemFamily.POSIX:
        p = _obj(_req(a, "posix_attributes", w), "posix_attributes")
        owner = _int(_req(p, "owner", "posix_attributes"), "owner", hi=2**32 - 1)
        group = _int(_req(p, "group", "posix_attributes"), "group", hi=2**32 - 1)
        perms = _permissions(_req(p, "permissions", "posix_attributes"))
    else:
        win = _obj(_req(a, "win_attributes", w), "win_attributes")
        hidden = _bool(_req(win, "hidden", "win_attributes"), "hidden")
        read_only = _bool(_req(win, "read_only", "win_attributes"), "read_only")
        created = parse_timestamp(_req(win, "created", "win_attributes"), "created")
    return GuestStat(
        type=ftype,
        size=size,
        mtime_ns=mtime,
        atime_ns=atime,
        family=family,
        owner=owner,
        group=group,
        permissions=perms,
        symlink_target=target,
        hidden=hidden,
        read_only=read_only,
        created_ns=created,
    )


def parse_transfer_url(data: Any) -> str:
    url = _str(unwrap_value(data), "transfer URL", max_len=8192)
    if not url or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ProtocolError("transfer URL: empty or contains spaces/control characters")
    return url


# --- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VapiError:
    error_type: str
    messages: tuple[str, ...]
    data: dict[str, Any] | None

    def exception(self, message: str, *, status: int | None, path: str | None = None) -> ApiError:
        cls = api_error_class(self.error_type)
        return cls(
            message,
            status=status,
            error_type=self.error_type,
            messages=self.messages,
            data=self.data,
            path=path,
        )


def parse_error(body: bytes) -> VapiError | None:
    """A vAPI error body (``/api`` raw or ``/rest`` ``{"type", "value"}``), or None if the
    body is not one (HTML from a proxy, empty, ...). Never raises."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict) and "error_type" not in data and isinstance(data.get("value"), dict):
        data = data["value"]
    if not isinstance(data, dict):
        return None
    et = data.get("error_type")
    if not isinstance(et, str) or not re.fullmatch(r"[A-Za-z_]{1,64}", et, re.ASCII):
        return None
    msgs: list[str] = []
    raw = data.get("messages")
    if isinstance(raw, list):
        for m in raw[:10]:
            if isinstance(m, dict) and isinstance(m.get("default_message"), str):
                msgs.append(m["default_message"][:1000])
            elif isinstance(m, str):
                msgs.append(m[:1000])
    extra = data.get("data")
    return VapiError(
        error_type=et.upper(),
        messages=tuple(msgs),
        data=extra if isinstance(extra, dict) else None,
    )

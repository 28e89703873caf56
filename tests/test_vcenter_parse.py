"""parse.py: exact cases plus hypothesis fuzzing (any JSON -> model object or ProtocolError)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestfs_mount.errors import NotFound, ProtocolError, ResourceBusy
from guestfs_mount.model import FilesystemFamily, FileType
from guestfs_mount.vcenter import parse

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            ["files", "total", "status", "filename", "type", "size", "attributes", "value",
             "last_modified", "last_accessed", "filesystem_family", "posix_attributes",
             "win_attributes", "owner", "group", "permissions", "error_type", "messages",
             "state", "vm", "name", "power_state", "start_index", "end_index", "x"]
        ),
        children,
        max_size=6,
    ),
    max_leaves=20,
)

PARSERS: list[Callable[[Any], object]] = [
    parse.parse_session_token,
    parse.parse_vm_list,
    parse.parse_power_state,
    parse.parse_guest_operations,
    parse.parse_tools_running,
    parse.parse_list_page,
    parse.parse_stat,
    parse.parse_transfer_url,
    parse.parse_timestamp,
]


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_parsers_total(value: Any) -> None:
    for p in PARSERS:
        try:
            p(value)
        except ProtocolError:
            pass
    parse.parse_error(json.dumps(value).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_bytes(body: bytes) -> None:
    parse.parse_error(body)
    try:
        parse.decode_json(body, "x")
    except ProtocolError:
        pass


_fname = st.text(max_size=12)
_summary = st.fixed_dictionaries(
    {"filename": _fname, "type": st.sampled_from(["FILE", "DIRECTORY", "SYMLINK", "X"]),
     "size": st.integers(min_value=-5, max_value=2**64)}
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_summary | json_values, max_size=8), st.sampled_from(["READY", "END_OF_DATA"]))
def test_fuzz_list_pages(files: list[Any], status: str) -> None:
    r = parse.parse_list_page({"files": files, "total": len(files), "status": status})
    assert r.raw_count == len(files)
    dots = sum(1 for f in files if isinstance(f, dict) and f.get("filename") in (".", ".."))
    assert len(r.entries) + len(r.skipped) + dots == len(files)
    for e in r.entries:
        assert e.name not in ("", ".", "..") and "/" not in e.name and 0 <= e.size < 2**63


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:01.5Z", 1_500_000_000),
        ("1970-01-01T00:00:01.123456789123Z", 1_123_456_789),
        ("1970-01-01T01:00:00+01:00", 0),
        ("1970-01-01T00:00:00-0130", 5400 * 10**9),
        ("1969-12-31T23:59:59Z", -(10**9)),
        ("2024-01-02T03:04:05.000Z", 1704164645 * 10**9),
    ],
)
def test_timestamps(text: str, ns: int) -> None:
    assert parse.parse_timestamp(text) == ns


@pytest.mark.parametrize(
    "bad", ["", "2024-13-01T00:00:00Z", "2024-01-01", "yesterday", "2024-01-01T00:00:00+25:00", 5]
)
def test_bad_timestamps(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        parse.parse_timestamp(bad)


def _info(**posix: Any) -> dict[str, Any]:
    return {
        "type": "SYMLINK",
        "size": 3,
        "attributes": {
            "last_modified": "2024-01-02T03:04:05Z",
            "last_accessed": "2024-01-02T03:04:05Z",
            "filesystem_family": "POSIX",
            "symlink_target": "/t",
            "posix_attributes": {"owner": 1, "group": 2, "permissions": "4755", **posix},
        },
    }


def test_stat_posix_and_windows() -> None:
    st_ = parse.parse_stat(_info())
    assert st_.type is FileType.SYMLINK and st_.permissions == 0o4755
    assert (st_.owner, st_.group, st_.symlink_target) == (1, 2, "/t")
    assert parse.parse_stat(_info(permissions="100644")).permissions == 0o644
    for bad in ("rwx", "", "9", "0x1ff", " 644"):
        with pytest.raises(ProtocolError):
            parse.parse_stat(_info(permissions=bad))
    with pytest.raises(ProtocolError):
        parse.parse_stat(_info(owner=True))
    win = {
        "type": "FILE",
        "size": 1,
        "attributes": {
            "last_modified": "2024-01-02T03:04:05Z",
            "last_accessed": "2024-01-02T03:04:05Z",
            "filesystem_family": "WINDOWS",
            "win_attributes": {"hidden": True, "read_only": False, "created": "2020-01-01T00:00:00Z"},
        },
    }
    w = parse.parse_stat(win)
    assert w.family is FilesystemFamily.WINDOWS and w.hidden is True and w.owner is None
    assert parse.parse_stat({"value": win}) == w


def test_session_and_errors() -> None:
    assert parse.parse_session_token("abc") == "abc"
    assert parse.parse_session_token({"value": "abc"}) == "abc"
    for bad in ("", "a\nb", 5, None, {"value": 1}):
        with pytest.raises(ProtocolError):
            parse.parse_session_token(bad)
    e = parse.parse_error(b'{"error_type":"resource_busy","messages":[{"default_message":"m"}]}')
    assert e is not None
    exc = e.exception("x", status=500)
    assert isinstance(exc, ResourceBusy) and exc.messages == ("m",)
    wrapped = b'{"type":"com.vmware.vapi.std.errors.not_found","value":{"error_type":"NOT_FOUND","messages":[]}}'
    e2 = parse.parse_error(wrapped)
    assert e2 is not None and isinstance(e2.exception("x", status=404), NotFound)
    assert parse.parse_error(b"<html>") is None
    assert parse.parse_error(b"") is None
    assert parse.parse_error(b'{"error_type": 5}') is None


def test_huge_and_nested_json() -> None:
    with pytest.raises(ProtocolError):
        parse.decode_json(b"[" * 100_000 + b"]" * 100_000, "x")
    with pytest.raises(ProtocolError):
        parse.parse_stat({"type": "FILE", "size": 10**40, "attributes": {}})

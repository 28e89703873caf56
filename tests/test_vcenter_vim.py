"""The vim25 transports (VI/JSON, SOAP) and the auto probe, against tests/vim_fake.py."""

from __future__ import annotations

import errno
import json
import logging
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest

from guestfs_mount.errors import (
    GuestAuthFailed,
    InvalidArgument,
    ListingStopped,
    NotAllowedInCurrentState,
    NotFound,
    ProtocolError,
    ResourceBusy,
    ServiceUnavailable,
    Unauthenticated,
    Unauthorized,
    to_errno,
)
from guestfs_mount.model import FilesystemFamily, FileType
from guestfs_mount.vcenter import VCenterClient
from guestfs_mount.vcenter.soap import envelope
from tests.fake_vcenter import assert_no_secrets, config
from tests.vim_fake import FakeVim, posix_file

BOTH = ["vi-json", "soap"]


def make(fake: FakeVim, api: str = "auto", **kw: Any) -> VCenterClient:
    return VCenterClient(config(api=api, **kw), transport=fake.transport())


def tree(n: int = 3) -> FakeVim:
    fake = FakeVim()
    fake.dirs["/"] = [posix_file("d", "directory", 4096, 0o40755)]
    fake.dirs["/d"] = [posix_file(f"f{i}", size=i, uid=1000 + i, mode=0o100600) for i in range(n)]
    fake.files["/d/f1"] = 1
    return fake


def methods(fake: FakeVim) -> list[str]:
    return [m for m, _ in fake.calls]


# --- probe ---------------------------------------------------------------------------------


async def test_auto_prefers_vi_json() -> None:
    fake = tree()
    async with make(fake) as c:
        assert (await c.find_vm("web")).vm == "vm-42"  # VMs are looked up over /api
        assert c.transport_name == "vi-json"
        assert "VI/JSON" in c.transport_reason and "Fake vim 8.0" in c.transport_reason


async def test_auto_soap_when_no_vi_json_and_rest_last() -> None:
    fake = tree()
    fake.vi_json = False
    async with make(fake) as c:
        await c.login()
        assert c.transport_name == "soap"
        assert "SOAP" in c.transport_reason and "HTTP 404" in c.transport_reason
    fake.soap = False
    async with make(fake) as c:
        await c.login()
        assert c.transport_name == "rest"
        assert "no vim25 endpoint" in c.transport_reason


# --- the same mount over both --------------------------------------------------------------


@pytest.mark.parametrize("api", BOTH)
async def test_list_with_attributes_in_pages(api: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="guestfs_mount.vcenter")
    fake = tree(120)
    async with make(fake, api, list_page_size=50) as c:
        await c.check_guest_ready("vm-42")
        assert methods(fake) == ["ValidateCredentialsInGuest"]
        got = await c.list_dir("vm-42", "/d")
    assert [e.name for e in got] == [f"f{i}" for i in range(120)]  # . and .. left out
    st = got[7].stat
    assert st is not None and st.size == 7 and st.owner == 1007 and st.permissions == 0o600
    assert st.family is FilesystemFamily.POSIX and st.type is FileType.FILE
    assert st.mtime_ns == 1736841672 * 10**9
    pages = [a for m, a in fake.calls if m == "ListFilesInGuest"]
    # the first page asks for list_page_size, the next for everything that is left
    assert [(int(a["index"]), int(a["maxResults"])) for a in pages] == [(0, 50), (50, 72)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("api", BOTH)
async def test_stat_is_one_listing_call(api: str) -> None:
    fake = tree()
    async with make(fake, api) as c:
        st = await c.stat("vm-42", "/d/f2")
        assert st.size == 2 and st.owner == 1002
        root = await c.stat("vm-42", "/")
        assert root.type is FileType.DIRECTORY
        with pytest.raises(NotFound):
            await c.stat("vm-42", "/d/nope")
    calls = [a for m, a in fake.calls if m == "ListFilesInGuest"]
    assert [(a["filePath"], a["matchPattern"]) for a in calls] == [
        ("/d", "^f2$"), ("/", "^\\.$"), ("/d", "^nope$"),
    ]  # fmt: skip


@pytest.mark.parametrize("api", BOTH)
async def test_open_transfer_gives_url_and_stat(api: str) -> None:
    fake = tree()
    async with make(fake, api) as c:
        opened = await c.open_transfer("vm-42", "/d/f1")
        assert opened.url.startswith("https://vc.example.com:443/guestFile?")
        assert opened.stat is not None and opened.stat.size == 1
        with pytest.raises(InvalidArgument) as ei:
            await c.open_transfer("vm-42", "/d")
        assert to_errno(ei.value) == errno.EISDIR


@pytest.mark.parametrize("api", BOTH)
@pytest.mark.parametrize(
    ("fault", "cls", "err"),
    [
        ("InvalidGuestLogin", GuestAuthFailed, errno.EACCES),
        ("GuestPermissionDenied", Unauthorized, errno.EACCES),
        ("FileNotFound", NotFound, errno.ENOENT),
        ("GuestOperationsUnavailable", ServiceUnavailable, errno.EIO),
        ("InvalidState", ResourceBusy, errno.EAGAIN),  # a busy guest: retried,
        ("InvalidPowerState", NotAllowedInCurrentState, errno.EIO),
        ("OperationNotSupportedByGuest", Exception, errno.EOPNOTSUPP),
    ],
)
async def test_faults_map_like_rest(api: str, fault: str, cls: type, err: int) -> None:
    fake = tree()
    fake.faults["ListFilesInGuest"] = fault
    async with make(fake, api, retry_budget=0.0) as c:
        with pytest.raises(cls) as ei:
            await c.list_dir("vm-42", "/d")
    assert to_errno(ei.value) == err
    assert fault in str(ei.value)


@pytest.mark.parametrize("api", BOTH)
async def test_wrong_guest_password_and_vcenter_password(api: str) -> None:
    fake = tree()
    fake.guest_password = "other"
    async with make(fake, api) as c:
        with pytest.raises(GuestAuthFailed) as ei:
            await c.check_guest_ready("vm-42")
    assert_no_secrets(str(ei.value))
    fake = tree()
    fake.password = "other"
    async with make(fake, api) as c:
        with pytest.raises(Unauthenticated) as ei2:
            await c.stat("vm-42", "/d/f1")
    assert not isinstance(ei2.value, GuestAuthFailed)
    assert "login as admin@vsphere.local" in str(ei2.value)
    assert_no_secrets(str(ei2.value))


@pytest.mark.parametrize("api", BOTH)
async def test_not_authenticated_logs_in_again_once(api: str) -> None:
    fake = tree()
    async with make(fake, api) as c:
        await c.stat("vm-42", "/d/f1")
        fake.sessions.clear()
        await c.stat("vm-42", "/d/f1")
        assert c.stats.relogins == 1
    assert fake.n_logins == 2


async def test_soap_on_esxi_finds_vm_without_rest() -> None:
    fake = tree()
    fake.vi_json = False
    fake.api_type = "HostAgent"
    fake.vms = {"web01": "7"}
    async with make(fake) as c:
        vm = await c.find_vm("web01")
        assert (vm.vm, vm.name) == ("7", "web01")
        assert "standalone ESXi host" in c.transport_reason
        assert (await c.find_vm("7")).name == "web01"
        with pytest.raises(NotFound):
            await c.find_vm("nope")
    assert not fake.rest.requests  # no /api on an ESXi host


def test_soap_envelope_is_built_not_pasted() -> None:
    body = envelope(
        "ListFilesInGuest",
        {"_typeName": "ManagedObjectReference", "type": "GuestFileManager", "value": "fm"},
        [("filePath", "/a<b>&'\"]]>"), ("index", 0), ("maxResults", 2)],
    )
    root = ET.fromstring(body)
    op = root[0][0]
    assert op.tag == "{urn:vim25}ListFilesInGuest"
    assert [c.tag.split("}")[1] for c in op] == ["_this", "filePath", "index", "maxResults"]
    assert op[1].text == "/a<b>&'\"]]>"
    with pytest.raises(InvalidArgument):
        envelope("X", {"_typeName": "ManagedObjectReference", "type": "T", "value": "v"},
                 [("filePath", "/bad\udcff")])  # fmt: skip


# --- hostile answers ------------------------------------------------------------------------

BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>
<ListFilesInGuestResponse xmlns="urn:vim25"><returnval><remaining>&lol3;</remaining></returnval>
</ListFilesInGuestResponse></soapenv:Body></soapenv:Envelope>"""
XXE = BOMB.replace(b'<!ENTITY lol "lol">', b'<!ENTITY lol SYSTEM "file:///etc/passwd">')
DEEP = (
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
    b'<R xmlns="urn:vim25"><returnval>' + b"<a>" * 5000 + b"</a>" * 5000 + b"</returnval></R>"
    b"</soapenv:Body></soapenv:Envelope>"
)


@pytest.mark.parametrize("body", [BOMB, XXE, DEEP, b"<not xml", b"<a>plain</a>"])
async def test_hostile_xml_is_a_protocol_error(body: bytes) -> None:
    fake = tree()
    fake.vi_json = False
    fake.raw["ListFilesInGuest"] = httpx.Response(200, content=body)
    async with make(fake, "soap") as c:
        with pytest.raises(ProtocolError):
            await c.list_dir("vm-42", "/d")


@pytest.mark.parametrize("api", BOTH)
async def test_hostile_entries_skipped_and_endless_remaining(api: str) -> None:
    fake = tree(0)
    fake.dirs["/d"] = [
        posix_file("ok"),
        posix_file("../../etc/passwd"),
        posix_file("x" * 256),
        posix_file("huge", size=2**64),
        posix_file("sock", ftype="socket"),
        posix_file("/d/full"),  # a server sending full paths: trimmed to the name
    ]
    async with make(fake, api) as c:
        got = await c.list_dir("vm-42", "/d")
    assert [e.name for e in got] == ["ok", "full"]

    endless = {"_typeName": "GuestListFileInfo", "files": [], "remaining": 2**31 - 1}
    fake = tree()
    if api == "vi-json":
        fake.raw["ListFilesInGuest"] = httpx.Response(200, json=endless)
    else:
        fake.vi_json = False
        fake.raw["ListFilesInGuest"] = fake._soap_ok("ListFilesInGuest", endless)
    async with make(fake, api, max_list_page=100) as c:
        with pytest.raises(ProtocolError, match="without entries"):
            await c.list_dir("vm-42", "/d")
    sizes = [int(a["maxResults"]) for m, a in fake.calls if m == "ListFilesInGuest"] or [100]
    assert max(sizes) <= 1000


async def test_malformed_vi_json_answer() -> None:
    fake = tree()
    fake.raw["ListFilesInGuest"] = httpx.Response(200, content=b'{"remaining": ')
    async with make(fake, "vi-json") as c:
        with pytest.raises(ProtocolError, match="not valid JSON"):
            await c.list_dir("vm-42", "/d")
    fake.raw["ListFilesInGuest"] = httpx.Response(200, content=json.dumps({"files": []}).encode())
    async with make(fake, "vi-json") as c:
        with pytest.raises(ProtocolError, match="remaining"):
            await c.list_dir("vm-42", "/d")


@pytest.mark.parametrize("api", BOTH)
async def test_more_stops_a_listing_between_pages(api: str) -> None:
    fake = tree(50)
    asked: list[int] = []

    def more(n: int) -> bool:
        asked.append(n)
        return n < 25

    async with make(fake, api, list_page_size=10, max_list_page=10) as c:
        with pytest.raises(ListingStopped):
            await c.list_dir("vm-42", "/d", more)
        assert len(await c.list_dir("vm-42", "/d", lambda n: True)) == 50
    pages = [a for m, a in fake.calls if m == "ListFilesInGuest" and a["filePath"] == "/d"]
    # "." and ".." come first and are left out; the whole listing is 52 names, 6 pages
    assert asked == [8, 18, 28] and len(pages) == 3 + 6

"""VCenterClient against an httpx.MockTransport fake vCenter/ESX."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from guestfs_mount.errors import (
    CircuitOpen,
    ConfigError,
    GuestAuthFailed,
    InvalidArgument,
    ListingStopped,
    NotAllowedInCurrentState,
    NotFound,
    ProtocolError,
    RemoteTimeout,
    ResourceBusy,
    ServiceUnavailable,
    TransportError,
    Unauthenticated,
    UnsafeTransferUrl,
)
from guestfs_mount.model import FileType

from .fake_vcenter import FakeVCenter, assert_no_secrets, err, make_client, stat_body


def entries(n: int, prefix: str = "f") -> list[dict[str, Any]]:
    return [{"filename": f"{prefix}{i}", "type": "FILE", "size": i} for i in range(n)]


# --- session / VM lookup -----------------------------------------------------------------------


async def test_login_and_find_vm() -> None:
    fake = FakeVCenter()
    async with make_client(fake) as c:
        await c.login()
        vm = await c.find_vm("web")
        assert vm.vm == "vm-42"
        assert (await c.find_vm("vm-42")).name == "web"
        await c.check_guest_ready("vm-42")
    # session deleted on close, with the header
    last = fake.requests[-1]
    assert last.method == "DELETE" and last.url.path == "/api/session"
    assert c.stats.calls["vm.list"] >= 2


async def test_find_vm_not_found_and_ambiguous() -> None:
    fake = FakeVCenter()
    fake.vms.append({"vm": "vm-43", "name": "web", "power_state": "POWERED_OFF"})
    async with make_client(fake) as c:
        with pytest.raises(ConfigError, match="vm-42, vm-43"):
            await c.find_vm("web")
        with pytest.raises(NotFound, match="nope"):
            await c.find_vm("nope")


async def test_guest_not_ready() -> None:
    fake = FakeVCenter()

    async def off(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"state": "POWERED_OFF"})

    fake.hooks["vm.power"] = off
    async with make_client(fake) as c:
        with pytest.raises(NotAllowedInCurrentState, match="powered off"):
            await c.check_guest_ready("vm-42")

    fake = FakeVCenter()

    async def no_ops(req: httpx.Request) -> httpx.Response:
        return err(404, "OPERATION_NOT_FOUND")

    async def tools(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"run_state": "NOT_RUNNING"})

    fake.hooks["vm.guest.operations"] = no_ops
    fake.hooks["vm.tools"] = tools
    async with make_client(fake) as c:
        with pytest.raises(ServiceUnavailable, match="VMware Tools is not running"):
            await c.check_guest_ready("vm-42")


async def test_wrong_vcenter_password() -> None:
    fake = FakeVCenter(password="other")
    async with make_client(fake) as c:
        with pytest.raises(Unauthenticated) as ei:
            await c.login()
    assert "vCenter login as admin@vsphere.local failed" in str(ei.value)
    assert not isinstance(ei.value, GuestAuthFailed)
    assert_no_secrets(str(ei.value))


async def test_relogin_on_expired_session() -> None:
    fake = FakeVCenter()
    async with make_client(fake) as c:
        await c.find_vm("web")
        fake.expire_sessions()
        await c.find_vm("web")
        assert c.stats.relogins == 1
        assert fake.n_logins == 2


async def test_single_relogin_under_concurrency(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVCenter(login_delay=0.01)
    fake.stats["/a"] = stat_body()
    async with make_client(fake) as c:
        await c.find_vm("web")
        await trio.sleep(1800)  # idle: the session expires
        fake.expire_sessions()
        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(c.stat, "vm-42", "/a")
        assert fake.n_logins == 2
        assert c.stats.relogins == 1


async def test_guest_auth_failure_detected(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVCenter(guest_password="different")
    fake.stats["/a"] = stat_body()
    async with make_client(fake) as c:
        await c.find_vm("web")  # verifies the session on a non-guest call
        with pytest.raises(GuestAuthFailed, match="guest login as root refused by VM vm-42") as ei:
            await c.stat("vm-42", "/a")
        assert fake.n_logins == 1  # fresh session: no pointless re-login
        assert_no_secrets(repr(ei.value) + str(ei.value))
        # an older session that still answers GET /api/session: still the guest's fault
        await trio.sleep(60)
        with pytest.raises(GuestAuthFailed):
            await c.list_dir("vm-42", "/")
        assert fake.n_logins == 1
        # the session really gone: one re-login, then the 401 is the guest's fault
        fake.expire_sessions()
        with pytest.raises(GuestAuthFailed):
            await c.list_dir("vm-42", "/")
        assert fake.n_logins == 2


async def test_session_expired_right_after_login_is_not_a_guest_failure() -> None:
    fake = FakeVCenter()
    fake.stats["/a"] = stat_body()
    async with make_client(fake) as c:
        await c.find_vm("web")  # a fresh, verified session ...
        fake.expire_sessions()  # ... that vCenter drops at once (restart)
        st = await c.stat("vm-42", "/a")
        assert st.size == 10 and fake.n_logins == 2


async def test_error_type_dispatch_not_status() -> None:
    fake = FakeVCenter()
    fake.stats["/a"] = stat_body()

    async def weird(req: httpx.Request) -> httpx.Response:
        return err(500, "NOT_FOUND", "Entity does not exist")

    fake.hooks["files.get"] = weird
    async with make_client(fake) as c:
        with pytest.raises(NotFound, match=r"stat /a on VM vm-42 failed: NOT_FOUND: Entity"):
            await c.stat("vm-42", "/a")

    async def bad_arg(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            403,
            json={
                "type": "com.vmware.vapi.std.errors.invalid_argument",
                "value": {
                    "error_type": "INVALID_ARGUMENT",
                    "messages": [],
                    "data": {"reason": "NOT_A_FILE"},
                },
            },
        )

    fake.hooks["files.get"] = bad_arg
    async with make_client(fake) as c:
        with pytest.raises(InvalidArgument) as ei:
            await c.stat("vm-42", "/a")
        assert ei.value.reason == "NOT_A_FILE"
        assert ei.value.path == "/a"


# --- list / stat ---------------------------------------------------------------------------------


async def test_list_paging() -> None:
    fake = FakeVCenter()
    fake.files["/etc"] = entries(7)
    async with make_client(fake, list_page_size=3) as c:
        got = await c.list_dir("vm-42", "/etc")
    assert [e.name for e in got] == [f"f{i}" for i in range(7)]
    assert got[3].size == 3 and got[0].type is FileType.FILE
    idx = [
        json.loads(r.content)["iteration"]["index"] for r in fake.requests if "list" in str(r.url)
    ]
    assert idx == [0, 3, 6]


async def test_list_hostile_entries(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeVCenter()
    fake.files["/d"] = [
        {"filename": "ok", "type": "FILE", "size": 1},
        {"filename": "", "type": "FILE", "size": 1},
        {"filename": ".", "type": "DIRECTORY", "size": 1},
        {"filename": "..", "type": "DIRECTORY", "size": 1},
        {"filename": "../../etc/passwd", "type": "FILE", "size": 1},
        {"filename": "a\x00b", "type": "FILE", "size": 1},
        {"filename": "x" * 256, "type": "FILE", "size": 1},
        {"filename": "é" * 128, "type": "FILE", "size": 1},  # 256 bytes
        {"filename": "ok", "type": "FILE", "size": 2},
        {"filename": "neg", "type": "FILE", "size": -1},
        {"filename": "huge", "type": "FILE", "size": 2**64},
        {"filename": "dev", "type": "SOCKET", "size": 0},
        {"filename": "bool", "type": "FILE", "size": True},
        "not an object",
        {"filename": "bad\udcff", "type": "FILE", "size": 3},
    ]
    caplog.set_level(logging.WARNING, logger="guestfs_mount.vcenter")
    async with make_client(fake, list_page_size=4) as c:
        got = await c.list_dir("vm-42", "/d")
    assert [(e.name, e.size) for e in got] == [("ok", 1), ("bad\udcff", 3)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    # . and .. are normal (every guest lists them first): left out without a word
    assert "skipped 11" in warnings[0].getMessage()
    assert "'.'" not in warnings[0].getMessage()


async def test_list_never_ending_ready() -> None:
    fake = FakeVCenter()

    async def stuck(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"files": [], "total": 5, "status": "READY"})

    fake.hooks["files.list"] = stuck
    async with make_client(fake) as c:
        with pytest.raises(ProtocolError, match="pages without entries"):
            await c.list_dir("vm-42", "/d")
    assert sum("list" in str(r.url) for r in fake.requests) == 4


async def test_list_too_many_entries() -> None:
    fake = FakeVCenter()
    counter = [0]

    async def endless(req: httpx.Request) -> httpx.Response:
        counter[0] += 1
        files = entries(10, prefix=f"p{counter[0]}_")
        return httpx.Response(200, json={"files": files, "total": 10, "status": "READY"})

    fake.hooks["files.list"] = endless
    async with make_client(fake, max_list_entries=95) as c:
        with pytest.raises(ProtocolError, match="more than 95 entries"):
            await c.list_dir("vm-42", "/d")


async def test_list_malformed_page() -> None:
    fake = FakeVCenter()

    async def bad(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>")

    fake.hooks["files.list"] = bad
    async with make_client(fake) as c:
        with pytest.raises(ProtocolError, match="list /d on VM vm-42"):
            await c.list_dir("vm-42", "/d")


async def test_stat_url_encoding_and_body() -> None:
    fake = FakeVCenter()
    path = "/tmp/we ird/na\udcffme?#%"
    fake.stats[path] = stat_body("DIRECTORY", 4096)
    async with make_client(fake) as c:
        st = await c.stat("vm-42", path)
    assert st.type is FileType.DIRECTORY and st.permissions == 0o644
    assert st.mtime_ns == 1704164645_500_000_000
    assert st.atime_ns == 1704164645_000_000_000 - 3600 * 10**9
    req = next(r for r in fake.requests if "action=get" in str(r.url))
    assert req.url.raw_path.startswith(
        b"/api/vcenter/vm/vm-42/guest/filesystem/files/%2Ftmp%2Fwe%20ird%2Fna%FFme%3F%23%25?"
    )
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.content)["credentials"]["user_name"] == "root"


async def test_list_path_with_surrogates_in_body() -> None:
    fake = FakeVCenter()
    fake.files["/x\udcfe"] = entries(1)
    async with make_client(fake) as c:
        got = await c.list_dir("vm-42", "/x\udcfe")
    assert len(got) == 1
    req = next(r for r in fake.requests if "action=list" in str(r.url))
    assert b'"\\udcfe"' in req.content or b"\\udcfe" in req.content


# --- transfers -----------------------------------------------------------------------------------


async def test_create_transfer_star_substitution() -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b"x"
    async with make_client(fake, server="vc.example.com:8443") as c:
        url = await c.create_transfer("vm-42", "/f")
        assert url.startswith("https://vc.example.com:8443/guestFile?")
        assert c.transfer_api == "released"
        # Another port of the vCenter host: only when named with --esx-host HOST:PORT.
        fake.transfer_host = "*:9443"
        with pytest.raises(UnsafeTransferUrl, match="--esx-host vc.example.com:9443"):
            await c.create_transfer("vm-42", "/f")
    async with make_client(fake, esx_hosts=("vc.example.com:9443",)) as c:
        url = await c.create_transfer("vm-42", "/f")
        assert url.startswith("https://vc.example.com:9443/guestFile?")


@pytest.mark.parametrize(
    ("host", "esx_hosts", "ok"),
    [
        ("esx1.example.com", ("esx*.example.com",), True),
        ("esx1.example.com:443", ("esx*.example.com",), True),
        ("esx1.example.com:22", ("esx*.example.com",), False),
        ("esx1.example.com:8443", ("esx*.example.com:8443",), True),
        ("esx1.example.com:8444", ("esx*.example.com:8443",), False),
        ("vc.example.com:5432", (), False),
        ("*:80", (), False),
    ],
)
async def test_transfer_port_rule(host: str, esx_hosts: tuple[str, ...], ok: bool) -> None:
    fake = FakeVCenter(transfer_host=host)
    fake.contents["/f"] = b"x"
    async with make_client(fake, esx_hosts=esx_hosts) as c:
        if ok:
            await c.create_transfer("vm-42", "/f")
        else:
            with pytest.raises(UnsafeTransferUrl, match="--esx-host"):
                await c.create_transfer("vm-42", "/f")


async def test_transfer_preview_fallback_remembered() -> None:
    fake = FakeVCenter(released=False)
    fake.contents["/f"] = b"x"
    async with make_client(fake) as c:
        await c.create_transfer("vm-42", "/f")
        await c.create_transfer("vm-42", "/f")
        assert c.transfer_api == "preview"
    ops = [fake.op(r) for r in fake.requests if "filesystem" in str(r.url)]
    assert ops == ["transfer.create", "transfer.preview", "transfer.preview"]
    preview = next(r for r in fake.requests if fake.op(r) == "transfer.preview")
    assert preview.method == "GET"
    assert json.loads(preview.content)["path"] == "/f"


async def test_transfer_bare_405_falls_back_but_not_found_does_not() -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b"x"

    async def bare(req: httpx.Request) -> httpx.Response:
        return httpx.Response(405, text="Method Not Allowed")

    fake.hooks["transfer.create"] = bare
    async with make_client(fake) as c:
        await c.create_transfer("vm-42", "/f")
        assert c.transfer_api == "preview"
    fake = FakeVCenter()
    async with make_client(fake) as c:
        with pytest.raises(NotFound, match="/missing"):
            await c.create_transfer("vm-42", "/missing")
        assert c.transfer_api is None
    fake = FakeVCenter(released=False)
    fake.contents["/f"] = b"x"
    async with make_client(fake, api="released") as c:
        with pytest.raises(ProtocolError):
            await c.create_transfer("vm-42", "/f")


async def test_transfer_api_preview_only() -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b"x"
    async with make_client(fake, api="preview") as c:
        await c.create_transfer("vm-42", "/f")
    assert [fake.op(r) for r in fake.requests if "filesystem" in str(r.url)] == ["transfer.preview"]


@pytest.mark.parametrize(
    ("host", "kw", "ok"),
    [
        ("esx1.example.com", {}, False),
        ("esx1.example.com", {"esx_hosts": ("esx*.example.com",)}, True),
        ("esx1.example.com", {"thumbprints": {"esx1.example.com": "ab" * 32}}, True),
        ("esx1.example.com:444", {"thumbprints": {"esx1.example.com:443": "ab" * 32}}, False),
        ("evil.com", {"insecure": True}, True),
        ("VC.example.com", {}, True),
    ],
)
async def test_transfer_host_policy(host: str, kw: dict[str, Any], ok: bool) -> None:
    fake = FakeVCenter(transfer_host=host)
    fake.contents["/f"] = b"x"
    async with make_client(fake, **kw) as c:
        if ok:
            await c.create_transfer("vm-42", "/f")
        else:
            with pytest.raises(UnsafeTransferUrl, match="--esx-host") as ei:
                await c.create_transfer("vm-42", "/f")
            assert_no_secrets(str(ei.value))


async def test_transfer_http_refused_unless_allowed() -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b"x"

    async def http_url(req: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json="http://*/guestFile?id=/f&token=UrLtOkEnXyZ")

    fake.hooks["transfer.create"] = http_url
    async with make_client(fake) as c:
        with pytest.raises(UnsafeTransferUrl, match="plain http") as ei:
            await c.create_transfer("vm-42", "/f")
        assert_no_secrets(str(ei.value))
    async with make_client(fake, allow_http=True) as c:
        assert (await c.create_transfer("vm-42", "/f")).startswith("http://vc.example.com:443/")
    for bad in ("ftp://*/x", "https://user:pw@*/x", "https://*:99999/x", ""):

        async def hook(req: httpx.Request, bad: str = bad) -> httpx.Response:
            return httpx.Response(201, json=bad)

        fake.hooks["transfer.create"] = hook
        async with make_client(fake) as c:
            with pytest.raises((UnsafeTransferUrl, ProtocolError)):
                await c.create_transfer("vm-42", "/f")


async def test_api_redirect_refused() -> None:
    fake = FakeVCenter()

    async def redirect(req: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"location": "https://evil.com/api"})

    fake.hooks["vm.list"] = redirect
    async with make_client(fake) as c:
        with pytest.raises(ProtocolError, match="redirect"):
            await c.find_vm("web")
    assert not any("evil" in str(r.url) for r in fake.requests)


# --- retries / breaker / timeouts -----------------------------------------------------------------


async def test_retry_within_budget_then_fail(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVCenter()

    async def busy(req: httpx.Request) -> httpx.Response:
        return err(400, "RESOURCE_BUSY", "VM busy")

    fake.hooks["files.get"] = busy
    async with make_client(fake, retry_budget=10.0) as c:
        t0 = trio.current_time()
        with pytest.raises(ResourceBusy, match="VM busy"):
            await c.stat("vm-42", "/a")
        assert trio.current_time() - t0 <= 10.0
        assert c.stats.retries >= 5
        assert c.stats.errors["ResourceBusy"] == 1


async def test_no_retry_on_not_found() -> None:
    fake = FakeVCenter()
    async with make_client(fake) as c:
        with pytest.raises(NotFound):
            await c.stat("vm-42", "/missing")
        assert c.stats.retries == 0


async def test_call_timeout(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeVCenter()

    async def slow(req: httpx.Request) -> httpx.Response:
        await trio.sleep(100)
        return httpx.Response(200, json=[])

    fake.hooks["vm.list"] = slow
    async with make_client(fake, call_timeout=2.0, retry_budget=0) as c:
        with pytest.raises(RemoteTimeout, match="vc.example.com:443"):
            await c.find_vm("web")


async def test_transport_error_message_and_breaker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeVCenter()
    down = [True]

    async def refused(req: httpx.Request) -> httpx.Response | None:
        if down[0]:
            raise httpx.ConnectError("") from OSError(111, "Connection refused")
        return None

    fake.hooks["vm.list"] = refused
    async with make_client(fake, retry_budget=0, breaker_threshold=3, breaker_cooldown=5.0) as c:
        await c.login()
        for _ in range(3):
            with pytest.raises(TransportError, match="Connection refused"):
                await c.find_vm("web")
        before = len(fake.requests)
        with pytest.raises(CircuitOpen):
            await c.find_vm("web")
        assert len(fake.requests) == before  # failed fast
        await trio.sleep(5.1)
        # half-open: one probe; it fails -> open again
        with pytest.raises(TransportError):
            await c.find_vm("web")
        with pytest.raises(CircuitOpen):
            await c.find_vm("web")
        await trio.sleep(5.1)
        down[0] = False
        assert (await c.find_vm("web")).vm == "vm-42"  # probe succeeds: closed
        assert (await c.find_vm("web")).vm == "vm-42"


async def test_retry_transport_errors_then_success(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeVCenter()
    n = [0]

    async def flaky(req: httpx.Request) -> httpx.Response | None:
        n[0] += 1
        if n[0] <= 3:
            raise httpx.ReadError("")
        return None

    fake.hooks["vm.list"] = flaky
    async with make_client(fake) as c:
        assert (await c.find_vm("web")).vm == "vm-42"
        assert c.stats.retries == 3


# --- secrets -------------------------------------------------------------------------------------


async def test_no_secrets_in_logs_or_errors(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeVCenter()
    fake.contents["/f"] = b"data"
    fake.stats["/f"] = stat_body()
    raised: list[BaseException] = []
    async with make_client(fake, debug=True, retry_budget=1.0) as c:
        await c.find_vm("web")
        await c.stat("vm-42", "/f")
        await c.create_transfer("vm-42", "/f")
        await trio.sleep(1800)
        fake.expire_sessions()
        await c.list_dir("vm-42", "/") if "/" in fake.files else None
        for coro in (
            lambda: c.stat("vm-42", "/nope"),
            lambda: c.create_transfer("vm-42", "/missing"),
            lambda: c.create_transfer("vm-43", "/nope"),
        ):
            try:
                await coro()
            except Exception as e:
                raised.append(e)
        fake.guest_password = "changed"
        try:
            await c.stat("vm-42", "/f")
        except Exception as e:
            raised.append(e)
    fake.password = "changed"
    async with make_client(fake) as c:
        try:
            await c.login()
        except Exception as e:
            raised.append(e)
    assert len(raised) == 5
    for exc in raised:
        assert_no_secrets(str(exc) + repr(exc) + repr(exc.args))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "POST /api/vcenter/vm/vm-42/guest/filesystem/files/%2Ff?action=get 200" in text
    assert_no_secrets(text)
    assert_no_secrets(repr(c.config))


def test_plain_http_message_names_the_real_way() -> None:
    from guestfs_mount.vcenter.urls import parse_server

    for s in ("http://vc.example.com", "HTTP://vc.example.com"):
        with pytest.raises(ConfigError, match=r"give the server as http://HOST") as ei:
            parse_server(s, allow_http=False)
        assert "--allow-http" not in str(ei.value)
    assert parse_server("HTTP://vc.example.com:8080", allow_http=True).port == 8080


async def test_api_choice_names() -> None:
    fake = FakeVCenter()
    fake.contents["/f"] = b"x"
    for api, name in (("rest", "rest"), ("released", "rest"), ("preview", "preview")):
        async with make_client(fake, api=api) as c:
            assert c.transport_name is None  # chosen at the first call
            await c.create_transfer("vm-42", "/f")
            assert c.transport_name == name
            assert c.transport_reason == f"chosen with --api {name}"
    assert not any(r.url.path.startswith("/sdk") for r in fake.requests)  # no probe
    with pytest.raises(ConfigError, match="unknown API"):
        make_client(fake, api="grpc")


async def test_more_stops_a_rest_listing_between_pages() -> None:
    fake = FakeVCenter()
    fake.files["/d"] = [{"filename": f"f{i}", "type": "FILE", "size": 1} for i in range(50)]
    asked: list[int] = []

    def more(n: int) -> bool:
        asked.append(n)
        return n < 25

    async with make_client(fake, list_page_size=10) as c:
        with pytest.raises(ListingStopped):
            await c.list_dir("vm-42", "/d", more)
    assert asked == [10, 20, 30]
    assert sum(fake.op(r) == "files.list" for r in fake.requests) == 3

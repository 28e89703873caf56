"""guestfs-sim: transfer semantics (single use, concurrency, expiry, power-off cuts), every
fault, TLS set-ups, disabled API forms, the ctl command and the demo tree."""

from __future__ import annotations

import json
import random
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from guestfs_mount.sim.testing import ApiClient, Sim, esx_url, run_simulator

DATA = random.Random(7).randbytes(2 * 1024 * 1024 + 3)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("simxfer")
    (root / "data.bin").write_bytes(DATA)
    (root / "small.txt").write_text("hello\n")
    return root


@pytest.fixture(scope="module")
def sim(root: Path) -> Iterator[Sim]:
    with run_simulator("--root", str(root)) as s:
        yield s


@pytest.fixture
def api(sim: Sim) -> Iterator[ApiClient]:
    sim.reset_faults()
    with ApiClient(sim) as c:
        c.login()
        yield c
    sim.reset_faults()


def fetch(sim: Sim, url: str) -> httpx.Response:
    with httpx.Client(verify=sim.esx_verify(), timeout=30) as c:
        return c.get(url)


async def stream_until_error(sim: Sim, url: str, received: list[int]) -> BaseException | None:
    """Read a transfer body; record bytes seen; return the error that ended it, if any."""
    async with httpx.AsyncClient(verify=sim.esx_verify(), timeout=30) as c:
        try:
            async with c.stream("GET", url) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    received[0] += len(chunk)
        except httpx.HTTPError as exc:
            return exc
    return None


# ---- transfer semantics ------------------------------------------------------------------


async def test_concurrent_get_refused_then_single_use(api: ApiClient, sim: Sim) -> None:
    sim.faults(stall_body_after={"bytes": 100_000, "count": 1})
    url = api.transfer_url("/data.bin")
    received = [0]
    async with trio.open_nursery() as n:
        result: list[BaseException | None] = []

        async def first() -> None:
            result.append(await stream_until_error(sim, url, received))

        n.start_soon(first)
        with trio.fail_after(10):
            while received[0] < 100_000:
                await trio.sleep(0.02)
        async with httpx.AsyncClient(verify=sim.esx_verify()) as c:
            second = await c.get(url)
        assert second.status_code in (400, 409)
        sim.faults(stall_body_after=None)  # release the stalled body
    assert result == [None] and received[0] == len(DATA)
    assert fetch(sim, url).status_code in (403, 404)


async def test_power_off_cuts_transfer(api: ApiClient, sim: Sim) -> None:
    vm = sim.vm_id()
    sim.faults(stall_body_after={"bytes": 65536, "count": 1})
    url = api.transfer_url("/data.bin")
    unused = api.transfer_url("/small.txt")
    received = [0]
    result: list[BaseException | None] = []
    try:
        async with trio.open_nursery() as n:

            async def reader() -> None:
                result.append(await stream_until_error(sim, url, received))

            n.start_soon(reader)
            with trio.fail_after(10):
                while received[0] < 65536:
                    await trio.sleep(0.02)
            sim.power(vm, "POWERED_OFF")
        assert isinstance(result[0], httpx.RemoteProtocolError)
        assert received[0] < len(DATA)
        assert fetch(sim, unused).status_code in (403, 404)  # URLs die with the power state
    finally:
        sim.power(vm, "POWERED_ON")
    assert fetch(sim, url).status_code in (403, 404)
    assert sim.stats()["transfers"]["failed"] >= 1


async def test_restart_cuts_and_drops_sessions(api: ApiClient, sim: Sim) -> None:
    sim.faults(stall_body_after={"bytes": 1000, "count": 1})
    url = api.transfer_url("/data.bin")
    received = [0]
    result: list[BaseException | None] = []
    async with trio.open_nursery() as n:

        async def reader() -> None:
            result.append(await stream_until_error(sim, url, received))

        n.start_soon(reader)
        with trio.fail_after(10):
            while received[0] < 1000:
                await trio.sleep(0.02)
        sim.restart()
    assert isinstance(result[0], httpx.RemoteProtocolError)
    assert api.get("/api/vcenter/vm").status_code == 401


def test_file_changes_after_create(api: ApiClient, sim: Sim, root: Path) -> None:
    url = api.transfer_url("/small.txt")
    (root / "small.txt").write_text("changed!\n")
    try:
        assert fetch(sim, url).content == b"changed!\n"  # content as of the GET
    finally:
        (root / "small.txt").write_text("hello\n")


# ---- faults ------------------------------------------------------------------------------


def test_fault_settings_roundtrip(sim: Sim) -> None:
    got = sim.faults(api_latency=0.5, bandwidth=1000, abort_after={"bytes": 5, "count": 2})
    assert got["api_latency"] == 0.5 and got["bandwidth"] == 1000
    assert got["abort_after"] == {"bytes": 5, "count": 2}
    assert sim.faults()["abort_after"] == {"bytes": 5, "count": 2}
    sim.reset_faults()
    assert sim.faults() == {
        "api_latency": 0.0,
        "transfer_latency": 0.0,
        "bandwidth": None,
        "busy_next": 0,
        "unavailable_next": 0,
        "abort_after": None,
        "truncate": None,
        "pad": None,
        "corrupt": None,
        "stall_api": False,
        "stall_body_after": None,
        "omit_content_length": False,
    }
    with httpx.Client(verify=sim.verify()) as c:
        bad = c.post(f"{sim.admin_url}/faults", json={"nonsense": 1})
        assert bad.status_code == 400
        bad = c.post(f"{sim.admin_url}/faults", json={"busy_next": -1})
        assert bad.status_code == 400


def test_fault_abort_after(api: ApiClient, sim: Sim) -> None:
    sim.faults(abort_after={"bytes": 300_000, "count": 1})
    url = api.transfer_url("/data.bin")
    got = 0
    with (
        httpx.Client(verify=sim.esx_verify()) as c,
        pytest.raises(httpx.RemoteProtocolError),
        c.stream("GET", url) as r,
    ):
        assert r.headers["content-length"] == str(len(DATA))
        for chunk in r.iter_raw():
            got += len(chunk)
    assert got == 300_000
    assert api.download("/data.bin") == DATA  # count consumed


def test_fault_truncate_pad_corrupt(api: ApiClient, sim: Sim) -> None:
    sim.faults(truncate={"bytes": 1000, "count": 1})
    r = fetch(sim, api.transfer_url("/data.bin"))
    assert r.status_code == 200 and r.content == DATA[:1000]
    assert r.headers["content-length"] == "1000"
    sim.faults(pad={"bytes": 10, "count": 1})
    r = fetch(sim, api.transfer_url("/data.bin"))
    assert len(r.content) == len(DATA) + 10 and r.content[: len(DATA)] == DATA
    sim.faults(corrupt={"count": 1})
    r = fetch(sim, api.transfer_url("/data.bin"))
    assert len(r.content) == len(DATA) and r.content != DATA
    assert api.download("/data.bin") == DATA


def test_fault_omit_content_length(api: ApiClient, sim: Sim) -> None:
    sim.faults(omit_content_length=True)
    r = fetch(sim, api.transfer_url("/small.txt"))
    assert "content-length" not in r.headers and r.content == b"hello\n"


def test_fault_latencies_and_bandwidth(api: ApiClient, sim: Sim) -> None:
    sim.faults(api_latency=0.3)
    t0 = time.monotonic()
    assert api.get("/api/vcenter/vm").status_code == 200
    assert time.monotonic() - t0 >= 0.3
    sim.faults(api_latency=0, transfer_latency=0.3)
    url = api.transfer_url("/small.txt")
    t0 = time.monotonic()
    assert fetch(sim, url).content == b"hello\n"
    assert time.monotonic() - t0 >= 0.3
    sim.faults(transfer_latency=0, bandwidth=2_000_000)
    t0 = time.monotonic()
    assert api.download("/data.bin") == DATA
    elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 5, elapsed


async def test_fault_stall_api(api: ApiClient, sim: Sim) -> None:
    sim.faults(stall_api=True)
    done: list[int] = []
    async with trio.open_nursery() as n:

        async def call() -> None:
            async with httpx.AsyncClient(verify=sim.verify()) as c:
                r = await c.get(f"{sim.vcenter_url}/api/vcenter/vm", headers=api.headers)
                done.append(r.status_code)

        n.start_soon(call)
        await trio.sleep(0.4)
        assert done == []
        await trio.to_thread.run_sync(lambda: sim.faults(stall_api=False))
    assert done == [200]


async def test_fault_stall_body_client_goes_away(api: ApiClient, sim: Sim) -> None:
    sim.faults(stall_body_after={"bytes": 10_000, "count": 1})
    url = api.transfer_url("/data.bin")
    received = [0]
    with trio.move_on_after(1.0):
        await stream_until_error(sim, url, received)
    assert received[0] == 10_000
    with trio.fail_after(5):
        while sim.stats()["transfers"]["failed"] == 0:
            await trio.sleep(0.05)


# ---- TLS, options, disabled forms --------------------------------------------------------


def test_tls_requires_ca_and_distinct_certs(sim: Sim) -> None:
    with httpx.Client() as c, pytest.raises(httpx.ConnectError):
        c.get(f"{sim.vcenter_url}/api/session")
    vc = ssl.get_server_certificate(("127.0.0.1", int(sim.info["vcenter_port"])))
    esx = ssl.get_server_certificate(("127.0.0.1", int(sim.info["esx_port"])))
    assert vc != esx
    assert sim.ca_file and sim.esx_ca_file
    assert Path(sim.esx_ca_file).read_text() == Path(sim.ca_file).read_text()


def test_separate_esx_ca_no_preview_short_ttl_and_idle(root: Path) -> None:
    with (
        run_simulator(
            "--root",
            str(root),
            "--separate-esx-ca",
            "--no-preview-api",
            "--transfer-ttl",
            "0.5",
            "--session-idle-timeout",
            "0.5",
            "--hostname",
            "sim.test",
        ) as s,
        ApiClient(s) as api,
    ):
        assert s.ca_file and s.esx_ca_file
        assert Path(s.ca_file).read_text() != Path(s.esx_ca_file).read_text()
        api.login()
        url = api.transfer_url("/small.txt")
        with httpx.Client(verify=s.verify()) as c, pytest.raises(httpx.ConnectError):
            c.get(url)  # the vCenter CA does not vouch for the ESXi cert
        assert fetch(s, url).content == b"hello\n"
        r = api.preview_transfer("/small.txt")
        assert r.status_code == 404 and r.json()["error_type"] == "OPERATION_NOT_FOUND"
        assert r.json()["messages"][0]["default_message"] == "Unable to find operations for URL"
        expiring = api.transfer_url("/small.txt")
        time.sleep(0.7)
        assert fetch(s, expiring).status_code in (403, 404)  # transfer TTL
        r = api.get("/api/vcenter/vm")
        assert r.status_code == 401 and r.json()["error_type"] == "UNAUTHENTICATED"  # idle


def test_no_tls_no_released_api_and_url_host(root: Path) -> None:
    with (
        run_simulator(
            "--root",
            str(root),
            "--no-tls",
            "--no-released-api",
            "--omit-content-length",
            "--esx-url-host",
            "esx.example",
        ) as s,
        ApiClient(s) as api,
    ):
        assert s.vcenter_url.startswith("http://") and s.ca_file is None
        api.login()
        r = api.create_transfer("/small.txt")
        assert r.status_code == 404 and r.json()["error_type"] == "OPERATION_NOT_FOUND"
        r = api.preview_transfer("/small.txt")
        assert r.status_code == 200
        port = httpx.URL(s.esx_url).port
        assert r.json().startswith(f"http://esx.example:{port}/guestFile?id=")
        url = r.json().replace("esx.example", "127.0.0.1")
        got = fetch(s, url)
        assert got.content == b"hello\n" and "content-length" not in got.headers


def test_ctl_command_and_demo() -> None:
    with run_simulator("--demo") as s, ApiClient(s) as api:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "guestfs_mount.sim.cli",
                "ctl",
                "--ready-file",
                s.ready_file,
                "POST",
                "faults",
                '{"busy_next": 1}',
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert json.loads(out.stdout)["busy_next"] == 1
        api.login()
        assert api.stat("/etc/hostname").json()["error_type"] == "RESOURCE_BUSY"
        names = [f["filename"] for f in api.list("/home/user/docs").json()["files"]]
        assert "name with spaces.txt" in names and "new\nline" in names
        assert "latin1-caf\udce9.txt" in names
        assert api.download("/etc/hostname") == b"demo-vm\n"
        link = api.stat("/home/user/hostname-abs").json()
        assert link["attributes"]["symlink_target"] == "/etc/hostname"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "guestfs_mount.sim.cli",
                "ctl",
                "--ready-file",
                s.ready_file,
                "GET",
                "stats",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert json.loads(out.stdout)["calls"]["files.list"] == 1
        with open(f"/proc/{s.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert s.password.encode() not in cmdline and s.guest_password.encode() not in cmdline


def test_bad_start_reports_stderr(tmp_path: Path) -> None:
    from guestfs_mount.sim.testing import SimulatorError

    with (
        pytest.raises(SimulatorError, match="not a directory"),
        run_simulator("--root", str(tmp_path / "missing"), timeout=10),
    ):
        pass


def test_esx_url_star_substitution(sim: Sim, api: ApiClient) -> None:
    url = api.create_transfer("/small.txt").json()
    assert esx_url(sim, url).startswith("https://127.0.0.1:")

"""The cost model through a running simulator: knobs (CLI, config, /_sim/cost, ctl),
per-VM stats, rejections and wrong passwords over REST, packets and keep-alive on the
ESXi listener. Service times are small; assertions count, they do not time."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guestfs_mount.sim.cost import PACKET_SIZE
from guestfs_mount.sim.testing import ApiClient, Sim, run_simulator

BIG = 5 * PACKET_SIZE + 123

FAST_REALISTIC = (
    "--cost-model", "realistic", "--seed", "1",
    "--control-delay", "0", "--auth-posix", "0", "--stat-time", "0", "--packet-time", "0",
    "--scan-entry", "0", "--return-entry", "0", "--bad-password-delay", "0.3",
)  # fmt: skip


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    base = tmp_path_factory.mktemp("cost")
    for name in ("a", "b"):
        (base / name / "dir").mkdir(parents=True)
        (base / name / "dir/f.txt").write_text(name)
    (base / "a/big.bin").write_bytes(os.urandom(BIG))
    with run_simulator("--vm", f"a={base / 'a'}", "--vm", f"b={base / 'b'}", *FAST_REALISTIC) as s:
        yield s


@pytest.fixture
def api(sim: Sim) -> Iterator[ApiClient]:
    sim.reset_stats()
    with ApiClient(sim) as client:
        client.login()
        yield client
    sim.admin("POST", "cost", {"model": "realistic", **dict(_knobs())})


def _knobs() -> Iterator[tuple[str, float]]:
    it = iter(FAST_REALISTIC[4:])
    for opt, value in zip(it, it, strict=True):
        yield opt.removeprefix("--").replace("-", "_"), float(value)


def parallel(sim: Sim, n: int, fn: Any) -> list[Any]:
    """Run ``fn(client)`` in n threads, each with its own logged-in client, released
    together so the calls meet at the VM."""
    clients = [ApiClient(sim) for _ in range(n)]
    for c in clients:
        c.login()
    gate = threading.Barrier(n)

    def run(c: ApiClient) -> Any:
        gate.wait()
        return fn(c)

    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            return list(pool.map(run, clients))
    finally:
        for c in clients:
            c.http.close()


def vm_stats(sim: Sim, name: str) -> dict[str, Any]:
    return dict(sim.stats()["vms"][sim.vm_id(name)])


def test_cost_settings_from_cli(sim: Sim) -> None:
    cost = sim.admin("GET", "cost")
    assert cost["model"] == "realistic" and cost["seed"] == 1
    assert cost["guest_concurrency"] == 1 and cost["queue_threshold"] == 8
    assert cost["control_delay"] == 0 and cost["bad_password_delay"] == 0.3
    assert cost["keep_alive"] is False


def test_stats_per_vm_and_reset(sim: Sim, api: ApiClient) -> None:
    a, b = sim.vm_id("a"), sim.vm_id("b")
    assert api.list("/dir", vm=a).status_code == 200
    assert api.list("/dir", vm=a).status_code == 200
    assert api.stat("/dir/f.txt", vm=b).status_code == 200
    stats = sim.stats()
    assert stats["vms"][a]["calls"] == {"files.list": 2}
    assert stats["vms"][a]["calls_by_transport"] == {"rest": {"files.list": 2}}
    assert stats["vms"][b]["calls"] == {"files.get": 1}
    assert stats["vms"][a]["max_serving"] == 1 and stats["vms"][a]["rejections"] == 0
    assert stats["vms"][a]["lane_queue_s"] == 0  # one call at a time never queues
    assert stats["calls"]["files.list"] == 2  # the global counters are still there
    sim.reset_stats()
    assert sim.stats()["vms"] == {}


def test_fifo_one_at_a_time_over_rest(sim: Sim, api: ApiClient) -> None:
    sim.admin("POST", "cost", {"auth_posix": 0.05})
    codes = parallel(sim, 6, lambda c: c.stat("/dir/f.txt", vm=sim.vm_id("a")).status_code)
    assert codes == [200] * 6
    st = vm_stats(sim, "a")
    assert st["max_serving"] == 1
    # calls waited only while the lane worked, never more of them than the deepest queue
    assert (st["lane_queue_s"] > 0) == (st["max_queue"] > 0)
    assert st["lane_queue_s"] <= st["max_queue"] * st["lane_busy_s"]
    uses = sorted(st["recent"], key=lambda r: r["served"])
    assert [r["arrived"] for r in uses] == sorted(r["arrived"] for r in uses)


def test_rejection_beyond_threshold_over_rest(sim: Sim, api: ApiClient) -> None:
    sim.admin("POST", "cost", {"auth_posix": 0.4, "queue_threshold": 1, "reject_step": 1})
    replies = parallel(sim, 6, lambda c: c.stat("/dir/f.txt", vm=sim.vm_id("a")))
    rejected = [r for r in replies if r.status_code != 200]
    assert len(rejected) >= 1 and len(replies) - len(rejected) >= 2
    for r in rejected:
        assert r.status_code == 400
        assert r.json()["error_type"] == "NOT_ALLOWED_IN_CURRENT_STATE"
    st = vm_stats(sim, "a")
    assert st["rejections"] == len(rejected) and st["max_queue"] <= 1


def test_wrong_password_over_rest(sim: Sim, api: ApiClient) -> None:
    creds = {**sim.guest_credentials(), "password": "wrong"}
    r = api.stat("/dir/f.txt", vm=sim.vm_id("a"), credentials=creds)
    assert r.status_code == 401 and r.json()["error_type"] == "UNAUTHENTICATED"
    st = vm_stats(sim, "a")
    assert st["auth_failures"] == 1 and st["lane_busy_s"] >= 0.3


def test_transfer_packets_and_no_keep_alive(sim: Sim, api: ApiClient) -> None:
    url = api.transfer_url("/big.bin", vm=sim.vm_id("a"))
    status, headers, body, closed = raw_get(sim, url)
    assert status == 200 and len(body) == BIG
    assert headers.get("connection") == "close"
    assert closed  # the listener hung up after the body, as ESXi does
    st = vm_stats(sim, "a")
    assert st["packets"] == math.ceil(BIG / PACKET_SIZE) and st["packet_bytes"] == BIG
    assert st["calls"] == {"transfer.create": 1}


def test_keep_alive_in_ideal_model(sim: Sim, api: ApiClient) -> None:
    sim.admin("POST", "cost", {"model": "ideal"})
    url = api.transfer_url("/big.bin", vm=sim.vm_id("a"))
    status, headers, body, closed = raw_get(sim, url)
    assert status == 200 and len(body) == BIG
    assert "connection" not in headers and not closed
    assert vm_stats(sim, "a")["packets"] == math.ceil(BIG / PACKET_SIZE)  # still counted


def raw_get(sim: Sim, url: str) -> tuple[int, dict[str, str], bytes, bool]:
    """GET ``url`` over one raw TLS connection; read the body by Content-Length, then
    tell whether the server closed the connection (EOF) or kept it open."""
    u = httpx.URL(url)
    ctx = sim.esx_verify()
    assert isinstance(ctx, ssl.SSLContext)
    with (
        socket.create_connection(("127.0.0.1", u.port or 443), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        target = u.raw_path.decode()
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, "connection closed before the headers"
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk, "body cut"
            body += chunk
        s.settimeout(1.0)
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
        except (ssl.SSLError, ConnectionResetError):
            closed = True
    return status, headers, body, closed


def test_cost_at_run_time_and_ctl(sim: Sim, api: ApiClient) -> None:
    after = sim.admin("POST", "cost", {"guest_concurrency": 2, "seed": 9})
    assert after["guest_concurrency"] == 2 and after["seed"] == 9 and after["model"] == "realistic"
    bad = httpx.post(f"{sim.admin_url}/cost", json={"nope": 1}, verify=sim.verify())
    assert bad.status_code == 400 and "nope" in bad.json()["error"]
    ctl = [sys.executable, "-m", "guestfs_mount.sim.cli", "ctl", "--ready-file", sim.ready_file]
    done = subprocess.run([*ctl, "POST", "cost", '{"model": "ideal"}'], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["guest_concurrency"] == 0
    assert sim.admin("GET", "cost")["keep_alive"] is True
    refused = subprocess.run([*ctl, "POST", "cost", '{"control_delay": -1}'], capture_output=True)
    assert refused.returncode == 1


def test_cost_from_toml_config_and_cli_precedence(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    config = tmp_path / "sim.toml"
    config.write_text(
        '[cost]\nmodel = "realistic"\nguest_concurrency = 2\ncontrol_delay = 0.01\nseed = 4\n'
    )
    with run_simulator(
        "--root", str(tmp_path / "root"), "--config", str(config), "--control-delay", "0.02"
    ) as s:
        cost = s.admin("GET", "cost")
    assert cost["model"] == "realistic" and cost["guest_concurrency"] == 2
    assert cost["control_delay"] == 0.02 and cost["seed"] == 4  # the command line wins
    assert cost["auth_posix"] == 0.01  # the rest from the realistic preset
    config.write_text("[cost]\nguest_concurrency = -1\n")
    bad = subprocess.run(
        [sys.executable, "-m", "guestfs_mount.sim.cli", "--root", str(tmp_path / "root"),
         "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "guest_concurrency" in bad.stderr

"""The per-VM lane against the simulator's realistic cost model: counted and ordered,
not timed (issue 11 §2): the in-flight cap, foreground before background, back-off
after a rejection, and a prefetch's body yielding to the user's own work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from guestfs_mount.model import CredentialType, GuestCredentials
from guestfs_mount.vcenter import ClientConfig, VCenterClient
from guestfs_mount.vcenter.scheduler import Priority, priority
from tests.memory_writer import MemoryWriter

testing = pytest.importorskip("guestfs_mount.sim.testing")

BIG = 16 << 20  # a user's cat: ~270 packets through the VM's one lane
SMALL = 1 << 20


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root: Path = tmp_path_factory.mktemp("guest")
    for i in range(40):
        (root / f"f{i}").write_bytes(b"x")
    (root / "big.bin").write_bytes(b"b" * BIG)
    (root / "small.bin").write_bytes(b"s" * SMALL)
    # every call waiting beyond 2 is rejected: a client that floods the VM sees it
    with testing.run_simulator(
        "--root", str(root), "--cost-model", "realistic", "--control-delay", "0",
        "--auth-posix", "0.002", "--queue-threshold", "2", "--reject-step", "1",
    ) as s:  # fmt: skip
        yield s


def config(sim: Any, guest_ops: int) -> ClientConfig:
    return ClientConfig(
        server=sim.vcenter_url, user=sim.user, password=sim.password,
        guest=GuestCredentials(CredentialType.USERNAME_PASSWORD, sim.guest_user, sim.guest_password),
        ca_file=sim.ca_file, esx_ca_file=sim.esx_ca_file, api="rest", guest_ops=guest_ops,
        esx_hosts=(f"127.0.0.1:{sim.esx_port}",),
    )  # fmt: skip


async def test_in_flight_cap_keeps_the_guest_queue_short(sim: Any) -> None:
    sim.admin("POST", "stats/reset")
    async with VCenterClient(config(sim, 3)) as c:
        vm = (await c.find_vm(sim.vm_id())).vm
        async with trio.open_nursery() as n:
            for i in range(40):
                n.start_soon(c.stat, vm, f"/f{i}")
        lane = c.scheduler.lane(vm)
        assert lane.stats.max_in_flight <= 3 and lane.stats.calls == 40
    stats = sim.admin("GET", "stats")["vms"][vm]
    assert stats["calls"]["files.get"] == 40
    assert stats["rejections"] == 0 and stats["max_queue"] <= 2


async def test_foreground_is_served_before_waiting_background(sim: Any) -> None:
    done: list[str] = []
    async with VCenterClient(config(sim, 1)) as c:
        vm = (await c.find_vm(sim.vm_id())).vm

        async def stat(tag: str, path: str, prio: Priority) -> None:
            priority.set(prio)  # as read-ahead's tasks mark themselves
            await c.stat(vm, path)
            done.append(tag)

        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(stat, f"bg{i}", f"/f{i}", Priority.BACKGROUND)
            await trio.testing.wait_all_tasks_blocked()  # queued in the lane, one in flight
            n.start_soon(stat, "fg", "/f39", Priority.FOREGROUND)
        lane = c.scheduler.lane(vm)
    # one lane slot: the foreground stat waits for the one call ahead of it at most
    assert "fg" in done[:2], done
    assert lane.stats.background_calls == 10 and lane.stats.max_in_flight == 1


async def test_rejections_back_off_and_no_call_fails(sim: Any) -> None:
    sim.admin("POST", "stats/reset")
    async with VCenterClient(config(sim, 8)) as c:
        vm = (await c.find_vm(sim.vm_id())).vm
        got: list[int] = []

        async def stat(i: int) -> None:
            got.append((await c.stat(vm, f"/f{i}")).size)

        # 8 in flight at once (as if the limit had grown against a faster guest) against
        # a guest that rejects every call waiting beyond 2
        c.scheduler.lane(vm).limit = 8
        async with trio.open_nursery() as n:
            for i in range(40):
                n.start_soon(stat, i)
        lane = c.scheduler.lane(vm)
    stats = sim.admin("GET", "stats")["vms"][vm]
    assert got == [1] * 40  # every rejection was absorbed by a retry
    assert stats["rejections"] > 0 and lane.stats.rejections == stats["rejections"]
    assert c.stats.retries >= lane.stats.rejections
    # each rejection halved the limit: far fewer rejections than calls
    assert stats["rejections"] < 40, stats


async def test_prefetch_yields_to_a_user_cat_and_ls_l_progresses_during_it(sim: Any) -> None:
    events: list[str] = []
    async with VCenterClient(config(sim, 2)) as c:
        vm = (await c.find_vm(sim.vm_id())).vm
        cat_started = trio.Event()

        async def cat() -> None:
            await c.download(vm, "/big.bin", BIG, MemoryWriter(), on_start=lambda n, st: cat_started.set())
            events.append("cat done")

        async def prefetch() -> None:
            priority.set(Priority.BACKGROUND)

            def started(n: int, st: object) -> None:
                events.append("prefetch body")

            await c.download(vm, "/small.bin", SMALL, MemoryWriter(), on_start=started)

        async def ls_l() -> None:
            for i in range(10):
                await c.stat(vm, f"/f{i}")
            events.append("ls -l done")

        async with trio.open_nursery() as n:
            n.start_soon(cat)
            await cat_started.wait()
            n.start_soon(prefetch)
            n.start_soon(ls_l)
        lane = c.scheduler.lane(vm)
    # the cat holds no lane slot: the ls -l gets its calls through while the body runs;
    # the prefetch's body waits until the user's body is done
    assert events == ["ls -l done", "cat done", "prefetch body"], events
    assert lane.stats.background_body_waits == 1 and lane.stats.bodies == 2

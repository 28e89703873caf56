"""The per-VM lane against the simulator's realistic cost model: counted, not timed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from guestfs_mount.model import CredentialType, GuestCredentials
from guestfs_mount.vcenter import ClientConfig, VCenterClient

testing = pytest.importorskip("guestfs_mount.sim.testing")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root: Path = tmp_path_factory.mktemp("guest")
    for i in range(40):
        (root / f"f{i}").write_bytes(b"x")
    # every call waiting beyond 2 is rejected: a client that floods the VM sees it
    with testing.run_simulator(
        "--root", str(root), "--cost-model", "realistic", "--control-delay", "0",
        "--auth-posix", "0.002", "--queue-threshold", "2", "--reject-step", "1",
    ) as s:  # fmt: skip
        yield s


async def test_in_flight_cap_keeps_the_guest_queue_short(sim: Any) -> None:
    sim.admin("POST", "stats/reset")
    config = ClientConfig(
        server=sim.vcenter_url, user=sim.user, password=sim.password,
        guest=GuestCredentials(CredentialType.USERNAME_PASSWORD, sim.guest_user, sim.guest_password),
        ca_file=sim.ca_file, esx_ca_file=sim.esx_ca_file, api="rest", guest_ops=3,
    )  # fmt: skip
    async with VCenterClient(config) as c:
        vm = (await c.find_vm(sim.vm_id())).vm
        async with trio.open_nursery() as n:
            for i in range(40):
                n.start_soon(c.stat, vm, f"/f{i}")
        lane = c.scheduler.lane(vm)
        assert lane.stats.max_in_flight <= 3 and lane.stats.calls == 40
    stats = sim.admin("GET", "stats")["vms"][vm]
    assert stats["calls"]["files.get"] == 40
    assert stats["rejections"] == 0 and stats["max_queue"] <= 2

"""The client side of a fleet: each VM's own guest account, one cap over all VMs."""

from __future__ import annotations

import trio

from guestfs_mount.model import CredentialType, GuestCredentials
from guestfs_mount.vcenter.client import ClientConfig, VCenterClient
from guestfs_mount.vcenter.guestauth import guest_credentials

NOBODY = GuestCredentials(CredentialType.USERNAME_PASSWORD)


def _client(**kw):
    return VCenterClient(ClientConfig(server="vc.example", user="u", password="p", guest=NOBODY,
                                      **kw))  # fmt: skip


async def test_each_vm_call_carries_that_vms_account():
    client = _client()
    alice = GuestCredentials(CredentialType.USERNAME_PASSWORD, "alice", password="a-secret")
    client.set_guest_credentials("vm-1", alice)
    seen = {}

    async def call(vm):
        seen[vm] = guest_credentials(client.config)

    await client._guest("vm-1", lambda: call("vm-1"))
    await client._guest("vm-2", lambda: call("vm-2"))
    assert seen == {"vm-1": alice, "vm-2": NOBODY}
    assert guest_credentials(client.config) is NOBODY  # only while vm-1's call runs
    assert "a-secret" not in client.http.scrub("login a-secret failed")


async def _peak(client, vms):
    """Most calls in flight at once when one call per entry of ``vms`` starts together."""
    now = peak = 0

    async def call():
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await trio.sleep(0.01)
        now -= 1

    async with trio.open_nursery() as n:
        for vm in vms:
            n.start_soon(client._guest, vm, call)
    return peak


async def test_max_guest_ops_caps_calls_over_all_vms():
    client = _client(max_guest_ops=3, guest_ops=8)
    assert await _peak(client, [f"vm-{i % 5}" for i in range(20)]) == 3


async def test_without_a_cap_vms_run_side_by_side():
    client = _client(guest_ops=1)
    assert await _peak(client, [f"vm-{i}" for i in range(5)]) == 5  # a lane per VM, limit 1

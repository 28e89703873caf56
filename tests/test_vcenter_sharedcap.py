"""--max-guest-ops over a fleet: no VM holds more than half the cap, so calls stuck in one
VM's guest leave slots for the others."""

from __future__ import annotations

import trio
import trio.testing

from guestfs_mount.vcenter.sharedcap import SharedCap


async def test_a_stuck_vm_holds_at_most_half_the_cap():
    cap = SharedCap(4)
    stuck = trio.Event()
    inside: dict[str, int] = {"a": 0, "b": 0}
    finished: dict[str, int] = {"a": 0, "b": 0}

    async def call(vm: str, until: trio.Event) -> None:
        async with cap.slot(vm):
            inside[vm] += 1
            await until.wait()
            inside[vm] -= 1
        finished[vm] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):  # five calls of VM a, all stuck in its guest
            nursery.start_soon(call, "a", stuck)
        await trio.testing.wait_all_tasks_blocked()
        assert inside["a"] == 2  # the other three wait for a's share, not for the cap
        done = trio.Event()
        done.set()
        for _ in range(3):
            nursery.start_soon(call, "b", done)
        await trio.testing.wait_all_tasks_blocked()
        assert finished == {"a": 0, "b": 3}  # b's calls went through while a's are stuck
        stuck.set()
    assert finished == {"a": 5, "b": 3}
    assert cap._vms == {}  # idle VMs cost nothing


async def test_a_cap_of_one_is_one_call_at_a_time():
    cap = SharedCap(1)
    assert cap.share == 1
    async with cap.slot("a"):
        with trio.move_on_after(0.01) as scope:
            async with cap.slot("b"):
                pass
        assert scope.cancelled_caught


async def test_background_calls_leave_room_for_the_users():
    """Read-ahead in many VMs (background priority) never holds the whole cap: a
    foreground call goes in at once while background ones wait."""
    from guestfs_mount.vcenter.scheduler import Priority, priority

    cap = SharedCap(8)
    assert cap.reserve == 1
    release = trio.Event()
    inside = {"bg": 0, "fg": 0}

    async def call(vm: str, kind: str, until: trio.Event) -> None:
        if kind == "bg":
            priority.set(Priority.BACKGROUND)
        async with cap.slot(vm):
            inside[kind] += 1
            await until.wait()

    async with trio.open_nursery() as nursery:
        for i in range(12):  # one call in each of 12 VMs: no VM's own share limits them
            nursery.start_soon(call, f"vm-{i}", "bg", release)
        await trio.testing.wait_all_tasks_blocked()
        assert inside["bg"] == 7  # all but the reserve
        nursery.start_soon(call, "vm-user", "fg", release)
        await trio.testing.wait_all_tasks_blocked()
        assert inside == {"bg": 7, "fg": 1}
        release.set()
    assert cap._vms == {}

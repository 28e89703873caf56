"""The simulator's cost model (guestfs_mount.sim.cost) on trio's virtual clock.

The lanes and counters are the production objects; the clock is trio's MockClock
(``autojump_clock``), so service times cost no real time and orders are deterministic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from guestfs_mount.sim.cost import (
    PACKET_SIZE,
    CostError,
    GuestAuthError,
    GuestCost,
    settings_from,
)
from guestfs_mount.sim.state import Vm
from guestfs_mount.sim.vapi import VapiError

VM = Vm("vm-1", "one", b"/")
VM2 = Vm("vm-2", "two", b"/")


def realistic(**kw: Any) -> GuestCost:
    body = {"model": "realistic", "control_delay": 0.0, "auth_posix": 0.01, **kw}
    return GuestCost(settings_from(body), seed=7)


async def arrive_in_order(n: int, fn: Any) -> None:
    """Start ``fn(i)`` for i in 0..n-1, each a little after the previous one."""
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(fn, i)
            await trio.sleep(0.001)


def one_stat(cost: GuestCost) -> Callable[[], Awaitable[None]]:
    """A call that uses VM's lane once, for a stat."""

    async def call() -> None:
        async with cost.guest_op(VM, "files.get"):
            pass

    return call


async def test_one_at_a_time_in_arrival_order(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic()
    served: list[int] = []

    async def call(i: int) -> None:
        async with cost.guest_op(VM, "files.get"):
            served.append(i)

    await arrive_in_order(6, call)
    c = cost.counters["vm-1"]
    assert served == list(range(6))
    assert c.max_serving == 1  # never two lane uses of one VM at once
    assert c.max_queue == 5
    assert [r["arrived"] for r in c.recent] == [r["served"] for r in c.recent]


async def test_queue_integral_counts_waiting_calls_over_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    cost = realistic(stat_time=0.0)  # each lane use: 10 ms of guest authentication

    call = one_stat(cost)

    async with trio.open_nursery() as nursery:  # three calls arrive at the same moment
        for _ in range(3):
            nursery.start_soon(call)
    c = cost.counters["vm-1"]
    # the first is served at once, the second waits 10 ms, the third 20 ms
    assert c.max_queue == 2
    assert c.queue_s == pytest.approx(0.010 + 0.020)
    assert cost.stats_json()["vm-1"]["lane_queue_s"] == pytest.approx(0.03)


async def test_queue_integral_is_current_when_read(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=1.0, stat_time=0.0)
    seen: list[float] = []

    call = one_stat(cost)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
        await trio.sleep(0.5)
        # two calls have waited half a second each, none has been served yet
        seen.append(cost.stats_json()["vm-1"]["lane_queue_s"])
    assert seen == [pytest.approx(1.0)]
    assert cost.counters["vm-1"].queue_s == pytest.approx(1.0 + 2.0)


async def test_queue_integral_starts_again_at_reset(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=1.0, stat_time=0.0)

    call = one_stat(cost)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
        await trio.sleep(1.5)
        cost.reset_stats()  # one waiter left, for another half second
    assert cost.counters["vm-1"].queue_s == pytest.approx(0.5)


async def test_a_waiter_that_goes_away_stops_counting(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=1.0, stat_time=0.0)

    call = one_stat(cost)

    async def impatient() -> None:
        await trio.sleep(0.001)  # after call() holds the lane: trio may start tasks in any order
        with trio.move_on_after(0.25):
            await call()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        nursery.start_soon(impatient)
    c = cost.counters["vm-1"]
    assert c.queue_s == pytest.approx(0.25) and cost.lane("vm-1").queued == 0


async def test_guest_concurrency_servers(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(guest_concurrency=3)

    async def call(i: int) -> None:
        async with cost.guest_op(VM, "files.get"):
            pass

    await arrive_in_order(8, call)
    assert cost.counters["vm-1"].max_serving == 3


async def test_vms_have_separate_lanes(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=0.5)
    other_busy: list[int] = []

    async def call(i: int) -> None:
        vm, other = (VM, VM2) if i % 2 == 0 else (VM2, VM)
        async with cost.guest_op(vm, "files.get"):
            other_busy.append(cost.lane(other.vm).serving)

    await arrive_in_order(4, call)
    assert cost.counters["vm-1"].max_serving == cost.counters["vm-2"].max_serving == 1
    assert 1 in other_busy  # one VM served while the other was busy


async def test_ideal_model_does_not_queue(autojump_clock: trio.abc.Clock) -> None:
    cost = GuestCost()
    start = trio.current_time()

    async def call(i: int) -> None:
        async with cost.guest_op(VM, "files.list") as op:
            op.listed(scanned=10_000, returned=1000)
            await trio.sleep(1)  # the handler's own work, overlapping the others'

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(call, i)
    c = cost.counters["vm-1"]
    assert c.max_serving == 10 and c.max_queue == 0 and c.rejections == 0 and c.queue_s == 0
    assert trio.current_time() - start < 2  # ten 1 s handlers ran side by side


async def test_listing_pays_whole_directory_per_page(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=0.0, scan_entry=0.001, return_entry=0.01)
    async with cost.guest_op(VM, "files.list") as op:
        op.listed(scanned=1000, returned=50)
    assert cost.counters["vm-1"].busy == pytest.approx(1000 * 0.001 + 50 * 0.01)


async def test_rejection_beyond_threshold(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=1.0, queue_threshold=2, reject_step=1.0)
    outcome: dict[int, str] = {}

    async def call(i: int) -> None:
        try:
            async with cost.guest_op(VM, "files.get"):
                outcome[i] = "ok"
        except VapiError as err:
            outcome[i] = err.error_type

    await arrive_in_order(6, call)
    # one in service and two waiting are accepted; a third waiter would exceed 2
    assert [outcome[i] for i in range(6)] == ["ok"] * 3 + ["NOT_ALLOWED_IN_CURRENT_STATE"] * 3
    c = cost.counters["vm-1"]
    assert c.rejections == 3 and c.max_queue == 2
    assert c.calls[("rest", "files.get")] == 6  # rejected calls are counted too


async def test_rejections_grow_with_depth_and_follow_the_seed(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def run(seed: int) -> list[bool]:
        cost = GuestCost(
            settings_from(
                {
                    "model": "realistic",
                    "control_delay": 0.0,
                    "auth_posix": 1.0,
                    "queue_threshold": 1,
                    "reject_step": 0.2,
                }
            ),
            seed=seed,
        )
        rejected: dict[int, bool] = {}

        async def call(i: int) -> None:
            try:
                async with cost.guest_op(VM, "files.get"):
                    rejected[i] = False
            except VapiError:
                rejected[i] = True

        await arrive_in_order(30, call)
        return [rejected[i] for i in range(30)]

    a, b = await run(3), await run(3)
    assert a == b  # same seed, same rejections
    assert a[:2] == [False, False]  # at or below the threshold: never rejected
    assert any(a) and not all(a[2:])


async def test_wrong_password_holds_the_lane(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=0.0, bad_password_delay=2.0)
    t0 = trio.current_time()
    started: dict[str, float] = {}
    failed: list[str] = []

    async def bad() -> None:
        try:
            async with cost.guest_op(VM, "files.get"):
                raise GuestAuthError("UNAUTHENTICATED", "bad guest password")
        except GuestAuthError:
            failed.append("bad")

    async def good() -> None:
        await trio.sleep(0.1)
        async with cost.guest_op(VM, "files.get"):
            started["good"] = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bad)
        nursery.start_soon(good)
    assert failed == ["bad"]
    assert started["good"] >= 2.0  # waited behind the refused login
    c = cost.counters["vm-1"]
    assert c.auth_failures == 1 and c.max_queue == 1


async def test_packets_interleave_with_a_listing(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=0.0, packet_time=0.01)

    async def body() -> None:
        for _ in range(20):
            await cost.packet(VM, PACKET_SIZE)

    async def listing() -> None:
        await trio.sleep(0.055)
        async with cost.guest_op(VM, "files.list") as op:
            op.listed(scanned=3, returned=3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(body)
        nursery.start_soon(listing)
    c = cost.counters["vm-1"]
    order = [r["kind"] for r in sorted(c.recent, key=lambda r: r["served"])]
    at = order.index("files.list")
    assert 0 < at < len(order) - 1  # the listing went between two packets
    assert c.packets == 20 and c.packet_bytes == 20 * PACKET_SIZE and c.max_serving == 1


async def test_a_chunk_counts_its_packets(autojump_clock: trio.abc.Clock) -> None:
    cost = GuestCost()
    await cost.packet(VM, 1024 * 1024)  # ideal model: 1 MiB chunks
    assert cost.counters["vm-1"].packets == -(-1024 * 1024 // PACKET_SIZE)


async def test_stats_by_transport_and_reset(autojump_clock: trio.abc.Clock) -> None:
    cost = GuestCost()
    for transport in ("rest", "soap", "soap"):
        async with cost.guest_op(VM, "files.list", transport):
            pass
    async with cost.guest_op(VM2, "credentials.validate", "vi-json"):
        pass
    stats = cost.stats_json()
    assert stats["vm-1"]["calls"] == {"files.list": 3}
    assert stats["vm-1"]["calls_by_transport"] == {
        "rest": {"files.list": 1},
        "soap": {"files.list": 2},
    }
    assert stats["vm-2"]["calls_by_transport"] == {"vi-json": {"credentials.validate": 1}}
    cost.reset_stats()
    assert cost.stats_json() == {}


async def test_runtime_resize_wakes_waiters(autojump_clock: trio.abc.Clock) -> None:
    cost = realistic(auth_posix=10.0)

    async def call(i: int) -> None:
        async with cost.guest_op(VM, "files.get"):
            pass

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(call, i)
        await trio.sleep(1)
        cost.update({"guest_concurrency": 4})
    assert cost.counters["vm-1"].max_serving == 4


def test_settings_presets_and_validation() -> None:
    ideal = settings_from({})
    assert ideal.guest_concurrency == 0 and ideal.control_delay == 0 and ideal.keep_alive
    real = settings_from({"model": "realistic"})
    assert (real.guest_concurrency, real.queue_threshold, real.keep_alive) == (1, 8, False)
    assert (real.auth_posix, real.auth_windows, real.bad_password_delay) == (0.01, 0.1, 2.0)
    # a model resets every knob to its preset, then the other keys apply
    mixed = settings_from({"guest_concurrency": 3, "model": "realistic"}, ideal)
    assert mixed.guest_concurrency == 3 and mixed.control_delay == 0.08
    back = settings_from({"model": "ideal"}, mixed)
    assert back == ideal
    for bad in (
        {"nope": 1},
        {"model": "fast"},
        {"guest_concurrency": 1.5},
        {"control_delay": -1},
        {"control_delay": True},
        {"keep_alive": 1},
        {"control_jitter": 2},
        {"packet_size": 10},
    ):
        with pytest.raises(CostError):
            settings_from(bad)
    cost = GuestCost()
    with pytest.raises(CostError):
        cost.update({"seed": "x"})
    cost.update({"seed": 5, "model": "realistic"})
    assert cost.to_json()["seed"] == 5 and cost.to_json()["model"] == "realistic"

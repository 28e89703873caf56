"""Fleet read-ahead: which user requests make which VMs be opened and read ahead, counted
on fake VMs (opens, stats, listings, downloads per VM). Runs on trio's autojump clock:
``settle()`` returns once all background work is done, without waiting in real time."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from guestfs_mount.cache.content import ContentKey
from guestfs_mount.errors import NotFound
from guestfs_mount.fleet.readahead import (
    _DOWNLOADS,
    FleetReadAhead,
    _InOrder,
    guest_path,
    relative_path,
)
from guestfs_mount.model import FileType, GuestStat
from guestfs_mount.paths import PosixPaths

KEYS = "/root/.ssh/authorized_keys"
TREE = {
    "/root": FileType.DIRECTORY,
    "/root/.ssh": FileType.DIRECTORY,
    KEYS: FileType.FILE,
    "/etc/medium.db": FileType.FILE,
    "/var/big.log": FileType.FILE,
}
SIZES = {"/var/big.log": 8 << 20, "/etc/medium.db": 512 << 10}


class FakeContent:
    """The shared content cache: which keys were downloaded, how many at once."""

    def __init__(self) -> None:
        self.opened: list[ContentKey] = []
        self.running = self.peak = 0
        self.events: list[tuple[str, str, str, float]] = []  # every VM's guest calls

    async def open(self, key: ContentKey) -> int:
        self.opened.append(key)
        self.running += 1
        self.peak = max(self.peak, self.running)
        return len(self.opened) - 1

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        await trio.sleep(0.1)  # the body arrives
        return b"x"

    def release(self, handle: int) -> None:
        self.running -= 1


class FakeMeta:
    paths = PosixPaths()

    def __init__(self, vm: FakeVm) -> None:
        self.vm = vm
        self.listings: dict[str, bool] = {}
        self.stats: dict[str, GuestStat] = {}

    async def stat(self, path: str) -> GuestStat:
        if path in self.stats:  # cached, as the metadata cache does
            return self.stats[path]
        self.vm.calls.append(("stat", path))
        self.vm.ctx.content.events.append(("stat", path, self.vm.vm, trio.current_time()))
        await trio.sleep(0.1)
        kind = TREE.get(path)
        if kind is None:
            raise NotFound(path)
        st = self.stats[path] = GuestStat(
            type=kind, size=SIZES.get(path, 90), mtime_ns=1, atime_ns=1
        )
        return st

    def cached_listing(self, path: str) -> object | None:
        return () if path in self.listings else None

    async def listdir(self, path: str) -> tuple[object, ...]:
        self.vm.calls.append(("list", path))
        self.vm.ctx.content.events.append(("list", path, self.vm.vm, trio.current_time()))
        await trio.sleep(0.1)
        self.listings[path] = True
        return ()


class FakeVm:
    """What read-ahead uses of a FleetVm; ``calls`` is what its guest saw."""

    def __init__(self, i: int, content: FakeContent, *, windows: bool = False) -> None:
        self.vm = f"vm-{i}"
        self.windows = windows
        self.failure: object | None = None
        self.meta: FakeMeta | None = None
        self.roots: dict[str, object] = {}
        self.opens = 0
        self.calls: list[tuple[str, str]] = []
        self.ctx: Any = type("Ctx", (), {"content": content})()

    async def ready(self) -> None:
        if self.meta is None:
            self.opens += 1
            await trio.sleep(0.3)
            self.meta = FakeMeta(self)
            self.roots["/"] = object()

    async def identify(self) -> str:
        await trio.sleep(0.08)  # a vCenter call, not a guest one
        return "windows" if self.windows else "linux"

    def ops_for(self, path: str) -> object | None:
        return None if self.windows and path[1:3] != ":\\" else object()


async def settle() -> None:
    await trio.sleep(3600)  # virtual: all background work is done by then


def fleet(nursery: trio.Nursery, n: int = 40, **kw: Any) -> tuple[FleetReadAhead, list[Any]]:
    content = FakeContent()
    vms: list[Any] = [FakeVm(i, content) for i in range(n)]
    ra = FleetReadAhead(nursery, **kw)
    ra.on_listing(vms)
    return ra, vms


async def user(vm: Any, ra: FleetReadAhead, rel: str) -> None:
    """The user's lookup in ``vm`` (its own open and stat), then the FUSE layer's call."""
    await vm.ready()
    try:
        await vm.meta.stat(rel)
    except NotFound:
        pass
    ra.on_lookup(vm, rel)


def opened(vms: list[Any]) -> list[int]:
    return [i for i, vm in enumerate(vms) if vm.opens]


async def test_one_vm_alone_opens_no_other(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery)
    await user(vms[0], ra, "/root")
    await user(vms[0], ra, "/root/.ssh")
    await user(vms[0], ra, KEYS)
    ra.on_open(vms[0], KEYS)  # cat one file of one VM
    await settle()
    assert opened(vms) == [0]
    assert ra.started == 0


async def test_nothing_before_the_root_is_listed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    content = FakeContent()
    vms: list[Any] = [FakeVm(i, content) for i in range(10)]
    ra = FleetReadAhead(nursery)  # no on_listing: the user typed the VM names
    for vm in vms[:3]:
        await user(vm, ra, "/root")
    await settle()
    assert opened(vms) == [0, 1, 2]


async def test_second_vm_reads_ahead_the_next_ones_in_a_doubling_window(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery, first_window=4)
    await user(vms[0], ra, "/root")
    await user(vms[1], ra, "/root")  # the same path in a second VM: a walk
    await settle()
    assert opened(vms) == [0, 1, 2, 3, 4, 5]  # window 4 ahead of the user's VM 1
    for i in (2, 3, 4, 5):
        assert ("stat", "/root") in vms[i].calls
        assert ("list", "/root") in vms[i].calls  # what the next glob level looks up
    await user(vms[2], ra, "/root")  # the user moves on: the window doubles to 8
    await settle()
    assert opened(vms) == list(range(11))
    assert all(vm.calls.count(("stat", "/root")) == 1 for vm in vms[3:11])  # once each


async def test_a_backward_walk_reads_ahead_backwards(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # bash expands `*/root` from the last name of the listing to the first
    ra, vms = fleet(nursery, n=20, first_window=4)
    await user(vms[19], ra, "/root")
    await user(vms[18], ra, "/root")
    await settle()
    assert opened(vms) == [14, 15, 16, 17, 18, 19]


async def test_never_a_vm_that_failed_to_open(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery, first_window=4)
    vms[3].failure = object()  # its login was refused: remembered
    await user(vms[0], ra, "/root")
    await user(vms[1], ra, "/root")
    await settle()
    assert opened(vms) == [0, 1, 2, 4, 5]
    assert vms[3].calls == [] and ra.skipped_failed == 1


async def test_the_next_glob_level_is_a_walk_from_its_first_vm(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery, n=10, first_window=16)
    for vm in vms[:2]:
        await user(vm, ra, "/root")
    await settle()
    assert opened(vms) == list(range(10))
    # the user's own VMs had /root listed too: level 2 is answered from there
    assert all(("list", "/root") in vm.calls for vm in vms)
    before = ra.started
    await user(vms[0], ra, "/root/.ssh")  # level 2 starts: every other VM at once
    await settle()
    assert ra.started == before + 10  # 9 VMs ahead, and the user's own listing below
    assert all(("list", "/root/.ssh") in vm.calls for vm in vms)
    await user(vms[0], ra, KEYS)  # level 3: a small file, fetched in every VM
    await settle()
    content = vms[0].ctx.content
    # each VM's own entry of the shared cache (the key names the VM), all complete
    assert sorted(k.path for k in content.opened) == [f"vm-{i}\0{KEYS}" for i in range(10)]
    assert ra.downloads == 10 and content.running == 0


async def test_an_open_walk_downloads_what_a_lookup_walk_does_not(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery, n=6, first_window=16)
    for vm in vms[:2]:  # ls -l /mnt/vc/*/etc/medium.db: 512 KiB is not fetched for that
        await user(vm, ra, "/etc/medium.db")
    await settle()
    content = vms[0].ctx.content
    assert content.opened == [] and opened(vms) == list(range(6))
    ra.on_open(vms[0], "/etc/medium.db")  # sha256sum /mnt/vc/*/etc/medium.db
    await settle()
    assert sorted(k.path for k in content.opened) == [
        f"vm-{i}\0/etc/medium.db" for i in range(1, 6)
    ]


async def test_large_files_are_not_downloaded_ahead(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery, n=6, first_window=16)
    for vm in vms[:2]:
        await user(vm, ra, "/var/big.log")
        ra.on_open(vm, "/var/big.log")
    await settle()
    assert vms[0].ctx.content.opened == []
    assert all(("stat", "/var/big.log") in vm.calls for vm in vms)


async def test_prefetch_off_reads_metadata_ahead_only(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery, n=6, first_window=16, prefetch=False)
    for vm in vms[:2]:
        await user(vm, ra, KEYS)
        ra.on_open(vm, KEYS)
    await settle()
    assert vms[0].ctx.content.opened == []
    assert opened(vms) == list(range(6))


def test_windows_paths_below_the_vm_directory() -> None:
    win: Any = FakeVm(1, FakeContent(), windows=True)
    lin: Any = FakeVm(2, FakeContent())
    assert guest_path(win, "/C/Users/x") == "C:\\Users\\x"
    assert guest_path(win, "/d") == "D:\\"
    assert guest_path(win, "/root/.ssh") is None
    assert relative_path(win, "C:\\Users\\x") == "/C/Users/x"
    assert relative_path(win, "C:\\") == "/C"
    assert guest_path(lin, KEYS) == KEYS == relative_path(lin, KEYS)


async def test_downloads_ahead_are_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ra, vms = fleet(nursery, n=200, first_window=256)
    for vm in vms[:2]:
        await user(vm, ra, KEYS)
        ra.on_open(vm, KEYS)
    await settle()
    content = vms[0].ctx.content
    assert ra.downloads == len(content.opened) >= 200
    assert content.peak <= _DOWNLOADS


async def test_the_next_levels_listings_wait_for_this_levels_stats(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The shell waits for `root` in every VM before it looks up `.ssh` in any: the
    # listings of /root (for that next level) wait while stats of /root in other VMs do
    ra, vms = fleet(nursery, n=20, width=4, first_window=64)
    for vm in vms:  # open already: a slot's stat starts when the slot is taken
        vm.meta, vm.roots["/"] = FakeMeta(vm), object()
    for vm in vms[:2]:
        await user(vm, ra, "/root")
    await settle()
    events = vms[0].ctx.content.events
    ahead = [e for e in events if e[2] not in ("vm-0", "vm-1")]
    stats = [e[3] for e in ahead if e[:2] == ("stat", "/root")]
    lists = [e[3] for e in ahead if e[:2] == ("list", "/root")]
    assert len(stats) == len(lists) == 18  # every VM read ahead is stat'ed, then listed
    assert max(stats) <= min(lists)  # 5 rounds of 4 stats, then the listings


async def test_waiting_downloads_go_in_listing_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # bash expands a glob from the last VM backwards, then grep reads from the first:
    # the downloads waiting for a slot go lowest listing index first
    gate = _InOrder(2)
    ran: list[int] = []

    async def download(order: int) -> None:
        async with gate.hold(order):
            ran.append(order)
            await trio.sleep(1)

    for order in (90, 80, 70, 60, 3, 2, 1, 0):  # the order the lookups reach them
        nursery.start_soon(download, order)
        await trio.sleep(0.01)
    await settle()
    assert ran == [90, 80, 0, 1, 2, 3, 60, 70]


async def test_a_cancelled_waiter_gives_no_slot_away(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    gate = _InOrder(1)
    ran: list[int] = []

    async def download(order: int, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            async with gate.hold(order):
                ran.append(order)
                await trio.sleep(1)

    nursery.start_soon(download, 5)
    await trio.sleep(0.01)
    scope = trio.CancelScope()
    nursery.start_soon(download, 1, scope)
    nursery.start_soon(download, 2)
    await trio.sleep(0.01)
    scope.cancel()  # a read-ahead given up while waiting
    await settle()
    assert ran == [5, 2]
    async with gate.hold(0):  # every slot came back
        pass


async def test_a_posix_walk_opens_no_windows_vm(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    content = FakeContent()
    vms: list[Any] = [FakeVm(i, content, windows=i % 2 == 1) for i in range(10)]
    ra = FleetReadAhead(nursery)
    ra.on_listing(vms)
    for vm in (vms[0], vms[2]):
        await user(vm, ra, "/root")
    await settle()
    assert opened(vms) == [0, 2, 4, 6, 8]  # vCenter says which are Windows: no login


async def test_the_nearest_vms_are_read_ahead_first(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The shell reaches the VMs one after the other: with more VMs than slots, the
    # ones it reaches next take the slots first (trio starts tasks in any order)
    ra, vms = fleet(nursery, n=30, width=4, first_window=64)
    for vm in vms:
        vm.meta, vm.roots["/"] = FakeMeta(vm), object()
    for vm in vms[-1:-3:-1]:  # bash: from the last VM backwards
        await user(vm, ra, KEYS)
    await settle()
    ahead = [e for e in vms[0].ctx.content.events
             if e[:2] == ("stat", KEYS) and e[2] not in ("vm-29", "vm-28")]  # fmt: skip
    rounds = [sorted(int(e[2][3:]) for e in ahead if e[3] == t)
              for t in sorted({e[3] for e in ahead})]  # fmt: skip
    assert [r for r in rounds if r] == [
        [24, 25, 26, 27], [20, 21, 22, 23], [16, 17, 18, 19], [12, 13, 14, 15],
        [8, 9, 10, 11], [4, 5, 6, 7], [0, 1, 2, 3],
    ]  # fmt: skip


def test_a_mounted_fleet_keeps_its_setup_out_of_the_collector() -> None:
    # What the mount holds once set up lives as long as the mount: frozen, and young
    # objects collected less often (a fleet command's many HTTPS exchanges)
    import gc

    from guestfs_mount.fleet import serve

    before = gc.get_threshold()
    try:
        serve._settle_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == serve._GC_YOUNG > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

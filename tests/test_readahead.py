"""Read-ahead policy: which kernel requests make what be fetched ahead, counted on a fake guest.

The tests run on trio's autojump clock: ``settle()`` returns once all background work is
done, however long the fake guest takes, without waiting in real time.
"""

from __future__ import annotations

import trio
import trio.testing

from guestfs_mount.cache.content import ContentKey
from guestfs_mount.meta import MetadataCache
from guestfs_mount.model import DirEntry, FileType, GuestStat
from guestfs_mount.readahead import ReadAhead
from guestfs_mount.vcenter.scheduler import Priority, priority

from .guests import FakeGuest, big_tree


class Prefetches:
    def __init__(self, budget: int = 1000) -> None:
        self.keys: list[ContentKey] = []
        self.budget = budget

    async def prefetch(self, key: ContentKey) -> bool:
        self.keys.append(key)
        return len(self.keys) < self.budget


async def settle() -> None:
    await trio.sleep(3600)  # virtual: everything else is done or blocked for ever by then


def setup(
    nursery: trio.Nursery, tree: dict[str, list[DirEntry]], background_parallel: int = 32
) -> tuple[FakeGuest, MetadataCache, ReadAhead, Prefetches]:
    g = FakeGuest(tree)
    m = MetadataCache(g, nursery=nursery, background_parallel=background_parallel)
    content = Prefetches()
    return g, m, ReadAhead(m, content, nursery=nursery), content


async def test_stat_ahead_once_per_listing_parallel_and_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    g, m, ra, _ = setup(nursery, big_tree(200), background_parallel=16)
    await m.listdir("/")
    ra.on_getattr("/f0")  # ls -l asks for the first entry ...
    ra.on_getattr("/f1")  # ... then for the next: the siblings are fetched once
    st = await m.stat("/f199")
    assert st.permissions == 0o640
    await settle()
    # nobody read them yet: the budget (64 unread results) holds the rest back
    assert len(g.stat_calls) <= 64 + 1
    for e in await m.listdir("/"):
        await m.stat(f"/{e.name}")  # ls -l reads on, in listing order: stat-ahead follows
    await settle()
    assert len(g.stat_calls) == 201 and len(set(g.stat_calls)) == 201
    assert 1 < g.peak <= 16 + 1  # the foreground stat does not queue behind stat-ahead


async def test_stat_ahead_again_for_a_new_listing_never_for_the_root(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    clock = [0.0]
    g = FakeGuest(big_tree(3))
    m = MetadataCache(g, nursery=nursery, ttl=10, clock=lambda: clock[0])
    ra = ReadAhead(m, Prefetches(), nursery=nursery, clock=lambda: clock[0])
    ra.on_getattr("/")  # the root has no listed parent
    ra.on_getattr("/f0")  # nothing listed yet: nothing to guess from
    await settle()
    assert g.stat_calls == []
    await m.listdir("/")
    ra.on_getattr("/f0")
    await settle()
    assert sorted(g.stat_calls) == ["/d", "/f0", "/f1", "/f2"]
    clock[0] = 11  # the listing and the stats expired
    await m.listdir("/")
    ra.on_getattr("/f0")  # a new listing gets its own stat-ahead
    await settle()
    assert len(g.stat_calls) == 8


async def test_list_ahead_lists_sibling_directories_and_stats_when_stated(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    g, m, ra, _ = setup(nursery, big_tree(3))
    await m.listdir("/d")
    await m.listdir("/d/sub1")
    ra.on_getattr("/d/sub1")  # the user stat'ed entries of /d ...
    ra.on_opendir("/d/sub1")  # ... and walked into one of its subdirectories
    await settle()
    ra.on_opendir("/d/sub2")  # once per parent
    await settle()
    assert sorted(g.list_calls) == ["/d", "/d/sub1", "/d/sub2"]
    assert "/d/sub2/y" in g.stat_calls  # stat'ed ahead one level down


async def test_list_ahead_alone_lists_names_only(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    g, m, ra, _ = setup(nursery, big_tree(3))
    await m.listdir("/d")
    ra.on_opendir("/d/sub1")  # find without -ls
    ra.on_opendir("/d")  # the parent of /d is the root, never listed ahead
    await settle()
    assert sorted(g.list_calls) == ["/d", "/d/sub1", "/d/sub2"]
    assert g.stat_calls == []


def files(n: int, big: tuple[int, ...] = ()) -> dict[str, list[DirEntry]]:
    size = {i: 5 << 20 for i in big}  # larger than a prefetch takes
    return {"/": [DirEntry(f"f{i:03}", FileType.FILE, size.get(i, 10)) for i in range(n)]}


async def test_prefetch_window_follows_the_reader_in_listing_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    g, m, ra, content = setup(nursery, files(100, big=(2,)))
    await m.listdir("/")
    ra.on_open("/f000")  # a listing cached but never read by the user: no walk to serve
    await settle()
    assert content.keys == []
    ra.on_opendir("/")
    ra.on_open("/f000")
    await settle()
    assert [k.path for k in content.keys] == [f"/f{i:03}" for i in range(1, 34) if i != 2]
    ra.on_open("/f010")  # not past the middle of the window yet: nothing more
    await settle()
    assert len(content.keys) == 32
    ra.on_open("/f020")  # past it: the next 32 after the reader (the cache skips those it has)
    await settle()
    assert [k.path for k in content.keys[32:]] == [f"/f{i:03}" for i in range(21, 53)]


async def test_prefetch_stops_when_the_budget_is_spent_and_can_be_off(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    g = FakeGuest(files(100))
    m = MetadataCache(g, nursery=nursery)
    content = Prefetches(budget=5)
    await m.listdir("/")
    for ra, first in (
        (ReadAhead(m, content, nursery=nursery), "/f000"),
        (ReadAhead(m, content, nursery=nursery, prefetch=False), "/f050"),
    ):
        ra.on_opendir("/")
        ra.on_open(first)
    await settle()
    assert [k.path for k in content.keys] == [f"/f{i:03}" for i in range(1, 6)]


async def test_prefetch_window_is_bounded_in_bytes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    tree = {"/": [DirEntry(f"f{i:03}", FileType.FILE, 3 << 20) for i in range(40)]}
    g, m, ra, content = setup(nursery, tree)
    await m.listdir("/")
    ra.on_opendir("/")
    ra.on_open("/f000")
    await settle()
    # 16 MiB of files ahead of one open: 5 files of 3 MiB, not 32
    assert [k.path for k in content.keys] == [f"/f{i:03}" for i in range(1, 6)]


class OneLaneGuest(FakeGuest):
    """A guest like a real VM's: each stat pays a delay in parallel, then holds the one
    lane for a service time (so answers come one at a time). Records the priority each
    stat came at."""

    def __init__(self, tree: dict[str, list[DirEntry]]) -> None:
        super().__init__(tree, delay=0.0)
        self.lane = trio.Lock()
        self.foreground_stats: list[str] = []

    async def stat(self, path: str) -> GuestStat:
        if priority.get() is Priority.FOREGROUND:
            self.foreground_stats.append(path)
        await trio.sleep(0.08)
        async with self.lane:
            await trio.sleep(0.01)
            return await super().stat(path)


async def test_a_reader_that_keeps_up_with_stat_ahead_does_not_stop_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # ls -l over REST: one getattr after another, each waiting for its answer. The
    # reader soon waits on stats that stat-ahead has on their way; those answers were
    # read, but were counted as unread: they used up the budget (64) and stopped
    # stat-ahead after ~90 entries, and ls went on one foreground stat at a time.
    g = OneLaneGuest(big_tree(500))
    m = MetadataCache(g, nursery=nursery, background_parallel=8)
    ra = ReadAhead(m, Prefetches(), nursery=nursery)
    for e in await m.listdir("/"):
        path = f"/{e.name}"
        if m.cached_stat(path) is None:  # what fs.getattr does
            ra.on_getattr(path)
            await m.stat(path)
    await settle()
    assert m.counters["background_stopped"] == 0
    assert g.foreground_stats == ["/d"]  # the first entry; stat-ahead fetched the rest
    assert len(g.stat_calls) == 501 and len(set(g.stat_calls)) == 501

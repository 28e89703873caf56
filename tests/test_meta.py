"""MetadataCache: TTL, negative caching, deduplication, stat-ahead and list-ahead."""

import pytest
import trio
import trio.testing

from guestfs_mount.errors import NotFound, ResourceBusy
from guestfs_mount.meta import MetadataCache
from guestfs_mount.model import DirEntry, FileType, GuestStat


class FakeGuest:
    def __init__(self, tree: dict[str, list[DirEntry]], delay: float = 0.01):
        self.tree = tree
        self.delay = delay
        self.stat_calls: list[str] = []
        self.list_calls: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self.fail: set[str] = set()

    async def list_dir(self, path):
        self.list_calls.append(path)
        await trio.sleep(self.delay)
        return list(self.tree[path])

    async def stat(self, path):
        self.stat_calls.append(path)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.sleep(self.delay)
            if path in self.fail:
                raise ResourceBusy("busy", path=path)
            if path in self.tree:
                return GuestStat(FileType.DIRECTORY, 4096, 0, 0)
            parent, _, name = path.rpartition("/")
            for e in self.tree.get(parent or "/", []):
                if e.name == name:
                    return GuestStat(e.type, e.size, 10**9, 10**9, permissions=0o640)
            raise NotFound("nope", path=path)
        finally:
            self.in_flight -= 1


def big_tree(n=100):
    return {
        "/": [DirEntry("d", FileType.DIRECTORY, 0)]
        + [DirEntry(f"f{i}", FileType.FILE, i) for i in range(n)],
        "/d": [DirEntry("sub1", FileType.DIRECTORY, 0), DirEntry("sub2", FileType.DIRECTORY, 0)],
        "/d/sub1": [DirEntry("x", FileType.FILE, 1)],
        "/d/sub2": [DirEntry("y", FileType.FILE, 2)],
    }


async def test_concurrent_stats_share_one_call():
    g = FakeGuest(big_tree())
    m = MetadataCache(g)
    results = []

    async def one():
        results.append(await m.stat("/f1"))

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(one)
    assert len(results) == 10 and g.stat_calls == ["/f1"]


async def test_errors_are_shared_and_not_cached():
    g = FakeGuest(big_tree())
    g.fail.add("/f2")
    m = MetadataCache(g)
    for _ in range(2):
        with pytest.raises(ResourceBusy):
            await m.stat("/f2")
    assert g.stat_calls == ["/f2", "/f2"]


async def test_ttl_and_negative_cache():
    clock = [0.0]
    g = FakeGuest(big_tree())
    m = MetadataCache(g, ttl=60, negative_ttl=5, clock=lambda: clock[0])
    await m.stat("/f1")
    await m.stat("/f1")
    with pytest.raises(NotFound):
        await m.stat("/missing")
    with pytest.raises(NotFound):
        await m.stat("/missing")
    assert g.stat_calls == ["/f1", "/missing"]
    clock[0] = 10  # negative entry expired, positive not
    with pytest.raises(NotFound):
        await m.stat("/missing")
    await m.stat("/f1")
    assert g.stat_calls == ["/f1", "/missing", "/missing"]
    clock[0] = 100
    await m.stat("/f1")
    assert g.stat_calls.count("/f1") == 2


async def test_frozen_never_refetches():
    clock = [0.0]
    g = FakeGuest(big_tree())
    m = MetadataCache(g, ttl=1, frozen=True, clock=lambda: clock[0])
    await m.listdir("/")
    await m.stat("/f1")
    clock[0] = 1e6
    await m.listdir("/")
    await m.stat("/f1")
    assert g.list_calls == ["/"] and g.stat_calls == ["/f1"]


async def test_listing_makes_no_stat_and_stat_ahead_is_parallel_and_bounded():
    g = FakeGuest(big_tree(200))
    m = MetadataCache(g, stat_parallel=16)
    async with trio.open_nursery() as n:
        m.start(n)
        entries = await m.listdir("/")
        assert len(entries) == 201 and g.stat_calls == []
        assert m.entry("/", "f5") == DirEntry("f5", FileType.FILE, 5)
        assert m.entry("/", "nope") is False
        assert m.entry("/elsewhere", "x") is None
        with trio.fail_after(5):
            m.stat_ahead("/")
            m.stat_ahead("/")  # once per listing
            st = await m.stat("/f199")
            assert st.permissions == 0o640
    assert len(g.stat_calls) == 201
    assert len(set(g.stat_calls)) == 201
    assert 1 < g.peak <= 16 + 1  # the foreground stat does not queue behind stat-ahead


async def test_list_ahead_lists_subdirectories_and_stats_when_hungry():
    g = FakeGuest(big_tree(3))
    m = MetadataCache(g)
    async with trio.open_nursery() as n:
        m.start(n)
        await m.listdir("/d")
        m.stat_ahead("/d")  # the user stat'ed entries of /d ...
        m.list_ahead("/d")  # ... and walked into one of its subdirectories
    assert sorted(g.list_calls) == ["/d", "/d/sub1", "/d/sub2"]
    assert {"/d/sub1/x", "/d/sub2/y"} <= set(g.stat_calls)


async def test_cancelled_owner_lets_waiter_take_over():
    g = FakeGuest(big_tree(), delay=1)
    m = MetadataCache(g)
    got = []

    async def waiter():
        got.append(await m.stat("/f1"))

    async with trio.open_nursery() as n:
        with trio.move_on_after(0.1):
            async with trio.open_nursery() as inner:
                inner.start_soon(m.stat, "/f1")
                await trio.sleep(0.01)
                n.start_soon(waiter)
                await trio.sleep(10)
    assert len(got) == 1


async def test_entry_lookup_exact_casefolded_and_position():
    g = FakeGuest({"/": [DirEntry("README.txt", FileType.FILE, 1), DirEntry("b", FileType.FILE, 2)]})
    m = MetadataCache(g)
    assert m.entry_casefold("/", "readme.TXT") is None  # nothing listed yet
    await m.listdir("/")
    assert m.entry("/", "readme.txt") is False
    assert m.entry_casefold("/", "readme.TXT") == DirEntry("README.txt", FileType.FILE, 1)
    assert m.position("/", "b") == 1 and m.position("/", "zz") is None

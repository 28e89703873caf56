"""MetadataCache: TTL, negative caching, deduplication, bounded background fetches."""

from collections.abc import Callable

import pytest
import trio
import trio.testing

from guestfs_mount.errors import ListingStopped, NotFound, ResourceBusy
from guestfs_mount.meta import Budget, MetadataCache, _Flights
from guestfs_mount.model import DirEntry, FileType, GuestStat
from guestfs_mount.urgency import Priority, priority
from guestfs_mount.vcenter.scheduler import Lane

from .guests import FakeGuest, big_tree


async def test_concurrent_stats_share_one_call(nursery):
    g = FakeGuest(big_tree())
    m = MetadataCache(g, nursery=nursery)
    results = []

    async def one():
        results.append(await m.stat("/f1"))

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(one)
    assert len(results) == 10 and g.stat_calls == ["/f1"]


async def test_errors_are_shared_and_not_cached(nursery):
    g = FakeGuest(big_tree())
    g.fail.add("/f2")
    m = MetadataCache(g, nursery=nursery)
    for _ in range(2):
        with pytest.raises(ResourceBusy):
            await m.stat("/f2")
    assert g.stat_calls == ["/f2", "/f2"]


async def test_ttl_and_negative_cache(nursery):
    clock = [0.0]
    g = FakeGuest(big_tree())
    m = MetadataCache(g, nursery=nursery, ttl=60, negative_ttl=5, clock=lambda: clock[0])
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


async def test_frozen_never_refetches(nursery):
    clock = [0.0]
    g = FakeGuest(big_tree())
    m = MetadataCache(g, nursery=nursery, ttl=1, frozen=True, clock=lambda: clock[0])
    await m.listdir("/")
    await m.stat("/f1")
    clock[0] = 1e6
    await m.listdir("/")
    await m.stat("/f1")
    assert g.list_calls == ["/"] and g.stat_calls == ["/f1"]


async def test_listing_makes_no_stat_and_background_stats_are_bounded():
    g = FakeGuest(big_tree(200))
    with trio.fail_after(5):
        async with trio.open_nursery() as n:  # left once the background work is done
            m = MetadataCache(g, nursery=n, background_parallel=16, budget=Budget(calls=500))
            entries = await m.listdir("/")
            assert len(entries) == 201 and g.stat_calls == []
            assert m.entry("/", "f5") == DirEntry("f5", FileType.FILE, 5)
            assert m.entry("/", "nope") is False
            assert m.entry("/elsewhere", "x") is None
            await m.stat("/f0")
            everything = [f"/f{i}" for i in range(200)]
            m.stat_in_background(everything)
            m.stat_in_background(everything)  # those cached or in flight are not asked again
            st = await m.stat("/f199")
            assert st.permissions == 0o640
    assert sorted(g.stat_calls) == sorted(everything)  # each once
    assert 1 < g.peak <= 16 + 1  # the foreground stat does not queue behind the background


async def test_background_listings_skip_cached_and_call_back():
    g = FakeGuest(big_tree(3))
    listed: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            m = MetadataCache(g, nursery=n)
            await m.listdir("/d/sub1")
            v1 = m.listing_version("/d/sub1")
            m.list_in_background(["/d/sub1", "/d/sub2", "/d"], at_most=1, then=listed.append)
    assert g.list_calls == ["/d/sub1", "/d/sub2"] and listed == ["/d/sub2"]
    assert m.listing_version("/d/sub1") == v1 != m.listing_version("/d/sub2")
    assert m.listing_version("/elsewhere") is None


async def test_cancelled_owner_lets_waiter_take_over(nursery):
    g = FakeGuest(big_tree(), delay=1)
    m = MetadataCache(g, nursery=nursery)
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


async def test_entry_lookup_exact_casefolded_and_position(nursery):
    g = FakeGuest({"/": [DirEntry("README.txt", FileType.FILE, 1), DirEntry("b", FileType.FILE, 2)]})
    m = MetadataCache(g, nursery=nursery)
    assert m.entry_casefold("/", "readme.TXT") is None  # nothing listed yet
    await m.listdir("/")
    assert m.entry("/", "readme.txt") is False
    assert m.entry_casefold("/", "readme.TXT") == DirEntry("README.txt", FileType.FILE, 1)
    assert m.position("/", "b") == 1 and m.position("/", "zz") is None


def _vim_tree() -> dict[str, list[DirEntry]]:
    """Listings that carry every entry's attributes, as vim25's ListFilesInGuest does."""

    def e(name: str, ftype: FileType, size: int) -> DirEntry:
        return DirEntry(name, ftype, size, stat=GuestStat(ftype, size, 7, 7, permissions=0o600))

    return {
        "/": [e("d", FileType.DIRECTORY, 0), e("f", FileType.FILE, 3)],
        "/d": [e("x", FileType.FILE, 1), e("y", FileType.FILE, 2)],
    }


async def test_listing_with_attributes_fills_the_stat_cache(nursery):
    clock = [0.0]
    g = FakeGuest(_vim_tree())
    m = MetadataCache(g, nursery=nursery, ttl=60, clock=lambda: clock[0])
    await m.listdir("/d")
    assert (await m.stat("/d/x")).permissions == 0o600
    assert (await m.stat("/d/y")).size == 2
    m.stat_in_background(["/d/x", "/d/y"])  # stat-ahead finds them cached: no call
    await trio.testing.wait_all_tasks_blocked()
    assert g.stat_calls == [] and m.counters["stat_hits"] == 2
    clock[0] = 61  # they expire with the listing they came from
    assert m.cached_stat("/d/x") is None and m.cached_listing("/d") is None


async def test_stat_by_listing_lists_the_parent_once_for_all_siblings(nursery):
    g = FakeGuest(_vim_tree())
    m = MetadataCache(g, nursery=nursery, stat_by_listing=True)
    assert (await m.stat("/d/x")).size == 1
    assert (await m.stat("/d/y")).size == 2
    with pytest.raises(NotFound):
        await m.stat("/d/missing")
    with pytest.raises(NotFound):
        await m.stat("/nodir/z")  # the parent does not exist: one failed listing
    with pytest.raises(NotFound):
        await m.stat("/nodir/z")
    assert g.list_calls == ["/d", "/nodir"] and g.stat_calls == []
    await m.stat("/")  # the root has no parent to list: its own stat
    assert g.stat_calls == ["/"]


async def test_stat_by_listing_falls_back_when_the_listing_has_no_attributes(nursery):
    g = FakeGuest(big_tree())
    m = MetadataCache(g, nursery=nursery, stat_by_listing=True)
    assert (await m.stat("/d/sub1/x")).size == 1
    assert g.list_calls == ["/d/sub1"] and g.stat_calls == ["/d/sub1/x"]


async def test_frozen_seed_keeps_what_was_shown(nursery):
    g = FakeGuest(_vim_tree())
    m = MetadataCache(g, nursery=nursery, frozen=True)
    first = await m.stat("/d/x")
    m.seed("/d/x", GuestStat(FileType.FILE, 99, 8, 8))  # a transfer saw a newer version
    assert await m.stat("/d/x") == first
    live = MetadataCache(g, nursery=nursery)
    await live.stat("/d/x")
    live.seed("/d/x", GuestStat(FileType.FILE, 99, 8, 8))
    assert (await live.stat("/d/x")).size == 99


# -- the background budget (issue 10 item 5) and "no call already cached or on its way"


async def test_background_stats_stop_at_the_budget_and_resume_as_the_user_reads():
    g = FakeGuest(big_tree(200))
    everything = [f"/f{i}" for i in range(200)]
    async with trio.open_nursery() as n:  # left once the background task has stopped
        m = MetadataCache(g, nursery=n, budget=Budget(calls=10, idle=0.5))
        await m.listdir("/")
        m.stat_in_background(everything)
        await trio.sleep(0.2)
        assert len(g.stat_calls) == 10  # nobody read them: no more
        for p in g.stat_calls[:4]:
            assert m.cached_stat(p) is not None  # a user request reads 4 of them
        await trio.sleep(0.2)
        assert len(g.stat_calls) == 14  # each read let one more call go
    # nobody read again: the task stopped, its work left undone
    assert len(g.stat_calls) == 14 and m.counters["background_stopped"] == 1


async def test_background_listings_stop_at_the_entries_budget():
    tree = {"/": [DirEntry(f"d{i}", FileType.DIRECTORY, 0) for i in range(6)]}
    for i in range(6):
        tree[f"/d{i}"] = [DirEntry(f"f{j}", FileType.FILE, 1) for j in range(100)]
    g = FakeGuest(tree)
    dirs = [f"/d{i}" for i in range(6)]
    async with trio.open_nursery() as n:
        m = MetadataCache(g, nursery=n, budget=Budget(entries=150, lists_in_flight=1, idle=0.5))
        m.list_in_background(dirs, at_most=10)
        await trio.sleep(0.2)
        # one at a time: the second listing brought the unread entries to 200 >= 150
        assert g.list_calls == ["/d0", "/d1"]
        await m.listdir("/d0")  # the user opens one: its 100 entries are read
        await trio.sleep(0.2)
        assert g.list_calls == ["/d0", "/d1", "/d2"]
    assert len(g.list_calls) == 3


async def test_no_background_stat_of_a_path_known_missing(nursery):
    g = FakeGuest(big_tree())
    m = MetadataCache(g, nursery=nursery)
    with pytest.raises(NotFound):
        await m.stat("/gone")
    m.stat_in_background(["/gone", "/f1"])
    await trio.testing.wait_all_tasks_blocked()
    assert g.stat_calls == ["/gone", "/f1"]


async def test_stat_joins_the_listing_on_its_way_and_a_cached_listing_answers_absence(nursery):
    g = FakeGuest(_vim_tree(), delay=0.5)
    m = MetadataCache(g, nursery=nursery, stat_by_listing=True)
    nursery.start_soon(m.listdir, "/d")  # e.g. a list-ahead
    await trio.sleep(0.1)
    assert (await m.stat("/d/x")).permissions == 0o600  # from that listing, not a call
    assert g.list_calls == ["/d"] and g.stat_calls == []
    rest = MetadataCache(FakeGuest(big_tree(), delay=0), nursery=nursery)
    await rest.listdir("/d")
    with pytest.raises(NotFound):
        await rest.stat("/d/nope")  # a REST listing has no attributes but knows names
    assert rest.backend.stat_calls == []  # type: ignore[attr-defined]


def _wide_guest(dirs: int = 4, files: int = 1000, page: int = 100) -> FakeGuest:
    tree = {"/": [DirEntry(f"d{i}", FileType.DIRECTORY, 0) for i in range(dirs)]}
    for i in range(dirs):
        tree[f"/d{i}"] = [DirEntry(f"f{j}", FileType.FILE, 1) for j in range(files)]
    g = FakeGuest(tree)
    g.page_size = page
    return g


async def test_a_listing_ahead_stops_paging_at_the_entries_budget(nursery):
    g = _wide_guest()
    dirs = [f"/d{i}" for i in range(4)]
    m = MetadataCache(g, nursery=nursery, budget=Budget(entries=250, lists_in_flight=1, idle=0.3))
    m.list_in_background(dirs, at_most=10)
    await trio.sleep(0.6)  # long enough for all 40 pages, and for the task to give up
    # 100, 200, then 300 >= 250 entries: stopped after 3 of its 10 pages; the entries it
    # fetched hold the budget, so no other directory was listed ahead.
    assert g.pages == {"/d0": 3} and m.counters["lists_stopped"] == 1
    assert m.cached_listing("/d0") is None  # nothing partial cached
    m.list_in_background(["/d0"], at_most=10)  # stopped once: not again in this TTL
    await trio.testing.wait_all_tasks_blocked()
    assert g.pages == {"/d0": 3}
    assert len(await m.listdir("/d0")) == 1000  # a user listing is whole
    assert g.pages == {"/d0": 13}


async def test_a_user_request_joining_a_listing_ahead_gets_it_whole(nursery):
    g = _wide_guest(dirs=1)
    m = MetadataCache(g, nursery=nursery, budget=Budget(entries=250, lists_in_flight=1))
    m.list_in_background(["/d0"], at_most=1)
    await trio.testing.wait_all_tasks_blocked()  # its first page is on its way
    assert len(await m.listdir("/d0")) == 1000  # joined: one listing, run to its end
    assert g.list_calls == ["/d0"] and g.pages == {"/d0": 10}
    assert m.counters["lists_stopped"] == 0 and m.cached_listing("/d0") is not None


async def test_a_request_joining_a_stopped_fetch_does_its_own(nursery):
    flights: _Flights[tuple[str, ...]] = _Flights()

    async def stopped() -> tuple[str, ...]:
        await trio.sleep(0.01)
        raise ListingStopped("stopped")  # as if its "more" said no as the user came

    async def ahead() -> None:
        with pytest.raises(ListingStopped):
            await flights.run("/d", stopped, background=True)

    async def whole() -> tuple[str, ...]:
        return ("a", "b")

    nursery.start_soon(ahead)
    await trio.testing.wait_all_tasks_blocked()
    assert await flights.run("/d", whole) == ("a", "b")  # no error, nothing truncated


class _LaneGuest(FakeGuest):
    """Its stats pass one lane of one slot, as a real VM's guest operations do."""

    def __init__(self, tree: dict[str, list[DirEntry]]) -> None:
        super().__init__(tree, delay=1.0)
        self.lane = Lane(1, start=1)
        self.queued: list[str] = []  # in the order they entered the lane
        self.served: list[str] = []

    async def stat(self, path: str) -> GuestStat:
        self.queued.append(path)
        async with self.lane.slot():
            self.served.append(path)
            return await super().stat(path)

    async def list_dir(
        self, path: str, more: Callable[[int], bool] | None = None
    ) -> list[DirEntry]:
        self.queued.append(path)
        async with self.lane.slot():
            self.served.append(path)
            return await super().list_dir(path, more)


async def test_a_user_stat_joining_a_queued_stat_ahead_is_served_next(autojump_clock):
    g = _LaneGuest(big_tree(10))
    async with trio.open_nursery() as n:
        m = MetadataCache(g, nursery=n, budget=Budget(calls=500))
        token = priority.set(Priority.BACKGROUND)  # as read-ahead does around stat-ahead
        m.stat_in_background([f"/f{i}" for i in range(10)])
        priority.reset(token)
        await trio.testing.wait_all_tasks_blocked()
        assert (g.lane.in_flight, g.lane.waiting) == (1, 9)  # all ten in flight in meta
        assert g.lane.stats.calls == 1
        last = g.queued[-1]
        # The user's `stat` of the file whose stat-ahead queued last joins it ...
        st = await m.stat(last)
    assert st.size == int(last[2:])
    # ... and is served after the one call in the lane, not after the whole queue.
    assert g.served[:2] == [g.queued[0], last]
    assert g.stat_calls.count(last) == 1  # joined, not asked again
    assert g.lane.stats.background_calls == 9  # it went in as foreground


async def test_a_user_stat_promotes_the_listing_a_queued_stat_ahead_waits_for(autojump_clock):
    # vim25: a stat lists the parent. The user's stat joins the stat-ahead, whose
    # fetch waits for the parent's listing in the lane: that listing goes next.
    def e(name: str) -> DirEntry:
        return DirEntry(name, FileType.FILE, 1, stat=GuestStat(FileType.FILE, 1, 7, 7))

    g = _LaneGuest({f"/d{i}": [e("x")] for i in range(6)})
    async with trio.open_nursery() as n:
        m = MetadataCache(g, nursery=n, stat_by_listing=True, budget=Budget(calls=500))
        token = priority.set(Priority.BACKGROUND)
        m.stat_in_background([f"/d{i}/x" for i in range(6)])
        priority.reset(token)
        await trio.testing.wait_all_tasks_blocked()
        assert (g.lane.in_flight, g.lane.waiting) == (1, 5)
        last = g.queued[-1]
        st = await m.stat(f"{last}/x")
    assert st.size == 1
    assert g.served[:2] == [g.queued[0], last]
    assert g.list_calls.count(last) == 1 and g.stat_calls == []

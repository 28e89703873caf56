"""Metadata cache: guest listings and stat results, with a TTL, bounded, deduplicated.

Every remote metadata call of the mount goes through here, so that:

* concurrent requests for the same path share one API call (``_Flights``); a user
  request that joins a background one promotes it (``urgency``): the VM's lane then
  admits its waiting call as foreground;
* a path's stat and a directory's listing are reused for ``ttl`` seconds
  (for ever with ``frozen``: an evidence view that never changes once seen);
* ``NotFound`` is remembered too, so repeated probes (shells, ``git``) cost nothing;
* listing a directory makes no per-file call, and a listing whose entries carry their
  full attributes (vim25: ``DirEntry.stat``) fills the stat cache as well, so ``ls -l``,
  ``find -ls`` and ``du`` cost the listing alone;
* with ``stat_by_listing`` (vim25, where a stat is a listing call anyway), the stat of a
  path whose directory is not listed yet lists that directory whole: the same one call
  serves the siblings a walk asks for next.

It also fetches in the background, a bounded number at a time, what it is told will be
wanted soon (``stat_in_background``, ``list_in_background``); what and when is decided
by the read-ahead policy (``readahead.py``), not here. Background work has a budget
(:class:`Budget`): it may run only so far ahead of what user requests read. A result
fetched ahead holds its share (one call; a listing its entries too) until a user
request reads it or it expires; a task that finds the budget spent waits for a read,
and stops when none comes (nobody is waiting for its work). A listing fetched ahead
stops between two pages once the entries fetched ahead (its own so far included) reach
the entries budget, unless a user request has joined it meanwhile; what it fetched
holds its share as if fetched whole, is not cached, and the directory is not listed
ahead again for one TTL (a user request lists it whole). So what one user request
starts is bounded, whatever the guest's tree, and a user who keeps reading keeps the
read-ahead going.

"Never a call whose answer is cached or on its way": a stat of a path whose parent
listing is cached or being fetched waits for that listing (vim25 listings carry the
attributes; a name the listing lacks is not found) before it asks for anything.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import cachetools
import trio

from .errors import ListingStopped, NotFound
from .model import DirEntry, GuestStat
from .paths import PosixPaths
from .urgency import Priority, Urgency, priority, urgency

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    """How far background work may run ahead of user requests (issue 10 item 5)."""

    calls: int = 64  # results fetched ahead and not read yet (or still in flight)
    entries: int = 5_000  # entries of listings fetched ahead and not read yet
    # Listings ahead at once; each may fetch one page past ``entries`` before it stops.
    # 4, not 2: a vim25 walk keeps the lane busier (ls -lR, find, du of 51 directories on
    # the realistic simulator: 3.1 s -> 2.1 s, lane busy 0.29 -> 0.47; 8 did no better).
    lists_in_flight: int = 4
    idle: float = 2.0  # a task waiting this long for a user read stops


class GuestBackend(Protocol):
    """The calls the metadata cache needs; bound to one VM."""

    async def list_dir(
        self, path: str, more: Callable[[int], bool] | None = None
    ) -> list[DirEntry]:
        """Every entry of ``path``. ``more(entries so far)`` is asked between pages;
        False stops the listing with ``ListingStopped``."""
        ...

    async def stat(self, path: str) -> GuestStat: ...


@dataclass
class _Flight(Generic[T]):
    done: trio.Event = field(default_factory=trio.Event)
    value: T | None = None
    error: BaseException | None = None
    abandoned: bool = False
    waiters: int = 0  # user (not background) requests waiting for it
    # Promoted when a user request joins: the lane then admits the fetch's waiting call
    # ahead of the background ones (else a `stat` that joined stat-ahead's queued call
    # waited for the whole stat-ahead queue).
    urgency: Urgency = field(default_factory=Urgency)


class _Flights(Generic[T]):
    """One in-flight fetch per key; late callers wait for it and share its outcome."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight[T]] = {}

    def busy(self, key: Hashable) -> bool:
        return key in self._flights

    def wanted(self, key: Hashable) -> bool:
        """Whether a user request waits for the fetch of ``key`` in flight."""
        flight = self._flights.get(key)
        return flight is not None and flight.waiters > 0

    async def run(
        self, key: Hashable, fetch: Callable[[], Awaitable[T]], *, background: bool = False
    ) -> T:
        # Whose request this is: a user's (it promotes what it joins), or one made for
        # another fetch (it promotes what it joins once that one is promoted).
        mine = urgency.get()
        user = not background and priority.get() is Priority.FOREGROUND
        user = user or (mine is not None and mine.urgent)
        while (flight := self._flights.get(key)) is not None:
            if not background:
                flight.waiters += 1
            if user:
                flight.urgency.promote()
            try:
                with _follow(mine, flight.urgency):
                    await flight.done.wait()
            finally:
                if not background:
                    flight.waiters -= 1
            if flight.abandoned:
                continue  # its owner was cancelled or gave up: try again, maybe as owner
            if flight.error is not None:
                raise flight.error
            return flight.value  # type: ignore[return-value]
        flight = self._flights[key] = _Flight()
        token = urgency.set(flight.urgency)
        try:
            with _follow(mine, flight.urgency):
                flight.value = await fetch()
            return flight.value
        except ListingStopped:
            # Only a fetch nobody waited for stops: whoever joined it since, does its own.
            flight.abandoned = True
            raise
        except Exception as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.abandoned = True
            raise
        finally:
            urgency.reset(token)
            del self._flights[key]
            flight.done.set()


def _follow(outer: Urgency | None, inner: Urgency) -> AbstractContextManager[None]:
    """While inside, promoting ``outer`` (the fetch the current task runs) promotes
    ``inner`` (a fetch it waits for or runs within it, e.g. a stat's parent listing)."""
    if outer is None:
        return nullcontext()
    if outer.urgent:
        inner.promote()
    return outer.listen(inner.promote)


class _NameIndex:
    """name -> position in one listing; the case-folded map is built on first use."""

    def __init__(self, entries: tuple[DirEntry, ...]) -> None:
        self.entries = entries
        self.by_name = {e.name: i for i, e in enumerate(entries)}
        self._folded: dict[str, int] | None = None

    def folded(self) -> dict[str, int]:
        if self._folded is None:
            # The first of names equal but for case wins, as in the listing order.
            self._folded = {}
            for i, e in enumerate(self.entries):
                self._folded.setdefault(e.name.casefold(), i)
        return self._folded


@dataclass(frozen=True, slots=True)
class _Listing:
    entries: tuple[DirEntry, ...]
    version: int  # a new one for every fetch: what was done for the old one is not done


class MetadataCache:
    def __init__(
        self,
        backend: GuestBackend,
        *,
        nursery: trio.Nursery,
        ttl: float = 60.0,
        negative_ttl: float | None = None,
        frozen: bool = False,
        max_stats: int = 500_000,
        max_listed_entries: int = 2_000_000,
        background_parallel: int = 32,
        clock: Callable[[], float] = time.monotonic,
        paths: PosixPaths | None = None,
        stat_by_listing: bool = False,
        budget: Budget | None = None,
    ) -> None:
        self.backend = backend
        self.stat_by_listing = stat_by_listing
        self.paths = paths or PosixPaths()
        self.frozen = frozen
        self.ttl = math.inf if frozen else ttl
        neg = self.ttl if negative_ttl is None else min(negative_ttl, self.ttl)
        self._stats: cachetools.Cache[str, GuestStat]
        self._missing: cachetools.Cache[str, bool]
        self._lists: cachetools.Cache[str, _Listing]
        if frozen:
            # An evidence view must not forget (and so possibly change) what it showed.
            self._stats = cachetools.Cache(maxsize=math.inf)
            self._missing = cachetools.Cache(maxsize=math.inf)
            self._lists = cachetools.Cache(maxsize=math.inf)
        else:
            self._stats = cachetools.TTLCache(max_stats, ttl, timer=clock)
            self._missing = cachetools.TTLCache(max_stats, neg, timer=clock)
            self._lists = cachetools.TTLCache(
                max_listed_entries, ttl, timer=clock, getsizeof=lambda v: len(v.entries) + 1
            )
        self._stat_flights: _Flights[GuestStat] = _Flights()
        self._list_flights: _Flights[tuple[DirEntry, ...]] = _Flights()
        self._versions = 0
        self._indexes: dict[int, _NameIndex] = {}
        # A semaphore, not a CapacityLimiter: it is released by the task it was taken for.
        self._limiter = trio.Semaphore(background_parallel)
        self._nursery = nursery
        self.budget = budget or Budget()
        # ("s" | "l", path) -> entries: fetched ahead, not read by a user request yet.
        self._ahead: cachetools.Cache[tuple[str, str], int]
        if frozen:
            self._ahead = cachetools.Cache(maxsize=math.inf)
        else:
            self._ahead = cachetools.TTLCache(max_stats, ttl, timer=clock)
        self._ahead_in_flight = 0
        self._ahead_lists_in_flight = 0
        self._paging: dict[str, int] = {}  # entries so far of listings ahead in flight
        # Listings ahead stopped for the budget: not listed ahead again for one TTL.
        self._stopped: cachetools.Cache[str, bool]
        if frozen:
            self._stopped = cachetools.Cache(maxsize=math.inf)
        else:
            self._stopped = cachetools.TTLCache(max_stats, ttl, timer=clock)
        self._read_ahead = trio.Event()  # set (and replaced) when budget may have freed
        self.counters = {
            "stat_calls": 0,
            "list_calls": 0,
            "stat_hits": 0,
            "list_hits": 0,
            "background_calls": 0,
            "background_stopped": 0,  # tasks that stopped with work left: nobody read
            "lists_stopped": 0,  # listings ahead stopped between pages for the budget
        }

    # -- stat -----------------------------------------------------------------

    def cached_stat(self, path: str) -> GuestStat | None:
        """The cached stat of ``path`` for a user request (it counts as read)."""
        st = self._stats.get(path)
        if st is not None:
            self._was_read("s", path)
        return st

    async def stat(self, path: str) -> GuestStat:
        st = self._stats.get(path)
        if st is not None:
            self.counters["stat_hits"] += 1
            self._was_read("s", path)
            return st
        if self._missing.get(path):
            raise NotFound(f"{path}: no such file in the guest (cached)", path=path)
        st = await self._stat_flights.run(path, lambda: self._fetch_stat(path))
        # A user request that joined a background fetch read its result: it must free
        # its share of the budget, or a reader that keeps up with stat-ahead stops it.
        self._was_read("s", path)
        return st

    async def _fetch_stat(self, path: str) -> GuestStat:
        parent = self.paths.parent(path)
        # vim25: the listing is the stat (joined if on its way); REST: a cached listing
        # still tells a name it lacks. A REST listing on its way is not waited for: it
        # has no attributes, and it may be a long background one.
        if parent != path and (self.stat_by_listing or parent in self._lists):
            found = await self._stat_from_listing(parent, path)
            if found is not None:
                return found
        self.counters["stat_calls"] += 1
        try:
            st = await self.backend.stat(path)
        except NotFound:
            self._missing[path] = True
            raise
        self._stats[path] = st
        self._missing.pop(path, None)
        return st

    async def _stat_from_listing(self, parent: str, path: str) -> GuestStat | None:
        """``path``'s stat from the (possibly just fetched) listing of ``parent``; None
        when the listing cannot tell (an error other than NotFound, an entry without
        attributes): the caller then asks for the stat itself."""
        try:
            await self._listdir(parent)
        except NotFound:
            self._missing[path] = True
            raise
        except Exception as exc:  # e.g. the parent is a file: a plain stat will tell
            log.debug("listing %r to stat %r failed: %s", parent, path, exc)
            return None
        st = self._stats.get(path)
        if st is not None:
            return st
        if self._lookup(parent, self.paths.basename(path), casefold=False) is False:
            self._missing[path] = True
            raise NotFound(f"{path}: no such file in the guest", path=path)
        return None

    def seed(self, path: str, st: GuestStat) -> None:
        """Remember a stat fetched elsewhere (the root checked at start, the attributes
        a transfer came with). A frozen view keeps what it already showed."""
        if self.frozen and path in self._stats:
            return
        self._stats[path] = st
        self._missing.pop(path, None)

    def replace(self, path: str, st: GuestStat) -> None:
        """Show ``st`` from now on, ``--frozen`` too: a transfer found the file changed
        before any byte of the version shown was read (so nothing of it is frozen)."""
        self._stats[path] = st
        self._missing.pop(path, None)

    # -- listings ---------------------------------------------------------------

    def cached_listing(self, path: str) -> tuple[DirEntry, ...] | None:
        listing = self._lists.get(path)
        return None if listing is None else listing.entries

    def listing_version(self, path: str) -> int | None:
        """Which fetch the cached listing of ``path`` came from (None: none cached)."""
        listing = self._lists.get(path)
        return None if listing is None else listing.version

    async def listdir(self, path: str) -> tuple[DirEntry, ...]:
        """The entries of ``path`` for a user request (the listing counts as read)."""
        entries = await self._listdir(path)
        self._was_read("l", path)
        return entries

    async def _listdir(self, path: str) -> tuple[DirEntry, ...]:
        listing = self._lists.get(path)
        if listing is not None:
            self.counters["list_hits"] += 1
            return listing.entries
        return await self._list_flights.run(path, lambda: self._fetch_listing(path))

    async def _fetch_listing(
        self, path: str, more: Callable[[int], bool] | None = None
    ) -> tuple[DirEntry, ...]:
        self.counters["list_calls"] += 1
        entries = tuple(await self.backend.list_dir(path, more))
        self._versions += 1
        try:
            self._lists[path] = _Listing(entries, self._versions)
        except ValueError:
            log.warning("listing of %r has %d entries: too large to cache", path, len(entries))
        self._seed_listed(path, entries)
        return entries

    def _seed_listed(self, path: str, entries: tuple[DirEntry, ...]) -> None:
        # Inserted now, they expire with the listing (one TTL from the same moment).
        for e in entries:
            if e.stat is not None:
                self.seed(self.paths.join(path, e.name), e.stat)

    def entry(self, parent: str, name: str) -> DirEntry | bool | None:
        """From a cached listing of ``parent``: the entry, ``False`` if the listing is
        cached and has no such name, ``None`` if nothing is known. For a user request
        (the listing counts as read)."""
        self._was_read("l", parent)
        return self._lookup(parent, name, casefold=False)

    def entry_casefold(self, parent: str, name: str) -> DirEntry | bool | None:
        """Like ``entry`` but ignoring case, as Windows guests look names up."""
        self._was_read("l", parent)
        return self._lookup(parent, name.casefold(), casefold=True)

    def position(self, parent: str, name: str) -> int | None:
        """Index of ``name`` in ``parent``'s cached listing (listing order), if known."""
        entries = self.cached_listing(parent)
        return None if entries is None else self._index_of(entries).by_name.get(name)

    def _lookup(self, parent: str, key: str, *, casefold: bool) -> DirEntry | bool | None:
        entries = self.cached_listing(parent)
        if entries is None:
            return None
        index = self._index_of(entries)
        pos = (index.folded() if casefold else index.by_name).get(key)
        return False if pos is None else entries[pos]

    def _index_of(self, entries: tuple[DirEntry, ...]) -> _NameIndex:
        # Keyed on the listing tuple's identity and holding a reference to it: a new
        # listing of the same directory gets a fresh index and an old id cannot be reused.
        hit = self._indexes.get(id(entries))
        if hit is not None and hit.entries is entries:
            return hit
        if len(self._indexes) > 256:
            self._indexes.clear()
        index = self._indexes[id(entries)] = _NameIndex(entries)
        return index

    # -- in the background ---------------------------------------------------------

    def stat_in_background(self, paths: Sequence[str]) -> None:
        """Fetch the stats of ``paths`` that are neither known (cached, cached as missing)
        nor being fetched, in the background, at most ``background_parallel`` calls at a
        time and within the budget."""
        todo = [p for p in paths if not self._stat_known(p)]
        if todo:
            self._nursery.start_soon(self._stat_many, todo)

    def list_in_background(
        self,
        dirs: Sequence[str],
        *,
        at_most: int,
        then: Callable[[str], None] | None = None,
    ) -> None:
        """List the first ``at_most`` of ``dirs`` that are neither cached nor being listed,
        in the background like ``stat_in_background``; ``then(dir)`` after each listing."""
        todo = [d for d in dirs if self._may_list_ahead(d)]
        if todo:
            self._nursery.start_soon(self._list_many, todo[:at_most], then)

    def _may_list_ahead(self, path: str) -> bool:
        return (
            path not in self._lists
            and not self._list_flights.busy(path)
            and not self._stopped.get(path)
        )

    def _stat_known(self, path: str) -> bool:
        return path in self._stats or bool(self._missing.get(path)) or self._stat_flights.busy(path)

    # the budget: what is fetched ahead and not read yet

    def _was_read(self, kind: str, path: str) -> None:
        if self._ahead and self._ahead.pop((kind, path), None) is not None:
            self._read_ahead.set()
            self._read_ahead = trio.Event()

    def _room(self, listing: bool) -> bool:
        b = self.budget
        if isinstance(self._ahead, cachetools.TTLCache):
            self._ahead.expire()  # what expired unread frees its share
        if len(self._ahead) + self._ahead_in_flight >= b.calls:
            return False
        if not listing:
            return True
        if self._ahead_lists_in_flight >= b.lists_in_flight:
            return False
        return self._entries_ahead() < b.entries

    def _entries_ahead(self) -> int:
        """Entries listed ahead and not read yet, those of listings in flight too."""
        unread = sum(n for (kind, _), n in self._ahead.items() if kind == "l")
        return unread + sum(self._paging.values())

    def _more_ahead(self, path: str) -> Callable[[int], bool]:
        """The ``more`` of a listing ahead: go on while a user request waits for it, or
        while what all listings ahead fetched stays within the entries budget."""

        def more(entries: int) -> bool:
            self._paging[path] = entries
            if self._list_flights.wanted(path):
                return True
            return self._entries_ahead() < self.budget.entries

        return more

    async def _take(self, listing: bool) -> bool:
        """Wait for room in the budget; False when no user read made room in time."""
        while not self._room(listing):
            with trio.move_on_after(self.budget.idle):
                await self._read_ahead.wait()
                continue
            self.counters["background_stopped"] += 1
            return False
        self._ahead_in_flight += 1
        if listing:
            self._ahead_lists_in_flight += 1
        self.counters["background_calls"] += 1
        return True

    def _done(self, kind: str, path: str, entries: int | None) -> None:
        """A background fetch ended; ``entries`` is None when it fetched nothing."""
        self._ahead_in_flight -= 1
        if kind == "l":
            self._ahead_lists_in_flight -= 1
        if entries is not None:
            self._ahead[(kind, path)] = entries  # holds its share until read
        self._read_ahead.set()  # a task waiting for a listing slot may go on
        self._read_ahead = trio.Event()

    async def _stat_many(self, paths: list[str]) -> None:
        async with trio.open_nursery() as nursery:
            for path in paths:
                if self._stat_known(path):
                    continue  # fetched meanwhile (by a user request, or a listing)
                if not await self._take(listing=False):
                    return
                await self._limiter.acquire()
                nursery.start_soon(self._stat_quietly, path)

    async def _stat_quietly(self, path: str) -> None:
        fetched = None
        try:
            if not self._stat_known(path):
                await self._stat_flights.run(path, lambda: self._fetch_stat(path))
                fetched = 1
        except Exception as exc:  # the foreground request will see and report it
            log.debug("background stat of %r failed: %s", path, exc)
        finally:
            self._limiter.release()
            self._done("s", path, fetched)

    async def _list_many(self, dirs: list[str], then: Callable[[str], None] | None) -> None:
        async with trio.open_nursery() as nursery:
            for d in dirs:
                if not self._may_list_ahead(d):
                    continue
                if not await self._take(listing=True):
                    return
                await self._limiter.acquire()
                nursery.start_soon(self._list_quietly, d, then)

    async def _list_quietly(self, path: str, then: Callable[[str], None] | None) -> None:
        fetched = None
        more = self._more_ahead(path)
        try:
            if path not in self._lists:
                listing = await self._list_flights.run(
                    path, lambda: self._fetch_listing(path, more), background=True
                )
                fetched = len(listing)
            if then is not None:
                then(path)
        except ListingStopped:
            # What it fetched for nobody holds its share (else every stop would make
            # room for the next sibling's first pages), and it is not tried again.
            fetched = self._paging.get(path, 0)
            self._stopped[path] = True
            self.counters["lists_stopped"] += 1
            log.debug("listing ahead of %r stopped after %d entries", path, fetched)
        except Exception as exc:
            log.debug("background listing of %r failed: %s", path, exc)
        finally:
            self._paging.pop(path, None)
            self._limiter.release()
            self._done("l", path, fetched)

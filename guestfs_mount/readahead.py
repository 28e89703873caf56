"""Read-ahead policy: what to fetch before it is asked for, and when.

The FUSE layer tells this module what the kernel asked (``on_getattr``, ``on_opendir``,
``on_open``); this module guesses what comes next from how tools walk a tree and asks
the caches to fetch it in the background. The caches fetch, deduplicate and bound the
work; every guess, trigger and knob is here, so a change of policy is a change of this
file alone.

* ``on_getattr`` of an entry whose stat is not cached, after its directory was listed
  (``ls -l``, ``du``, ``find``): stat all its siblings ("stat-ahead"), once per listing.
  ``ls -l`` then costs a few round trips instead of one per entry; plain ``ls`` costs one
  listing and nothing more.
* ``on_opendir`` of a subdirectory of a listed directory (``find``, ``du``, ``grep -r``,
  ``cp -r`` move this way): list its sibling directories ("list-ahead"), and when the
  parent's entries were stat'ed ahead, stat theirs ahead as well, so such a walk finds
  both ready one level down.
* ``on_open`` of a file of a listed directory: download the next ``_PREFETCH_FILES``
  small files of the listing, at most ``_PREFETCH_BYTES`` in all ("prefetch"), as
  ``cat *``, ``grep -r`` and ``tar`` read them in listing order; the window slides on as
  the reader reaches its middle.

How far stat-ahead and list-ahead may run ahead of what user requests read is the
metadata cache's budget (``meta.Budget``); a prefetch body waits for the user's own work
on the VM's channel (``vcenter.scheduler.Lane.body``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import cachetools
import trio

from .cache.content import ContentKey
from .meta import MetadataCache
from .model import FileType
from .paths import PosixPaths
from .vcenter.scheduler import Priority, priority

log = logging.getLogger(__name__)

V = TypeVar("V")

_PREFETCH_FILES = 32  # files downloaded ahead of one open
_PREFETCH_MAX_FILE = 4 << 20  # larger files are left to the kernel's read-ahead
_PREFETCH_BYTES = 16 << 20  # bytes downloaded ahead of one open (the window's budget)
_LIST_AHEAD_DIRS = 1000  # subdirectories listed ahead of one opendir
_MARKS = 100_000  # directories remembered as done (per trigger), for one TTL


@contextlib.contextmanager
def _background() -> Iterator[None]:
    # trio tasks copy the context of the task that starts them: what meta's and this
    # module's nurseries start in here runs at background priority in the VM's lane.
    token = priority.set(Priority.BACKGROUND)
    try:
        yield
    finally:
        priority.reset(token)


class Prefetcher(Protocol):
    """What read-ahead needs of the content cache."""

    async def prefetch(self, key: ContentKey) -> bool:
        """Start downloading ``key`` unless cached; False once the budget is spent."""
        ...


class ReadAhead:
    def __init__(
        self,
        meta: MetadataCache,
        content: Prefetcher,
        *,
        nursery: trio.Nursery,
        root: str = "/",
        paths: PosixPaths | None = None,
        prefetch: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.meta = meta
        self.content = content
        self.root = root
        self.paths = paths or PosixPaths()
        self.prefetch = prefetch
        self._nursery = nursery
        # parent -> the listing version its entries were stat'ed ahead for
        self._stat_ahead_of: cachetools.Cache[str, int] = self._marks(clock)
        self._listed_ahead: cachetools.Cache[str, bool] = self._marks(clock)
        # Directories the user read (opendir): prefetch only serves a walk through them.
        # A cached listing alone is no sign (a vim25 stat lists the parent whole).
        self._read_dirs: cachetools.Cache[str, bool] = self._marks(clock)
        self._prefetched_upto: dict[str, int] = {}

    def _marks(self, clock: Callable[[], float]) -> cachetools.Cache[str, V]:
        # Done marks live as long as what they are about: one TTL, for ever if frozen.
        if self.meta.frozen:
            return cachetools.Cache(maxsize=math.inf)
        return cachetools.TTLCache(_MARKS, self.meta.ttl, timer=clock)

    # -- triggers: what the kernel asked ------------------------------------------------

    def on_getattr(self, path: str) -> None:
        """The kernel wants the attributes of ``path`` and they are not cached."""
        if path != self.root:
            self._stat_ahead(self.paths.parent(path))

    def on_opendir(self, path: str) -> None:
        """The kernel opened the directory ``path`` (its listing is cached by now)."""
        self._read_dirs[path] = True
        if path != self.root:
            self._list_ahead(self.paths.parent(path))

    def on_open(self, path: str) -> None:
        """The kernel opened the file ``path`` for reading."""
        if self.prefetch and path != self.root:
            parent = self.paths.parent(path)
            if self._read_dirs.get(parent):
                self._prefetch_after(parent, self.paths.basename(path))

    # -- policies -------------------------------------------------------------------------

    def _stat_ahead(self, parent: str) -> None:
        version = self.meta.listing_version(parent)
        if version is None or self._stat_ahead_of.get(parent) == version:
            return
        entries = self.meta.cached_listing(parent) or ()
        self._stat_ahead_of[parent] = version
        with _background():
            self.meta.stat_in_background([self.paths.join(parent, e.name) for e in entries])

    def _list_ahead(self, parent: str) -> None:
        entries = self.meta.cached_listing(parent)
        if entries is None or self._listed_ahead.get(parent):
            return
        self._listed_ahead[parent] = True
        dirs = [self.paths.join(parent, e.name) for e in entries if e.type is FileType.DIRECTORY]
        stated = self._stat_ahead_of.get(parent) == self.meta.listing_version(parent)
        with _background():
            self.meta.list_in_background(
                dirs, at_most=_LIST_AHEAD_DIRS, then=self._stat_ahead if stated else None
            )

    def _prefetch_after(self, parent: str, name: str) -> None:
        entries = self.meta.cached_listing(parent)
        if entries is None:
            return
        idx = self.meta.position(parent, name)  # O(1): this runs on every open
        if idx is None:
            return
        if self._prefetched_upto.get(parent, -1) > idx + _PREFETCH_FILES // 2:
            return
        picked: list[str] = []
        nbytes = 0
        last = idx
        for i in range(idx + 1, len(entries)):
            e = entries[i]
            if e.type is FileType.FILE and 0 < e.size <= _PREFETCH_MAX_FILE:
                if nbytes + e.size > _PREFETCH_BYTES:
                    break
                picked.append(self.paths.join(parent, e.name))
                nbytes += e.size
            last = i
            if len(picked) >= _PREFETCH_FILES:
                break
        self._prefetched_upto[parent] = last
        if picked:
            self._stat_ahead(parent)
            with _background():
                self._nursery.start_soon(self._download, picked)

    async def _download(self, paths: list[str]) -> None:
        for path in paths:
            try:
                st = await self.meta.stat(path)
                if st.type is not FileType.FILE or st.size == 0:
                    continue
                if not await self.content.prefetch(ContentKey(path, st.size, st.mtime_ns)):
                    return  # budget spent
            except Exception as exc:
                log.debug("prefetch of %r skipped: %s", path, exc)

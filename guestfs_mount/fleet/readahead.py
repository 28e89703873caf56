"""Fleet read-ahead: the same path in the next VMs of the listing, before it is asked.

``grep PATTERN /mnt/vc/*/root/.ssh/authorized_keys`` is the fleet's typical command.
The shell expands the glob one level at a time, VM after VM (a lookup of ``root`` in
every VM, then of ``.ssh`` in every one, ...), and grep then opens the files in the same
order: each request waits for one VM, so without help the command costs the *sum* over
the VMs of their opens and round trips. Each real VM runs one guest operation at a time
but VMs run in parallel (``../shared/docs/real-guest-ops.md``), so this module does the
same work in the VMs further down the listing while the user is still at the first ones:

* a *walk* is one guest path looked up (or opened) by the user in two VMs of the root
  listing: then the same path is looked up in the next VMs of that listing (opening
  them first if they are not open), in a window that doubles each time the user moves
  on to another VM (16, 32, 64, ... VMs ahead);
* a path below a walk's path (the next glob level, ``/root/.ssh`` after ``/root``) is a
  walk from its first VM on, and so is the open of a walk's path; an open walk also
  downloads the file ahead in those VMs when it is small (at most 1 MiB; a lookup
  walk, at most 64 KiB, in the user's VMs too), at most :data:`_DOWNLOADS` at once,
  first in listing order (bash expands a glob backwards, then sorts; grep reads
  forwards);
* a directory a lookup walk reaches is listed too (in the user's VMs as well): the next
  glob level's lookups are answered from that listing.

Bounds: at most :data:`_WIDTH` VMs worked on at once (``fleet.serve`` passes the
client's global ``--max-guest-ops`` cap, a FIFO over all VMs' calls that keeps
background calls off its last eighth: the user's own calls always find room), the
nearest VMs first; a directory listed for the next glob level waits behind this
level's opens and stats;
every call runs at background priority in its VM's lane; a VM that failed to open
(a refused login above all) is never tried by read-ahead, only by the user's own
requests; nothing happens before the user has
listed the fleet's root and gone into two of its VMs (``ls /mnt/vc`` or ``cat`` in one
VM opens nothing more).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import posixpath
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import cachetools
import trio

from ..cache.content import ContentKey
from ..model import FileType
from ..vcenter.scheduler import Priority, priority
from .vm import FleetVm, VmContent

log = logging.getLogger(__name__)

__all__ = ["FleetReadAhead", "guest_path", "relative_path"]

_WIDTH = 64  # VMs worked on at once by read-ahead (fleet.serve passes the cap)
_FIRST_WINDOW = 16  # VMs ahead once a walk is seen; doubles as the user moves on
_DOWNLOADS = 64  # files downloaded ahead at once (1 MiB each at most; the cap's size)
_PREFETCH_MAX_FILE = 1 << 20  # larger files are left to the user's open
_LOOKUP_MAX_FILE = 64 << 10  # downloaded by a lookup walk (an `ls -l` of a glob pays too)
_WALKS = 1024  # walks remembered (least recently used dropped)

# Read-ahead's metadata waits for a slot nearest VM first (the one the user reaches
# next), and a listing for the next glob level after every open and stat of this one.
_NEXT_LEVEL = 1 << 30

LOOKUP = "lookup"
OPEN = "open"


class _InOrder:
    """At most ``total`` holders at once; waiters are let in lowest ``order`` first (a
    glob's command reads its files in listing order, whichever way the glob went; the
    shell reaches the nearest VMs first). Tasks started together run in any order (trio
    shuffles them): a free slot is given once they have all queued."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._waiting: list[tuple[int, int, trio.Event]] = []
        self._seq = 0
        self._dispatching = False

    @contextlib.asynccontextmanager
    async def hold(self, order: int) -> AsyncIterator[None]:
        self._seq += 1
        ev = trio.Event()
        entry = (order, self._seq, ev)
        heapq.heappush(self._waiting, entry)
        try:
            if self._free > 0 and not self._dispatching:
                self._dispatching = True
                try:
                    await trio.lowlevel.checkpoint()  # the tasks started with us queue
                finally:
                    self._dispatching = False
                    self._dispatch()
            await ev.wait()  # a slot was given to us
        except BaseException:
            if ev.is_set():
                self._release()
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise
        try:
            yield
        finally:
            self._release()

    def _dispatch(self) -> None:
        while self._free > 0 and self._waiting:
            self._free -= 1
            heapq.heappop(self._waiting)[2].set()

    def _release(self) -> None:
        self._free += 1
        self._dispatch()


def guest_path(vm: FleetVm, rel: str) -> str | None:
    """The guest path of ``rel`` (below the VM's directory) in ``vm``; None when it
    names none (a Windows VM's directory holds drive letters only)."""
    if not vm.windows:
        return rel
    parts = [p for p in rel.split("/") if p]
    if not parts or len(parts[0]) != 1 or not parts[0].isalpha():
        return None
    return parts[0].upper() + ":\\" + "\\".join(parts[1:])


def _no_drive(rel: str) -> bool:
    first = next((p for p in rel.split("/") if p), "")
    return not (len(first) == 1 and first.isalpha())


def relative_path(vm: FleetVm, path: str) -> str:
    """``guest_path``'s inverse: ``C:\\Users\\x`` is ``/C/Users/x``, ``/etc`` is ``/etc``."""
    if not vm.windows:
        return path
    drive, _, rest = path.partition(":\\")
    return "/" + "/".join([drive.upper(), *(p for p in rest.split("\\") if p)])


@dataclass
class _Walk:
    """One (kind, path) the user reaches VM after VM; a few numbers whatever the fleet's
    size (listing indexes: the VMs read ahead are always one range of the listing)."""

    window: int
    active: bool = False
    first: int | None = None  # the first VM the user did it in
    last: int | None = None  # the user's last VM
    direction: int = 0  # +1: down the listing, -1: up it (bash expands a glob backwards)
    listing: int = -1  # which root listing the indexes count in
    lo: int = 0  # VMs read ahead so far: lo..hi (none while hi < lo)
    hi: int = -1


@dataclass(frozen=True)
class _ListLater:
    """A directory a lookup walk reached: listed after this level's other VMs."""

    path: str


class FleetReadAhead:
    """Told what the user looks up and opens in which VM (by the fleet's FUSE layer),
    starts the same in the VMs of the root listing the user goes to next."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        prefetch: bool = True,
        width: int = _WIDTH,
        first_window: int = _FIRST_WINDOW,
    ) -> None:
        self._nursery = nursery
        self.prefetch = prefetch
        self._first_window = first_window
        self._width = width
        self._limit = _InOrder(width)  # this level's opens and stats before listings
        self._downloads = _InOrder(_DOWNLOADS)
        self._order: list[FleetVm] = []
        self._index: dict[str, int] = {}
        self._listing = 0
        self._walks: cachetools.LRUCache[tuple[str, str], _Walk] = cachetools.LRUCache(_WALKS)
        self.started = 0  # read-ahead tasks started (tests and status count them)
        self.skipped_failed = 0  # VMs left alone because they failed to open
        self.downloads = 0  # files downloaded ahead
        self.listed = 0  # directories listed ahead

    def snapshot(self) -> dict[str, int]:
        """For ``guestfs-mount status``."""
        return {
            "started": self.started,
            "listed": self.listed,
            "downloads": self.downloads,
            "skipped_failed": self.skipped_failed,
            "walks": len(self._walks),
        }

    # -- what the FUSE layer tells ------------------------------------------------------

    def on_listing(self, vms: Sequence[FleetVm]) -> None:
        """The fleet's root was listed: this is the order a glob walks the VMs in."""
        ids = [vm.vm for vm in vms]
        if ids == [vm.vm for vm in self._order]:
            return
        self._order = list(vms)
        self._index = {vm_id: i for i, vm_id in enumerate(ids)}
        self._listing += 1

    def on_lookup(self, vm: FleetVm, rel: str) -> None:
        """The user looked up ``rel`` (a path below the VM's directory, ``/root/.ssh``;
        ``/C/Users`` on Windows) in ``vm``, whether it exists or not."""
        self._seen(LOOKUP, vm, rel)

    def on_open(self, vm: FleetVm, rel: str) -> None:
        """The user opened the file ``rel`` of ``vm``."""
        self._seen(OPEN, vm, rel)

    # -- policy ---------------------------------------------------------------------------

    def _seen(self, kind: str, vm: FleetVm, path: str) -> None:
        k = self._index.get(vm.vm)
        if k is None:
            return  # not in the last root listing: not a walk over it
        walk = self._walks.get((kind, path))
        if walk is None or walk.listing != self._listing:
            walk = self._walks[(kind, path)] = _Walk(self._first_window, listing=self._listing)
        again = walk.last == k
        if walk.last is not None and not again:
            walk.direction = 1 if k > walk.last else -1
        walk.last = k
        if walk.first is None:
            walk.first = k
        if not walk.active:
            if walk.first != k:  # a second VM
                walk.active = True
                self._mine(kind, path, walk, walk.first)
            else:
                up = self._implied(kind, path)
                if up is None:
                    return
                # A fleet-wide walk already: the window starts wide. The next glob level
                # goes the way the last one went; a command's opens go their own way.
                walk.active, walk.window = True, max(walk.window, self._width)
                if kind == LOOKUP:
                    walk.direction = walk.direction or up.direction
        if not again:
            self._mine(kind, path, walk, k)
        self._extend(kind, path, walk, k)

    def _mine(self, kind: str, path: str, walk: _Walk, i: int) -> None:
        """The user's own VM ``i``: the next glob level wants the listing below."""
        if kind == LOOKUP and not walk.lo <= i <= walk.hi:
            self._start(kind, self._order[i], path, mine=True, distance=0)

    def _extend(self, kind: str, path: str, walk: _Walk, k: int) -> None:
        """Read ahead ``walk.window`` VMs from index ``k`` the way the user goes (both
        ways while that is unknown), nearest first; the window doubles when it moves."""
        lo = k + 1 if walk.direction > 0 else max(0, k - walk.window)
        hi = k - 1 if walk.direction < 0 else min(len(self._order) - 1, k + walk.window)
        if walk.hi < walk.lo:  # nothing read ahead yet
            todo = [i for i in range(lo, hi + 1) if i != k]
            walk.lo, walk.hi = lo, hi
        else:
            todo = [*range(lo, min(hi, walk.lo - 1) + 1), *range(max(lo, walk.hi + 1), hi + 1)]
            walk.lo, walk.hi = min(walk.lo, lo), max(walk.hi, hi)
        if not todo:
            return
        walk.window *= 2
        for i in sorted(todo, key=lambda i: abs(i - k)):
            self._start(kind, self._order[i], path, mine=False, distance=abs(i - k))

    def _start(self, kind: str, vm: FleetVm, rel: str, *, mine: bool, distance: int) -> None:
        self.started += 1
        self._nursery.start_soon(
            functools.partial(self._ahead, kind, vm, rel, mine=mine, distance=distance)
        )

    def _implied(self, kind: str, rel: str) -> _Walk | None:
        """The active walk this request continues, if any: the lookup of its parent
        (the next glob level), or for an open the lookup of the same path."""
        if kind == OPEN:
            same = self._walks.get((LOOKUP, rel))
            if same is not None and same.active:
                return same
        parent = posixpath.dirname(rel)
        if parent == rel:
            return None
        up = self._walks.get((LOOKUP, parent))
        return up if up is not None and up.active else None

    # -- the work ---------------------------------------------------------------------------

    async def _ahead(self, kind: str, vm: FleetVm, rel: str, *, mine: bool, distance: int) -> None:
        """Do in ``vm`` what the user is doing VM after VM: open it, stat ``rel``, list
        it when it is a directory (the next glob level's lookups), download it when it
        is a small file the command will read. ``mine``: one of the user's own VMs;
        ``distance``: how many VMs of the listing away from the user's."""
        priority.set(Priority.BACKGROUND)  # this task's calls wait for the user's
        try:
            async with self._limit.hold(distance):  # metadata only: no download holds one
                key = await self._metadata(kind, vm, rel)
            if isinstance(key, _ListLater):
                # The listing is for the next glob level: it waits while opens and stats
                # of this level, which the shell is waiting for now, wait for a slot.
                async with self._limit.hold(_NEXT_LEVEL + distance):
                    await self._list(vm, key.path)
                return
            if key is None or (kind == OPEN and mine):
                return
            async with self._downloads.hold(self._index.get(vm.vm, 0)):
                await self._download(VmContent(vm.ctx.content, vm.vm), key)
        except Exception as exc:  # a guess: the user's own request will say
            log.debug("fleet read-ahead of %r in VM %s: %s", rel, vm.vm, exc)

    async def _metadata(self, kind: str, vm: FleetVm, rel: str) -> ContentKey | _ListLater | None:
        """Open ``vm`` and stat ``rel``; the file to download, if any, or the directory
        to list for a lookup walk's next level."""
        if vm.failure is not None:
            # Refused logins above all: only the user's own requests try again.
            self.skipped_failed += 1
            return None
        if guest_path(vm, rel) is None or (
            not vm.roots and await vm.identify() == "windows" and _no_drive(rel)
        ):
            return None  # a POSIX path in a Windows VM: nothing to open it for
        await vm.ready()
        path = guest_path(vm, rel)
        meta = vm.meta
        if path is None or meta is None or vm.ops_for(path) is None:
            return None  # a POSIX path in a Windows VM, or a drive not opened yet
        st = await meta.stat(path)
        if st.type is FileType.DIRECTORY:
            if kind == LOOKUP and meta.cached_listing(path) is None:
                return _ListLater(path)
            return None
        if not self.prefetch or st.type is not FileType.FILE or st.size <= 0:
            return None
        # A glob's last level is a file the command reads next (grep, sha256sum):
        # config-sized ones are fetched already; an open walk fetches larger ones.
        limit = _LOOKUP_MAX_FILE if kind == LOOKUP else _PREFETCH_MAX_FILE
        return ContentKey(path, st.size, st.mtime_ns) if st.size <= limit else None

    async def _list(self, vm: FleetVm, path: str) -> None:
        meta = vm.meta
        if meta is not None and meta.cached_listing(path) is None:
            await meta.listdir(path)
            self.listed += 1

    async def _download(self, content: VmContent, key: ContentKey) -> None:
        """Download ``key`` as an open would, holding a download slot until its last
        byte is in; then it is cached like a file read (small files outlive their
        handle). The bound is this module's, not the cache's prefetch budget: that one
        is sized for one VM's directory, this one for one file in each of many VMs."""
        handle = await content.open(key)
        try:
            await content.read(handle, key.size - 1, 1)
        finally:
            content.release(handle)
        self.downloads += 1

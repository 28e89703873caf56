"""The content cache: whole-file downloads into a local directory, served while they run.

A guest file's bytes come from a single-use transfer URL without Range support, so each
version of a file (:class:`ContentKey`: path, size, mtime) is downloaded whole, once, into a
cache file. Every handle of that key shares the one download; reads wait only until the
bytes they need are on disk.

Concurrency: everything runs on one trio loop. Shared state is changed only between awaits,
never from worker threads (threads only do pwrite/pread on file descriptors they are handed).

Lifecycle of an :class:`_Entry`::

    RUNNING --fetch ok, nbytes == size--> COMPLETE --evicted--> (detached, file unlinked)
       |  \\--error / short / long---> FAILED (detached at once: next open() downloads again)
       \\--cancelled (linger, eviction of an idle download, aclose)--> FAILED (DownloadCancelled)

"Detached" means removed from the index and from the byte accounting, file unlinked; the fd
stays open until the last handle and the last read are gone.

Disk accounting: ``key.size`` is reserved when a download starts (so concurrent downloads
cannot overshoot together) and released when the entry is detached. An entry is *idle* when
it has no handles; only idle entries are evicted, LRU first, unused prefetches before
everything else. A file larger than the cache (``max_bytes``) or than the free space of
the cache's filesystem (less what running downloads still have to write) is refused with
``EFBIG`` and one log line, at open and again when the body's real length is known; files
in use may overshoot ``max_bytes`` together, never the disk. A download left without
handles keeps running (``linger``) only if the file is small (``linger_max_bytes``) and
fits; otherwise it is cancelled at once.

Version changes: the transfer reports the body's real length (and, on vim25, the stat
returned with the URL) before the first byte. If it differs from the key's, nothing of the
file was served yet, so the entry is re-keyed to the version fetched and
``version_listener(old, new, stat)`` tells the FUSE layer, which updates the stat the
kernel sees. Readers get the bytes fetched: up to the new size.
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..errors import CacheError, GuestfsError, RemoteError, TransferError, first_error
from ..model import BodyWriter, GuestStat, TransferResult
from . import fileio, persist, tempdir
from .fileio import PWrite
from .persist import PersistentIndex, Record

log = logging.getLogger(__name__)

#: Where a fetch puts the body: its worker thread writes the cache file (a FileWriter).
Sink = BodyWriter
#: ``on_start(size, stat)``: called by the fetch on the event loop before the first byte
#: with the body's real length and the stat returned with the URL (None over REST).
OnStart = Callable[[int, "GuestStat | None"], None]
#: ``fetch(path, expected_size, writer, on_start)``
Fetch = Callable[[str, int, Sink, OnStart], Awaitable[TransferResult]]
VersionListener = Callable[["ContentKey", "ContentKey", "GuestStat | None"], None]
LINGER_MAX_BYTES = 16 << 20  # an unread download keeps running after close only below this


@dataclass(frozen=True, slots=True)
class ContentKey:
    path: str  # guest path
    size: int  # size reported by stat
    mtime_ns: int  # mtime reported by stat: a new (size, mtime) is a new version


@dataclass(frozen=True)
class TransferEvent:
    """One download attempt ended (``error`` is None on success)."""

    key: ContentKey
    started: float  # time.time() at start
    seconds: float
    nbytes: int  # bytes received from the fetch
    sha256: str | None
    error: BaseException | None
    prefetch: bool = False  # started by prefetch() and never opened
    md5: str | None = None
    # The version opened (what the kernel was shown) when the transfer found another one.
    seen: ContentKey | None = None
    # Served from a kept cache of an earlier mount, verified, with no transfer: the time
    # (epoch seconds) the original download completed.
    cached_from: float | None = None


def _check_kept(index: PersistentIndex, fd: int, rec: Record) -> tuple[str | None, Record]:
    """Blocking (a worker thread): the kept copy's MD5 if its SHA-256 and length are still
    the recorded ones (None otherwise, or if it cannot be read), and its record marked
    used now (the LRU order across mounts; left as it was if that cannot be written)."""
    try:
        md5 = persist.file_hashes(fd, rec)
    except OSError as exc:
        log.warning("kept copy of %r unreadable: %s", rec.path, exc.strerror or exc)
        return None, rec
    if md5 is None:
        return None, rec
    try:
        return md5, index.touch(rec)
    except OSError as exc:
        log.warning("cannot update the kept cache's index: %s", exc.strerror or exc)
        return md5, rec


class DownloadCancelled(CacheError):
    """A download was cancelled: nobody wanted it any more (linger, eviction) or shutdown."""


class _State(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(eq=False)
class _Entry:
    key: ContentKey
    name: str  # cache file name inside the directory (never derived from guest data)
    fd: int
    started: float
    started_mono: float
    state: _State = _State.RUNNING
    written: int = 0  # bytes [0, written) are on disk
    received: int = 0  # bytes the transfer stored (as written: one writer, no queue)
    error: GuestfsError | None = None
    sha256: str | None = None
    completed_at: float | None = None
    handles: int = 0
    busy: int = 0  # reads in a worker thread (fd must stay open)
    prefetch: bool = False  # started by prefetch() and not opened since
    attached: bool = True  # in the index and counted in usage; file exists
    task_running: bool = False
    fd_closed: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    linger_scope: trio.CancelScope | None = None
    progress: trio.Event = field(default_factory=trio.Event)
    size: int = -1  # the body's length: key.size until the transfer reports it
    begun: trio.Event = field(default_factory=trio.Event)  # length known, or ended
    seen: ContentKey | None = None  # the key opened, when the transfer found another
    record: Record | None = None  # its record in the kept cache's persistent index
    reused: bool = False  # served from that record, not downloaded by this mount

    def wake(self) -> None:
        """Wake every reader waiting for progress or for the end of the download."""
        self.progress.set()
        self.progress = trio.Event()


class ContentCache:
    """The cache of one mount. Construction prepares the directory (CacheError if it is
    unusable); downloads run in ``nursery``; :meth:`aclose` ends them and removes what
    is not kept. ``directory=None``: a private temporary directory, removed at close
    unless ``keep``."""

    def __init__(
        self,
        directory: str | None,
        max_bytes: int,
        fetch: Fetch,
        *,
        nursery: trio.Nursery,
        keep: bool = False,
        linger: float = 10.0,
        on_transfer_end: Callable[[TransferEvent], None] | None = None,
        prefetch_max_bytes: int = 64 << 20,
        prefetch_max_parallel: int = 16,
        pwrite: PWrite = os.pwrite,
        persist_as: tuple[str, str] | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self._max_bytes = max_bytes
        self._fetch = fetch
        self.keep = keep
        self.linger = linger
        self._on_transfer_end = on_transfer_end
        self.prefetch_max_bytes = prefetch_max_bytes
        self.prefetch_max_parallel = prefetch_max_parallel
        self._pwrite = pwrite
        self._nursery = nursery
        self._closed = False
        self._index: OrderedDict[ContentKey, _Entry] = OrderedDict()  # LRU first
        self._by_path: dict[str, set[ContentKey]] = {}
        self._handles: dict[int, _Entry] = {}
        self._all: set[_Entry] = set()  # every entry whose fd is still open
        self._running: set[_Entry] = set()  # entries whose download task is alive
        self._handle_ids = itertools.count(1)
        self._names = itertools.count(1)
        self._usage = 0
        self._tasks = 0
        self._tasks_done = trio.Event()
        self._tasks_done.set()
        self._nowait = fileio.NoWaitReader()
        self.version_listener: VersionListener | None = None
        self.linger_max_bytes = LINGER_MAX_BYTES
        self._stats: dict[str, int] = {
            "hits": 0,
            "joins": 0,
            "misses": 0,
            "downloads": 0,
            "failures": 0,
            "cancelled": 0,
            "evictions": 0,
            "bytes_downloaded": 0,
            "prefetches": 0,
            "prefetch_used": 0,
            "prefetch_refused": 0,
            "refused_too_big": 0,
            "version_changes": 0,
            "reused": 0,  # served from a kept cache of an earlier mount, no transfer
            "reuse_rejected": 0,  # kept copies that failed their SHA-256 check
        }
        temporary = directory is None
        if directory is None:
            try:
                directory = tempdir.private_cache_dir()  # named, locked, stale ones removed
            except OSError as exc:
                raise CacheError(
                    f"cannot create a temporary cache directory: {exc.strerror}",
                    exc.errno or errno.EIO,
                ) from exc
        self.directory = directory
        self._dir_fd, created = fileio.prepare_directory(directory)
        self._created_dir = created or temporary
        self._persist: PersistentIndex | None = None
        self._persist_as = persist_as
        # Records of the kept cache not opened by this mount (LRU first); their bytes count
        # in the usage, so --cache-size bounds the directory across mounts.
        self._dormant: OrderedDict[str, Record] = OrderedDict()
        self._dormant_by_path: dict[tuple[str, str, str], set[str]] = {}
        try:
            self._open_persistent(temporary)
        except BaseException:
            fileio.close_quietly(self._dir_fd)
            raise

    def _open_persistent(self, temporary: bool) -> None:
        """With ``keep``, ``persist_as`` (vCenter, VM instance UUID) and a directory of
        the user's: load the persistent index (exclusive lock, orphan sweep)."""
        if temporary or not (self.keep and self._persist_as is not None):
            return
        try:
            self._persist = PersistentIndex(self._dir_fd)
            records = self._persist.scan()
        except OSError as exc:
            if self._persist is not None:
                self._persist.close()
            raise CacheError(
                f"cannot read the kept cache's index: {exc.strerror}", exc.errno or errno.EIO
            ) from exc
        for rec in sorted(records, key=lambda r: r.last_used):
            self._dormant[rec.id] = rec
            self._dormant_by_path.setdefault((rec.vcenter, rec.instance_uuid, rec.path), set()).add(
                rec.id
            )
            self._usage += rec.size
        if self._usage > self._max_bytes:
            self._make_room(0, include_running=False)
        log.info(
            "kept cache %s: %d files (%d bytes) from earlier mounts",
            self.directory, len(self._dormant), self._usage,
        )  # fmt: skip

    # -- properties ---------------------------------------------------------------------

    @property
    def usage(self) -> int:
        """Bytes reserved by the entries in the cache (key.size of each, running or complete)."""
        return self._usage

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    # -- lifecycle ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel downloads, close files, delete them (and our directory) unless ``keep``.

        With ``keep`` only complete files stay; partial ones are always removed. The one
        place where the cache directory is removed (only if the cache created it).
        """
        if self._closed:
            return
        self._closed = True
        for entry in list(self._all):
            if entry.linger_scope is not None:
                entry.linger_scope.cancel()
            if entry.state is _State.RUNNING:
                entry.scope.cancel()
        with trio.CancelScope(shield=True):
            await self._tasks_done.wait()
        for entry in list(self._all):
            if entry.attached and not (self.keep and entry.state is _State.COMPLETE):
                self._detach(entry)
            entry.handles = 0
            entry.busy = 0
            self._close_fd(entry)
        self._handles.clear()
        if self._persist is not None:
            self._persist.close()
        if self._dir_fd >= 0:
            fileio.close_quietly(self._dir_fd)
            self._dir_fd = -1
            if self._created_dir and not self.keep:
                try:
                    os.rmdir(self.directory)
                except OSError as exc:
                    log.warning("cache directory not removed: %s", exc.strerror)

    # -- open / read / release ----------------------------------------------------------

    async def open(self, key: ContentKey) -> int:
        """Return a handle for ``key``: joins the cached copy or the running download, or
        starts a download. Does not wait for data."""
        await trio.lowlevel.checkpoint()  # before any change: a cancelled open leaks nothing
        self._check_usable()
        entry = self._index.get(key)
        if entry is None:
            self._stats["misses"] += 1
            entry = self._start(key, prefetch=False)
        else:
            self._stats["hits"] += 1
            if entry.state is _State.RUNNING:
                self._stats["joins"] += 1
            if entry.prefetch:
                entry.prefetch = False
                self._stats["prefetch_used"] += 1
            self._index.move_to_end(key)
        entry.handles += 1
        if entry.linger_scope is not None:
            entry.linger_scope.cancel()
            entry.linger_scope = None
        handle = next(self._handle_ids)
        self._handles[handle] = entry
        return handle

    async def started(self, handle: int) -> None:
        """Wait until the handle's download knows the body's length (so a version change
        is applied before the caller answers the kernel) or has ended."""
        entry = self._handles.get(handle)
        if entry is None:
            raise CacheError("bad content handle", errno.EBADF)
        await entry.begun.wait()

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        """Bytes [offset, min(offset + size, key.size)); waits only for those to be on disk.

        Raises the download's error if it failed (never partial data of a failed attempt).
        A read that reaches ``key.size`` returns only once the whole transfer was verified.
        """
        entry = self._handles.get(handle)
        if entry is None:
            raise CacheError("bad content handle", errno.EBADF)
        if offset < 0 or size < 0:
            raise CacheError("negative read offset or size", errno.EINVAL)
        end = min(offset + size, entry.size)
        while True:
            if entry.error is not None:
                raise entry.error
            if entry.fd_closed:
                raise CacheError("content cache closed", errno.EIO)
            if entry.state is _State.COMPLETE:
                break
            # A read reaching the end of the file waits for the verdict on the whole
            # transfer (length check), so a failed attempt never looks like a clean EOF.
            if entry.written >= end and end < entry.size:
                break
            await entry.progress.wait()
        if end <= offset:
            await trio.lowlevel.checkpoint()
            return b""
        want = end - offset
        try:
            data = self._nowait.read(entry.fd, want, offset)
        except OSError as exc:
            raise CacheError(f"cache read failed: {exc.strerror}", exc.errno or errno.EIO) from exc
        if len(data) < want:
            entry.busy += 1
            try:
                rest = await trio.to_thread.run_sync(
                    fileio.pread_all, entry.fd, want - len(data), offset + len(data)
                )
            except OSError as exc:
                raise CacheError(
                    f"cache read failed: {exc.strerror}", exc.errno or errno.EIO
                ) from exc
            finally:
                entry.busy -= 1
                self._maybe_close(entry)
            data = data + rest if data else rest
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if len(data) != want:
            raise CacheError("cache file shorter than expected", errno.EIO)
        return data

    def release(self, handle: int) -> None:
        """Drop a handle (never raises). An incomplete download left without handles is
        cancelled after ``linger`` seconds; a cache over its bound evicts idle files."""
        entry = self._handles.pop(handle, None)
        if entry is None:
            return
        entry.handles -= 1
        if entry.handles > 0:
            return
        if entry.attached:
            self._index.move_to_end(entry.key)
            if entry.state is _State.RUNNING:
                if entry.size <= self.linger_max_bytes and self._usage <= self._max_bytes:
                    self._start_linger(entry)
                else:
                    # Nobody reads it and it is big (or the cache is over its bound):
                    # every further byte would only fill the disk.
                    log.debug("cancelling unread download of %r", entry.key.path)
                    entry.scope.cancel()
                    self._detach(entry)
            elif self._usage > self._max_bytes:
                self._make_room(0, include_running=False)
        self._maybe_close(entry)

    # -- prefetch -------------------------------------------------------------------------

    async def prefetch(self, key: ContentKey) -> bool:
        """Start downloading ``key`` without a handle (read-ahead of small files).

        Returns True if the key is cached or downloading (already, or now); False when the
        prefetch budget (bytes of running prefetches, number of running prefetches) or the
        cache space (without evicting files in use) does not allow it. A prefetch that no
        open() claims within ``linger`` seconds is cancelled; a finished unclaimed prefetch
        is the first thing evicted.
        """
        await trio.lowlevel.checkpoint()
        self._check_usable()
        if key in self._index:
            return True
        running = [e for e in self._running if e.prefetch and e.state is _State.RUNNING]
        if (
            len(running) >= self.prefetch_max_parallel
            or sum(e.key.size for e in running) + key.size > self.prefetch_max_bytes
            or not self._make_room(key.size, include_running=False, dry_run=True)
        ):
            self._stats["prefetch_refused"] += 1
            return False
        self._stats["prefetches"] += 1
        entry = self._start(key, prefetch=True)
        if entry.state is _State.RUNNING:
            self._start_linger(entry)
        return True

    # -- queries --------------------------------------------------------------------------

    def sha256(self, key: ContentKey) -> str | None:
        entry = self._index.get(key)
        if entry is None or entry.state is not _State.COMPLETE:
            return None
        return entry.sha256

    def transfer_time(self, key: ContentKey) -> float | None:
        """Epoch seconds at which the download of ``key`` completed (None if not complete)."""
        entry = self._index.get(key)
        if entry is None or entry.state is not _State.COMPLETE:
            return None
        return entry.completed_at

    def kept_version(self, path: str) -> tuple[int, int] | None:
        """``(size, mtime_ns)`` of the version of ``path`` an earlier mount of this VM
        fetched and kept (not opened by this mount yet); None if there is none."""
        if self._persist_as is None:
            return None
        ids = self._dormant_by_path.get((*self._persist_as, path))
        if not ids:
            return None
        rec = max((self._dormant[i] for i in ids), key=lambda r: r.last_used)
        return rec.size, rec.mtime_ns

    def in_flight(self) -> list[dict[str, object]]:
        now = time.monotonic()
        out: list[dict[str, object]] = []
        for entry in self._index.values():
            if entry.state is not _State.RUNNING or entry.record is not None:
                continue  # (a kept copy being checked is no transfer)
            elapsed = max(now - entry.started_mono, 1e-9)
            rate = entry.received / elapsed
            remaining = entry.key.size - entry.received
            out.append(
                {
                    "path": entry.key.path,
                    "done": entry.written,
                    "received": entry.received,
                    "total": entry.key.size,
                    "bytes_per_second": rate,
                    "eta_seconds": (remaining / rate) if rate > 0 else None,
                    "readers": entry.handles,
                    "prefetch": entry.prefetch,
                    "started": entry.started,
                }
            )
        return out

    # -- internals: starting and running downloads -----------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise CacheError("content cache is closed", errno.EIO)

    def _start(self, key: ContentKey, *, prefetch: bool) -> _Entry:
        # An idle older version of the same path will not be wanted again.
        for old in list(self._by_path.get(key.path, ())):
            old_entry = self._index[old]
            if old_entry.handles == 0:
                self._evict(old_entry)
        rec = self._take_dormant(key)
        try:
            # A kept file is on the disk already: it needs no more free space.
            self._check_room(key.path, key.size, key.size if rec is not None else 0)
        except CacheError:
            if rec is not None:
                self._add_dormant(rec)
            raise
        self._make_room(key.size, include_running=not prefetch)
        fd = -1
        if rec is not None:
            try:
                fd = os.open(
                    rec.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd
                )
            except OSError as exc:
                log.warning("kept copy of %r unreadable (%s): fetching it again",
                            key.path, exc.strerror)  # fmt: skip
                self._drop_record(rec)
                rec = None
        if rec is None:
            fd, name = self._create_file()
        else:
            name = rec.file
        entry = _Entry(
            key=key,
            name=name,
            fd=fd,
            started=time.time(),
            started_mono=time.monotonic(),
            prefetch=prefetch,
            size=key.size,
            record=rec,
        )
        self._index[key] = entry
        self._by_path.setdefault(key.path, set()).add(key)
        self._all.add(entry)
        self._usage += key.size
        entry.task_running = True
        self._running.add(entry)
        if self._tasks == 0:
            self._tasks_done = trio.Event()
        self._tasks += 1
        if rec is not None:
            self._nursery.start_soon(self._reuse, entry, rec, name=f"reuse-{name}")
        else:
            self._nursery.start_soon(self._download, entry, name=f"download-{name}")
        return entry

    # -- internals: the kept cache (persistent index) ----------------------------------------

    def _take_dormant(self, key: ContentKey) -> Record | None:
        """The kept record of ``key`` from an earlier mount (out of the dormant set), if any;
        kept records of other versions of the path are dropped: they will not be wanted."""
        if self._persist is None or self._persist_as is None:
            return None
        vcenter, uuid = self._persist_as
        ids = self._dormant_by_path.get((vcenter, uuid, key.path))
        if not ids:
            return None
        want = persist.key_id(vcenter, uuid, key.path, key.size, key.mtime_ns)
        found = None
        for rid in list(ids):
            rec = self._remove_dormant(rid)
            if rid == want:
                found = rec
            else:
                self._drop_record(rec)
        return found

    def _add_dormant(self, rec: Record) -> None:
        self._dormant[rec.id] = rec
        self._dormant.move_to_end(rec.id, last=False)
        self._dormant_by_path.setdefault((rec.vcenter, rec.instance_uuid, rec.path), set()).add(
            rec.id
        )
        self._usage += rec.size

    def _remove_dormant(self, rid: str) -> Record:
        rec = self._dormant.pop(rid)
        where = (rec.vcenter, rec.instance_uuid, rec.path)
        ids = self._dormant_by_path[where]
        ids.discard(rid)
        if not ids:
            del self._dormant_by_path[where]
        self._usage -= rec.size
        return rec

    def _drop_record(self, rec: Record) -> None:
        if self._persist is not None and self._dir_fd >= 0:
            try:
                self._persist.drop(rec)
            except OSError as exc:
                log.warning("cannot remove kept cache file %s: %s", rec.file, exc.strerror)

    async def _reuse(self, entry: _Entry, rec: Record) -> None:
        """Serve a kept file of an earlier mount: only once its SHA-256 (and length) are
        checked again; otherwise drop it and download the file as if it had not been kept."""
        assert self._persist is not None
        index = self._persist
        md5: str | None = None
        try:
            with entry.scope:
                md5, entry.record = await trio.to_thread.run_sync(
                    _check_kept, index, entry.fd, rec
                )
        except BaseException as exc:
            error = self._as_error(entry, exc)
            self._finish(entry, None, error or DownloadCancelled("cancelled by shutdown"))
            if error is None:
                raise
            return
        if entry.scope.cancelled_caught:
            self._finish(entry, None, DownloadCancelled(f"reuse of {entry.key.path!r} cancelled"))
            return
        if md5 is not None:
            entry.written = entry.received = entry.size
            entry.reused = True
            result = TransferResult(nbytes=entry.size, sha256=rec.sha256, seconds=0.0, md5=md5)
            self._finish(entry, result, None)
            return
        self._stats["reuse_rejected"] += 1
        log.warning(
            "kept copy of %r does not match its recorded SHA-256 (corrupt or truncated):"
            " dropped, fetching it again", entry.key.path,
        )  # fmt: skip
        entry.record = None
        self._drop_record(rec)
        entry.scope = trio.CancelScope()  # a scope is entered once; the download needs its own
        fileio.close_quietly(entry.fd)
        try:
            entry.fd, entry.name = self._create_file()
        except CacheError as exc:
            entry.fd = -1  # nothing to read: readers get the error
            self._finish(entry, None, exc)
            return
        await self._download(entry)

    async def _commit(self, entry: _Entry, rec: Record) -> None:
        """Make a completed download durable and record it (the daemon may be SIGKILLed
        at any point: the index only ever names whole, fsync'ed files)."""
        assert self._persist is not None
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._persist.commit, entry.fd, rec)
            if entry.attached:
                entry.record = rec
            else:  # evicted meanwhile: its file is gone
                self._drop_record(rec)
        except OSError as exc:
            log.warning("%r not kept for later mounts: %s", entry.key.path, exc.strerror or exc)
        finally:
            self._tasks -= 1
            if self._tasks == 0:
                self._tasks_done.set()

    def _check_room(self, path: str, size: int, already: int) -> None:
        """EFBIG unless ``size`` bytes fit in the cache bound and on the disk (``already``:
        bytes of this file reserved there already)."""
        try:
            vfs = os.statvfs(self._dir_fd)
            free = vfs.f_bavail * vfs.f_frsize
        except OSError:
            free = None
        if free is not None:
            # What running downloads still have to write is not free any more.
            free -= sum(max(e.size - e.written, 0) for e in self._running)
            free += already
            if size > free and size <= self._max_bytes:
                # The disk is fuller than the accounting says: free what nobody uses.
                before = self._usage
                self._make_room(-1, include_running=False, need_free=size - free)
                free += before - self._usage
        if size > self._max_bytes or (free is not None and size > free):
            self._stats["refused_too_big"] += 1
            room = self._max_bytes if free is None else min(self._max_bytes, free)
            log.warning(
                "refused %r: %d bytes do not fit in the cache (%d bytes available)",
                path, size, max(room, 0),
            )  # fmt: skip
            raise CacheError(f"{path!r} is larger than the cache can hold", errno.EFBIG)

    def _begin(self, entry: _Entry, size: int, stat: GuestStat | None) -> None:
        """The transfer knows the body's length (on the loop, before the first byte)."""
        key = entry.key
        if size < 0:
            raise TransferError(f"download of {key.path!r}: negative length {size}")
        mtime = stat.mtime_ns if stat is not None else key.mtime_ns
        if size != key.size:
            self._check_room(key.path, size, entry.size if entry.attached else 0)
        entry.size = size
        if (size, mtime) != (key.size, key.mtime_ns):
            # Nothing of this file was served yet: the version fetched is the one shown.
            new = ContentKey(key.path, size, mtime)
            self._stats["version_changes"] += 1
            log.info(
                "%r changed since it was stat'ed: %d -> %d bytes; serving it as it is now",
                key.path, key.size, size,
            )  # fmt: skip
            if entry.attached:
                other = self._index.get(new)
                if other is not None:
                    self._detach(other)  # its readers keep their fd; one entry per key
                del self._index[key]
                keys = self._by_path.setdefault(key.path, set())
                keys.discard(key)
                keys.add(new)
                self._index[new] = entry
                self._usage += size - key.size
            entry.key = new
            entry.seen = entry.seen or key
            if self.version_listener is not None:
                try:
                    self.version_listener(key, new, stat)
                except Exception:
                    log.exception("version listener failed")
        entry.begun.set()
        entry.wake()

    def _create_file(self) -> tuple[int, str]:
        for _ in range(1000):
            name = f"c{os.getpid()}-{next(self._names)}"
            try:
                return fileio.create_file(self._dir_fd, name), name
            except FileExistsError:
                continue  # left over by an earlier run with keep=True
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._make_room(-1, include_running=False)
                raise CacheError(
                    f"cannot create cache file: {exc.strerror}", exc.errno or errno.EIO
                ) from exc
        raise CacheError("cannot find a free cache file name", errno.EEXIST)

    async def _download(self, entry: _Entry) -> None:
        result: TransferResult | None = None
        error: GuestfsError | None = None
        try:
            with entry.scope:
                result = await self._transfer(entry)
        except BaseException as exc:
            error = self._as_error(entry, exc)
            if error is None:  # cancelled from outside (shutdown) or KeyboardInterrupt
                self._finish(entry, None, DownloadCancelled("download cancelled by shutdown"))
                raise
        else:
            if entry.scope.cancelled_caught:
                error = DownloadCancelled(f"download of {entry.key.path!r} cancelled")
        self._finish(entry, result, error)

    async def _transfer(self, entry: _Entry) -> TransferResult:
        """Run the fetch, whose worker thread writes the cache file; verify the result."""
        key = entry.key
        writer = fileio.FileWriter(
            entry.fd, entry.size, lambda n: self._stored(entry, n),
            pwrite=self._pwrite, desc=f"download of {key.path!r}",
        )  # fmt: skip

        def on_start(size: int, stat: GuestStat | None) -> None:
            self._begin(entry, size, stat)
            writer.limit = entry.size

        try:
            result = await self._fetch(key.path, key.size, writer, on_start)
        finally:
            writer.close()
        size = entry.size
        if result.nbytes != size or entry.received != size or entry.written != size:
            raise TransferError(
                f"download of {key.path!r} delivered {result.nbytes} bytes "
                f"({entry.received} received), expected {size}"
            )
        return result

    def _stored(self, entry: _Entry, nbytes: int) -> None:
        """The transfer wrote bytes [0, nbytes) of the cache file (on the loop)."""
        if nbytes <= entry.written:
            return
        self._stats["bytes_downloaded"] += nbytes - entry.written
        entry.received = entry.written = nbytes
        entry.wake()

    def _as_error(self, entry: _Entry, exc: BaseException) -> GuestfsError | None:
        """The error readers get for an exception out of a download (None: only Cancelled)."""
        exc = first_error(exc)
        if isinstance(exc, (RemoteError, CacheError)):
            return exc
        if isinstance(exc, OSError):
            err = CacheError(f"cache write failed: {exc.strerror or exc}", exc.errno or errno.EIO)
            err.__cause__ = exc
            return err
        if isinstance(exc, Exception):
            log.error("download of %r failed unexpectedly", entry.key.path, exc_info=exc)
            err2 = TransferError(f"download of {entry.key.path!r} failed: {type(exc).__name__}")
            err2.__cause__ = exc
            return err2
        return None  # trio.Cancelled, KeyboardInterrupt, ...

    def _finish(
        self, entry: _Entry, result: TransferResult | None, error: GuestfsError | None
    ) -> None:
        """Record the end of a download (called exactly once per download task)."""
        entry.task_running = False
        self._running.discard(entry)
        commit = (
            self._persist is not None and self._persist_as is not None
            and error is None and result is not None and not entry.reused and entry.attached
        )  # fmt: skip
        if commit:
            self._tasks += 1  # the commit task: aclose waits for it as for a download
        self._tasks -= 1
        if self._tasks == 0:
            self._tasks_done.set()
        if entry.linger_scope is not None:
            entry.linger_scope.cancel()
            entry.linger_scope = None
        seconds = time.monotonic() - entry.started_mono
        was_prefetch = entry.prefetch
        if error is None and result is not None:
            entry.state = _State.COMPLETE
            entry.sha256 = result.sha256
            entry.completed_at = time.time()
            if entry.reused and entry.record is not None:
                entry.completed_at = entry.record.transfer_time
                self._stats["reused"] += 1
            else:
                self._stats["downloads"] += 1
            if commit and self._persist_as is not None:
                vcenter, uuid = self._persist_as
                rec = Record(
                    vcenter, uuid, entry.key.path, entry.key.size, entry.key.mtime_ns,
                    result.sha256, entry.name, entry.completed_at, entry.completed_at,
                    result.md5,
                )  # fmt: skip
                self._nursery.start_soon(self._commit, entry, rec, name=f"commit-{entry.name}")
            if entry.handles == 0 and entry.attached and self._usage > self._max_bytes:
                self._make_room(0, include_running=False)
        else:
            error = error or DownloadCancelled("download cancelled")
            entry.state = _State.FAILED
            entry.error = error
            if isinstance(error, DownloadCancelled):
                self._stats["cancelled"] += 1
            else:
                self._stats["failures"] += 1
                log.warning("download of %r failed: %s", entry.key.path, error)
            if entry.attached:
                self._detach(entry)
            if isinstance(error, CacheError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                # The disk is fuller than our accounting thought: free what nobody uses.
                self._make_room(-1, include_running=False, need_free=entry.key.size)
        entry.begun.set()
        entry.wake()
        self._maybe_close(entry)
        if self._on_transfer_end is not None:
            event = TransferEvent(
                key=entry.key,
                started=entry.started,
                seconds=seconds,
                nbytes=entry.received,
                sha256=entry.sha256 if error is None else None,
                error=error,
                prefetch=was_prefetch,
                md5=result.md5 if error is None and result is not None else None,
                seen=entry.seen,
                cached_from=entry.completed_at if entry.reused and error is None else None,
            )
            try:
                self._on_transfer_end(event)
            except Exception:
                log.exception("on_transfer_end callback failed")

    # -- internals: linger -------------------------------------------------------------------

    def _start_linger(self, entry: _Entry) -> None:
        if entry.linger_scope is not None or self._closed:
            return
        scope = trio.CancelScope()
        entry.linger_scope = scope
        self._nursery.start_soon(self._linger, entry, scope)

    async def _linger(self, entry: _Entry, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.linger)
            if entry.linger_scope is scope:
                entry.linger_scope = None
            if entry.handles == 0 and entry.state is _State.RUNNING:
                log.debug("cancelling unused download of %r", entry.key.path)
                # Detach at once: an open() arriving while the task winds down must start
                # a new download, not join one that is about to fail.
                entry.scope.cancel()
                self._detach(entry)
                self._maybe_close(entry)

    # -- internals: space and eviction ---------------------------------------------------

    def _make_room(
        self,
        size: int,
        *,
        include_running: bool,
        dry_run: bool = False,
        need_free: int = 0,
    ) -> bool:
        """Evict idle entries until ``usage + size <= max_bytes``; True if that holds.

        Order: unclaimed prefetches first, then least recently used. Running idle downloads
        (lingering, or unclaimed prefetches) only with ``include_running``. ``size=-1`` with
        ``need_free`` evicts until that many bytes were freed (after ENOSPC), or everything
        idle.
        """

        usage = self._usage  # before any eviction: ``freed`` counts from here

        def fits(freed: int) -> bool:
            if size < 0:
                return need_free > 0 and freed >= need_free
            return usage - freed + size <= self._max_bytes

        if fits(0):
            return True
        # Kept files of earlier mounts not opened by this one are the least recently used.
        dormant: list[Record] = []
        freed = 0
        for rec in self._dormant.values():
            if fits(freed):
                break
            dormant.append(rec)
            freed += rec.size
        if not dry_run:
            for rec in dormant:
                self._stats["evictions"] += 1
                self._remove_dormant(rec.id)
                self._drop_record(rec)
        if fits(freed):
            return True
        victims: list[_Entry] = []
        candidates = [e for e in self._index.values() if e.prefetch] + [
            e for e in self._index.values() if not e.prefetch
        ]
        for entry in candidates:
            if entry.handles > 0:
                continue
            if entry.state is _State.RUNNING and not include_running:
                continue
            victims.append(entry)
            freed += entry.key.size
            if fits(freed):
                break
        ok = fits(freed)
        if dry_run:
            return ok
        for entry in victims:
            self._evict(entry)
        return ok

    def _evict(self, entry: _Entry) -> None:
        self._stats["evictions"] += 1
        if entry.state is _State.RUNNING:
            entry.scope.cancel()
        self._detach(entry)
        self._maybe_close(entry)

    def _detach(self, entry: _Entry) -> None:
        """Remove from index and accounting; unlink the file. Idempotent."""
        if not entry.attached:
            return
        entry.attached = False
        if self._index.get(entry.key) is entry:
            del self._index[entry.key]
            keys = self._by_path.get(entry.key.path)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self._by_path[entry.key.path]
        self._usage -= entry.key.size
        if entry.record is not None:
            rec, entry.record = entry.record, None
            if not entry.reused and entry.state is not _State.COMPLETE:
                # A kept copy whose check was cancelled (closed at once, shutdown): it is
                # as good as before, so it stays kept, file and record.
                if not self._closed:
                    self._add_dormant(rec)
                return
            self._drop_record(rec)
        if self._dir_fd >= 0:
            try:
                fileio.unlink_quietly(self._dir_fd, entry.name)
            except OSError as exc:
                log.warning("cannot remove cache file %s: %s", entry.name, exc.strerror)

    def _maybe_close(self, entry: _Entry) -> None:
        if not entry.attached and entry.handles == 0 and entry.busy == 0 and not entry.task_running:
            self._close_fd(entry)

    def _close_fd(self, entry: _Entry) -> None:
        if not entry.fd_closed:
            entry.fd_closed = True
            fileio.close_quietly(entry.fd)
            self._all.discard(entry)
            entry.wake()

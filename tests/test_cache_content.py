"""Tests of guestfs_mount.cache.content with fake fetch functions (no network, no FUSE)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from guestfs_mount.cache import (
    ContentCache,
    ContentKey,
    DownloadCancelled,
    Sink,
    TransferEvent,
    fileio,
)
from guestfs_mount.errors import CacheError, TransferError, to_errno
from guestfs_mount.model import TransferResult

MiB = 1 << 20


def blob(n: int, seed: int = 0) -> bytes:
    """Deterministic non-repeating-ish content."""
    block = hashlib.sha256(f"{seed}".encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


class FakeFetch:
    """fetch(path, size, writer) over an in-memory dict, with knobs for each failure mode.
    Like the real transfer, it writes each piece in a worker thread and then reports on
    the loop how far the body is stored."""

    def __init__(self, files: dict[str, bytes], chunk: int = MiB) -> None:
        self.files = files
        self.chunk = chunk
        self.calls: list[str] = []
        self.hold_at: dict[str, int] = {}  # path -> offset at which to wait for the gate
        self.gate: dict[str, trio.Event] = {}
        self.fail_at: dict[str, tuple[int, BaseException]] = {}
        self.truncate: dict[str, int] = {}  # send only this many bytes
        self.lie_nbytes: dict[str, int] = {}  # report this nbytes
        self.delay = 0.0  # sleep between chunks
        self.cancelled: list[str] = []
        self.real_size: dict[str, int] = {}  # path -> length reported before the body

    def hold(self, path: str, at: int) -> trio.Event:
        self.hold_at[path] = at
        ev = self.gate[path] = trio.Event()
        return ev

    async def __call__(
        self, path: str, size: int, writer: Sink, on_start: Any = None
    ) -> TransferResult:
        self.calls.append(path)
        data = self.files[path]
        data = data[: self.truncate.get(path, len(data))]
        if on_start is not None and path in self.real_size:
            on_start(self.real_size[path], None)
        h = hashlib.sha256()
        try:
            for off in range(0, len(data), self.chunk):
                if path in self.hold_at and off >= self.hold_at[path]:
                    await self.gate[path].wait()
                if path in self.fail_at and off >= self.fail_at[path][0]:
                    raise self.fail_at[path][1]
                piece = data[off : off + self.chunk]
                await trio.to_thread.run_sync(writer.write, piece, off)
                writer.stored(off + len(piece))
                h.update(piece)
                if self.delay:
                    await trio.sleep(self.delay)
        except trio.Cancelled:
            self.cancelled.append(path)
            raise
        return TransferResult(self.lie_nbytes.get(path, len(data)), h.hexdigest(), 0.0)


def key_of(path: str, data: bytes, mtime: int = 1) -> ContentKey:
    return ContentKey(path, len(data), mtime)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


Factory = Callable[..., Any]


@pytest.fixture
def make_cache(tmp_path: Path, nursery: trio.Nursery) -> Factory:
    caches: list[ContentCache] = []

    async def make(fetch: Any, max_bytes: int = 64 * MiB, **kw: Any) -> ContentCache:
        c = ContentCache(str(tmp_path / "cache"), max_bytes, fetch, nursery=nursery, **kw)
        caches.append(c)
        return c

    return make


async def read_all(cache: ContentCache, h: int, size: int, step: int = 128 * 1024) -> bytes:
    parts = []
    off = 0
    while True:
        b = await cache.read(h, off, step)
        if not b:
            break
        parts.append(b)
        off += len(b)
    return b"".join(parts)


def cache_files(tmp_path: Path) -> list[str]:
    d = tmp_path / "cache"
    return sorted(os.listdir(d)) if d.exists() else []


# -- reads during a download ---------------------------------------------------------------


async def test_read_waits_only_for_needed_bytes(make_cache: Factory) -> None:
    data = blob(8 * MiB)
    fetch = FakeFetch({"/big": data})
    gate = fetch.hold("/big", MiB)
    cache = await make_cache(fetch)
    key = key_of("/big", data)
    h = await cache.open(key)
    with trio.fail_after(2):
        assert await cache.read(h, 0, 4096) == data[:4096]
        assert await cache.read(h, MiB - 10, 10) == data[MiB - 10 : MiB]
    assert cache.sha256(key) is None
    flights = cache.in_flight()
    assert len(flights) == 1 and flights[0]["path"] == "/big" and flights[0]["readers"] == 1
    # A read past what has arrived waits.
    with trio.move_on_after(0.2) as scope:
        await cache.read(h, MiB, 4096)
    assert scope.cancelled_caught
    gate.set()
    with trio.fail_after(5):
        assert await read_all(cache, h, len(data)) == data
        while cache.sha256(key) is None:
            await trio.sleep(0.01)
    assert cache.sha256(key) == hashlib.sha256(data).hexdigest()
    assert cache.transfer_time(key) is not None
    # Exact lengths: short only at EOF, empty past EOF.
    assert await cache.read(h, len(data) - 5, 100) == data[-5:]
    assert await cache.read(h, len(data) + 10, 100) == b""
    cache.release(h)


async def test_small_chunks_flushed_early_for_a_waiting_reader(make_cache: Factory) -> None:
    """Sink chunks are buffered to 1 MiB, unless a reader waits for bytes in the buffer."""
    data = blob(4 * MiB)
    fetch = FakeFetch({"/f": data}, chunk=16 * 1024)
    fetch.hold("/f", 64 * 1024)
    cache = await make_cache(fetch)
    h = await cache.open(key_of("/f", data))
    with trio.fail_after(2):
        assert await cache.read(h, 0, 4096) == data[:4096]


async def test_concurrent_opens_share_one_fetch(make_cache: Factory) -> None:
    data = blob(3 * MiB + 123)
    fetch = FakeFetch({"/f": data})
    fetch.delay = 0.001
    cache = await make_cache(fetch)
    key = key_of("/f", data)
    results: list[bytes] = []

    async def reader() -> None:
        h = await cache.open(key)
        results.append(await read_all(cache, h, len(data), step=100_000))
        cache.release(h)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for _ in range(16):
                n.start_soon(reader)
    assert fetch.calls == ["/f"]
    assert results == [data] * 16
    h = await cache.open(key)
    assert await cache.read(h, 0, 10) == data[:10]
    cache.release(h)
    assert fetch.calls == ["/f"]
    st = cache.stats
    assert st["misses"] == 1 and st["hits"] == 16 and st["downloads"] == 1
    assert st["bytes_downloaded"] == len(data)


async def test_cancelled_reader_does_not_cancel_download(make_cache: Factory) -> None:
    data = blob(4 * MiB)
    fetch = FakeFetch({"/f": data})
    gate = fetch.hold("/f", MiB)
    cache = await make_cache(fetch)
    key = key_of("/f", data)
    h1 = await cache.open(key)
    h2 = await cache.open(key)
    with trio.move_on_after(0.1):
        await cache.read(h1, 3 * MiB, 10)  # cancelled while waiting
    cache.release(h1)
    gate.set()
    with trio.fail_after(5):
        assert await read_all(cache, h2, len(data)) == data
    cache.release(h2)
    assert fetch.calls == ["/f"] and fetch.cancelled == []


# -- failures --------------------------------------------------------------------------------


async def test_failure_reaches_waiting_readers_and_next_open_retries(
    make_cache: Factory, tmp_path: Path
) -> None:
    data = blob(4 * MiB)
    fetch = FakeFetch({"/f": data})
    fetch.fail_at["/f"] = (2 * MiB, TransferError("connection cut"))
    gate = fetch.hold("/f", 2 * MiB)
    events: list[TransferEvent] = []
    cache = await make_cache(fetch, on_transfer_end=events.append)
    key = key_of("/f", data)
    h = await cache.open(key)
    assert await cache.read(h, 0, 1000) == data[:1000]  # correct bytes while running
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await cache.read(h, 3 * MiB, 4096)
        except TransferError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(waiter)
        await trio.sleep(0.05)
        gate.set()
    assert len(errors) == 3 and all(to_errno(e) == errno.EIO for e in errors)
    # Bytes of a failed attempt are never served again, even the ones that had arrived.
    with pytest.raises(TransferError):
        await cache.read(h, 0, 1000)
    assert cache_files(tmp_path) == []  # file deleted at once
    assert cache.usage == 0
    assert len(events) == 1 and isinstance(events[0].error, TransferError)
    assert events[0].sha256 is None and events[0].nbytes == 2 * MiB
    cache.release(h)
    # The next open starts a new transfer, which now succeeds.
    del fetch.fail_at["/f"]
    del fetch.hold_at["/f"]
    h = await cache.open(key)
    with trio.fail_after(5):
        assert await read_all(cache, h, len(data)) == data
    cache.release(h)
    assert fetch.calls == ["/f", "/f"]
    assert cache.stats["failures"] == 1 and cache.stats["downloads"] == 1
    assert len(events) == 2 and events[1].error is None
    assert events[1].sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", ["short_body", "long_body", "lying_nbytes"])
async def test_short_or_long_results_rejected(make_cache: Factory, mode: str) -> None:
    data = blob(2 * MiB + 7)
    fetch = FakeFetch({"/f": data + b"extra" if mode == "long_body" else data})
    if mode == "short_body":
        fetch.truncate["/f"] = len(data) - 7
    if mode == "lying_nbytes":
        fetch.lie_nbytes["/f"] = len(data) + 1
    cache = await make_cache(fetch)
    key = key_of("/f", data)
    h = await cache.open(key)
    with trio.fail_after(5), pytest.raises(TransferError):
        await read_all(cache, h, len(data))
    with pytest.raises(TransferError):
        await cache.read(h, 0, 10)
    assert cache.sha256(key) is None
    cache.release(h)
    assert cache.usage == 0 and cache.stats["failures"] == 1


async def test_unexpected_fetch_exception_becomes_transfer_error(make_cache: Factory) -> None:
    data = blob(MiB)
    fetch = FakeFetch({"/f": data})
    fetch.fail_at["/f"] = (0, ValueError("bug"))
    cache = await make_cache(fetch)
    h = await cache.open(key_of("/f", data))
    with trio.fail_after(5), pytest.raises(TransferError):
        await cache.read(h, 0, 10)
    cache.release(h)


# -- linger ------------------------------------------------------------------------------------


async def test_linger_cancels_unused_download_and_open_reattaches(
    make_cache: Factory, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    data = blob(64 * MiB)
    fetch = FakeFetch({"/huge": data})
    fetch.delay = 1.0  # 1 MiB per (virtual) second
    events: list[TransferEvent] = []
    cache = await make_cache(fetch, max_bytes=256 * MiB, linger=10.0, on_transfer_end=events.append)
    cache.linger_max_bytes = 64 * MiB  # a file small enough to keep downloading unread
    key = key_of("/huge", data)
    h = await cache.open(key)
    assert await cache.read(h, 0, 4096) == data[:4096]  # `head -c 4096`
    cache.release(h)
    await trio.sleep(5)
    h = await cache.open(key)  # re-attaches during linger: same download
    assert await cache.read(h, 5 * MiB, 10) == data[5 * MiB : 5 * MiB + 10]
    cache.release(h)
    assert fetch.calls == ["/huge"] and events == []
    await trio.sleep(10.5)
    while not events:  # the download task may still be finishing a (real-time) thread write
        await trio.sleep(0.01)
    assert fetch.cancelled == ["/huge"]
    assert len(events) == 1 and isinstance(events[0].error, DownloadCancelled)
    assert cache.in_flight() == [] and cache.usage == 0
    assert cache_files(tmp_path) == []
    assert cache.stats["cancelled"] == 1 and cache.stats["failures"] == 0
    # Opening again starts a fresh download.
    h = await cache.open(key)
    assert await cache.read(h, 0, 10) == data[:10]
    cache.release(h)
    assert fetch.calls == ["/huge", "/huge"]


# -- eviction ------------------------------------------------------------------------------------


async def _load(cache: ContentCache, key: ContentKey, release: bool = True) -> int:
    h = await cache.open(key)
    with trio.fail_after(5):
        await read_all(cache, h, key.size, step=MiB)
    if release:
        cache.release(h)
    return h


async def test_lru_eviction_order(make_cache: Factory) -> None:
    files = {f"/{n}": blob(MiB, i) for i, n in enumerate("abcd")}
    fetch = FakeFetch(files)
    cache = await make_cache(fetch, max_bytes=3 * MiB)
    keys = {p: key_of(p, d) for p, d in files.items()}
    for p in ("/a", "/b", "/c"):
        await _load(cache, keys[p])
    assert cache.usage == 3 * MiB
    await _load(cache, keys["/a"])  # touch a: b is now least recently used
    await _load(cache, keys["/d"])
    assert cache.sha256(keys["/b"]) is None
    assert all(cache.sha256(keys[p]) for p in ("/a", "/c", "/d"))
    assert cache.usage == 3 * MiB and cache.stats["evictions"] == 1
    assert fetch.calls == ["/a", "/b", "/c", "/d"]


async def test_open_files_are_never_evicted(make_cache: Factory) -> None:
    files = {f"/{n}": blob(MiB, i) for i, n in enumerate("abcd")}
    fetch = FakeFetch(files)
    cache = await make_cache(fetch, max_bytes=2 * MiB)
    keys = {p: key_of(p, d) for p, d in files.items()}
    ha = await _load(cache, keys["/a"], release=False)
    await _load(cache, keys["/b"])
    await _load(cache, keys["/c"])  # evicts b, not the open a
    await _load(cache, keys["/d"])  # evicts c
    assert cache.sha256(keys["/a"]) is not None
    assert await cache.read(ha, 0, MiB) == files["/a"]
    assert cache.sha256(keys["/b"]) is None and cache.sha256(keys["/c"]) is None
    # Two open files over the bound: the cache goes over, then comes back on release.
    hd = await cache.open(keys["/d"])
    hb = await _load(cache, keys["/b"], release=False)
    assert cache.usage == 3 * MiB
    cache.release(hb)
    assert cache.usage <= 2 * MiB
    cache.release(hd)
    cache.release(ha)
    assert cache.usage <= 2 * MiB


async def test_new_version_replaces_idle_old_one(make_cache: Factory) -> None:
    old, new = blob(MiB, 1), blob(MiB + 5, 2)
    fetch = FakeFetch({"/f": old})
    cache = await make_cache(fetch)
    k_old = ContentKey("/f", len(old), 1)
    await _load(cache, k_old)
    fetch.files["/f"] = new
    k_new = ContentKey("/f", len(new), 2)
    h = await cache.open(k_new)
    assert await read_all(cache, h, len(new)) == new
    cache.release(h)
    assert cache.sha256(k_old) is None and cache.usage == len(new)


# -- ENOSPC ----------------------------------------------------------------------------------


async def test_enospc_fails_download_frees_space_and_recovers(
    make_cache: Factory, tmp_path: Path
) -> None:
    files = {"/old": blob(MiB, 1), "/f": blob(3 * MiB, 2)}
    fetch = FakeFetch(files)
    full = {"on": False}

    def pwrite(fd: int, data: bytes | memoryview, off: int) -> int:
        if full["on"] and off >= MiB:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(fd, data, off)

    events: list[TransferEvent] = []
    cache = await make_cache(fetch, pwrite=pwrite, on_transfer_end=events.append)
    await _load(cache, key_of("/old", files["/old"]))
    full["on"] = True
    key = key_of("/f", files["/f"])
    h = await cache.open(key)
    with trio.fail_after(5):
        assert await cache.read(h, 0, 100) == files["/f"][:100]
        with pytest.raises(CacheError) as info:
            await cache.read(h, 2 * MiB, 100)
    assert info.value.errno == errno.ENOSPC and to_errno(info.value) == errno.ENOSPC
    assert isinstance(events[-1].error, CacheError)
    cache.release(h)
    assert cache.sha256(key_of("/old", files["/old"])) is None  # unused entry evicted
    assert cache.usage == 0 and cache_files(tmp_path) == []
    full["on"] = False
    h = await cache.open(key)
    with trio.fail_after(5):
        assert await read_all(cache, h, key.size) == files["/f"]
    cache.release(h)


# -- prefetch ---------------------------------------------------------------------------------


async def test_prefetch_budget_parallel_and_bytes(make_cache: Factory) -> None:
    files = {f"/p{i}": blob(MiB, i) for i in range(6)}
    fetch = FakeFetch(files)
    for p in files:
        fetch.hold(p, 0)  # nothing arrives: all stay running
    cache = await make_cache(fetch, prefetch_max_parallel=2, prefetch_max_bytes=3 * MiB)
    keys = [key_of(p, d) for p, d in files.items()]
    assert await cache.prefetch(keys[0]) is True
    assert await cache.prefetch(keys[0]) is True  # already there: no new download
    assert await cache.prefetch(keys[1]) is True
    assert await cache.prefetch(keys[2]) is False  # parallel budget
    cache.prefetch_max_parallel = 10
    assert await cache.prefetch(keys[2]) is True
    assert await cache.prefetch(keys[3]) is False  # byte budget (3 MiB)
    await trio.sleep(0.01)
    assert sorted(fetch.calls) == ["/p0", "/p1", "/p2"]
    # An open claims the prefetch: no new fetch, and it no longer counts in the budget.
    h = await cache.open(keys[0])
    fetch.gate["/p0"].set()
    with trio.fail_after(5):
        assert await read_all(cache, h, MiB) == files["/p0"]
    cache.release(h)
    assert await cache.prefetch(keys[3]) is True
    assert fetch.calls.count("/p0") == 1
    assert cache.stats["prefetch_used"] == 1


async def test_prefetch_does_not_evict_open_files_or_overshoot(make_cache: Factory) -> None:
    files = {"/open": blob(2 * MiB, 1), "/p": blob(MiB, 2)}
    fetch = FakeFetch(files)
    cache = await make_cache(fetch, max_bytes=2 * MiB)
    h = await _load(cache, key_of("/open", files["/open"]), release=False)
    assert await cache.prefetch(key_of("/p", files["/p"])) is False
    cache.release(h)
    assert await cache.prefetch(key_of("/p", files["/p"])) is True  # evicts the idle file


async def test_unused_prefetch_cancelled_after_linger(
    make_cache: Factory, autojump_clock: trio.testing.MockClock
) -> None:
    files = {"/p": blob(8 * MiB)}
    fetch = FakeFetch(files)
    fetch.delay = 1.0
    events: list[TransferEvent] = []
    cache = await make_cache(fetch, linger=3.0, on_transfer_end=events.append)
    assert await cache.prefetch(key_of("/p", files["/p"])) is True
    await trio.sleep(5)
    while not events:
        await trio.sleep(0.01)
    assert fetch.cancelled == ["/p"] and cache.usage == 0
    assert len(events) == 1 and events[0].prefetch
    assert isinstance(events[0].error, DownloadCancelled)


async def test_unused_prefetches_are_evicted_first(make_cache: Factory) -> None:
    files = {f"/{n}": blob(MiB, i) for i, n in enumerate("abcp")}
    fetch = FakeFetch(files)
    cache = await make_cache(fetch, max_bytes=3 * MiB)
    await _load(cache, key_of("/a", files["/a"]))
    assert await cache.prefetch(key_of("/p", files["/p"]))
    with trio.fail_after(5):
        while cache.in_flight():
            await trio.sleep(0.01)
    await _load(cache, key_of("/b", files["/b"]))
    await _load(cache, key_of("/c", files["/c"]))  # evicts p (unused prefetch), not a
    assert cache.sha256(key_of("/p", files["/p"])) is None
    assert cache.sha256(key_of("/a", files["/a"])) is not None


# -- files, permissions, shutdown ---------------------------------------------------------------


async def test_permissions_and_names(make_cache: Factory, tmp_path: Path) -> None:
    hostile = "/../../etc/passwd\n\udcff"
    data = blob(MiB + 1)
    cache = await make_cache(FakeFetch({hostile: data}))
    d = tmp_path / "cache"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    await _load(cache, key_of(hostile, data))
    names = cache_files(tmp_path)
    assert len(names) == 1
    assert "passwd" not in names[0]
    assert stat.S_IMODE((d / names[0]).stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
async def test_refuses_accessible_directory(
    tmp_path: Path, nursery: trio.Nursery, mode: int
) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(CacheError):
        ContentCache(str(d), MiB, FakeFetch({}), nursery=nursery)


async def test_refuses_symlinked_directory(tmp_path: Path, nursery: trio.Nursery) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(CacheError):
        ContentCache(str(link), MiB, FakeFetch({}), nursery=nursery)


async def test_aclose_removes_files_and_directory(make_cache: Factory, tmp_path: Path) -> None:
    files = {"/a": blob(MiB), "/run": blob(4 * MiB)}
    fetch = FakeFetch(files)
    gate = fetch.hold("/run", MiB)
    cache = await make_cache(fetch)
    await _load(cache, key_of("/a", files["/a"]))
    h = await cache.open(key_of("/run", files["/run"]))
    assert await cache.read(h, 0, 10) == files["/run"][:10]
    async with trio.open_nursery() as n:

        async def waiter() -> None:
            with pytest.raises(CacheError):
                await cache.read(h, 3 * MiB, 10)

        n.start_soon(waiter)
        await trio.sleep(0.01)
        with trio.fail_after(5):
            await cache.aclose()
    assert not (tmp_path / "cache").exists()
    assert fetch.cancelled == ["/run"] and not gate.is_set()
    with pytest.raises(CacheError):
        await cache.read(h, 0, 10)
    cache.release(h)  # harmless after close
    with pytest.raises(CacheError):
        await cache.open(key_of("/a", files["/a"]))


async def test_keep_keeps_complete_files_only(make_cache: Factory, tmp_path: Path) -> None:
    files = {"/a": blob(MiB), "/run": blob(4 * MiB)}
    fetch = FakeFetch(files)
    fetch.hold("/run", MiB)
    cache = await make_cache(fetch, keep=True)
    await _load(cache, key_of("/a", files["/a"]))
    await cache.open(key_of("/run", files["/run"]))
    await trio.sleep(0.01)
    assert len(cache_files(tmp_path)) == 2
    await cache.aclose()
    names = cache_files(tmp_path)
    assert len(names) == 1
    assert (tmp_path / "cache" / names[0]).read_bytes() == files["/a"]
    # A second cache on the kept directory works (fresh names, no clash).
    async with trio.open_nursery() as n:
        cache2 = ContentCache(str(tmp_path / "cache"), 8 * MiB, fetch, nursery=n)
        await _load(cache2, key_of("/a", files["/a"]))
        await cache2.aclose()
    assert cache_files(tmp_path) == names  # the kept file stays; ours is removed


async def test_bad_handle(make_cache: Factory) -> None:
    cache = await make_cache(FakeFetch({}))
    with pytest.raises(CacheError) as info:
        await cache.read(12345, 0, 1)
    assert info.value.errno == errno.EBADF
    cache.release(12345)  # never raises


def _contents(directory: str) -> list[bytes] | None:
    """The files of a directory (None: it does not exist)."""
    if not os.path.exists(directory):
        return None
    return [Path(directory, name).read_bytes() for name in sorted(os.listdir(directory))]


async def test_temporary_directory_is_private_and_removed(nursery: trio.Nursery) -> None:
    """No --cache-dir: the cache makes a private directory and is the one to remove it."""
    files = {"/a": blob(MiB)}
    cache = ContentCache(None, 8 * MiB, FakeFetch(files), nursery=nursery)
    assert stat.S_IMODE(os.lstat(cache.directory).st_mode) == 0o700
    await _load(cache, key_of("/a", files["/a"]))
    await cache.aclose()
    assert _contents(cache.directory) is None


async def test_temporary_directory_kept_with_keep(nursery: trio.Nursery) -> None:
    files = {"/a": blob(MiB)}
    cache = ContentCache(None, 8 * MiB, FakeFetch(files), nursery=nursery, keep=True)
    await _load(cache, key_of("/a", files["/a"]))
    await cache.aclose()
    try:
        assert _contents(cache.directory) == [files["/a"]]
    finally:
        shutil.rmtree(cache.directory)


async def test_unread_big_download_is_cancelled_at_close(
    make_cache: Factory, autojump_clock: trio.testing.MockClock
) -> None:
    # Issue 10 item 9: `head -c 16` of a big file must not keep downloading after close.
    data = blob(64 * MiB)
    fetch = FakeFetch({"/big": data})
    fetch.delay = 1.0
    # A linger far longer than any jump of the virtual clock while real threads write.
    cache = await make_cache(fetch, max_bytes=256 * MiB, linger=1000.0)
    h = await cache.open(key_of("/big", data))
    assert await cache.read(h, 0, 16) == data[:16]
    t0 = trio.current_time()
    cache.release(h)
    while cache.stats["cancelled"] == 0:
        await trio.sleep(0.01)
    assert trio.current_time() - t0 < 100.0  # at once, not after the linger
    assert cache.usage == 0 and fetch.cancelled == ["/big"]


@pytest.mark.parametrize("where", ["cache", "disk"])
async def test_file_larger_than_cache_or_disk_is_refused(
    make_cache: Factory, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    data = blob(2 * MiB)
    fetch = FakeFetch({"/f": data})
    cache = await make_cache(fetch, max_bytes=MiB if where == "cache" else 64 * MiB)
    if where == "disk":
        real = os.statvfs

        class Small:
            f_bavail, f_frsize = 256, 4096  # 1 MiB free

        monkeypatch.setattr(os, "statvfs", lambda fd: Small() if isinstance(fd, int) else real(fd))
    with pytest.raises(CacheError) as ei:
        await cache.open(key_of("/f", data))
    assert ei.value.errno == errno.EFBIG and to_errno(ei.value) == errno.EFBIG
    assert fetch.calls == [] and cache.stats["refused_too_big"] == 1


async def test_length_found_by_the_transfer_rekeys_the_version(make_cache: Factory) -> None:
    # Issue 10 item 1: the guest appended after the stat; the transfer reports 15 bytes.
    now = b"line1\nline2\nabc"
    fetch = FakeFetch({"/log": now})
    fetch.real_size["/log"] = len(now)
    changes: list[tuple[ContentKey, ContentKey]] = []
    events: list[TransferEvent] = []
    cache = await make_cache(fetch, on_transfer_end=events.append)
    cache.version_listener = lambda old, new, st: changes.append((old, new))
    seen = ContentKey("/log", 6, 5)
    h = await cache.open(seen)
    await cache.started(h)
    assert changes == [(seen, ContentKey("/log", len(now), 5))]
    assert await cache.read(h, 0, 4096) == now
    assert await cache.read(h, 6, 4096) == now[6:]  # past the old size: the new bytes
    cache.release(h)
    assert events[-1].error is None and events[-1].seen == seen
    assert events[-1].key.size == len(now)
    assert cache.sha256(ContentKey("/log", len(now), 5)) == hashlib.sha256(now).hexdigest()
    assert cache.usage == len(now)


# -- the writer the transfer's thread uses ---------------------------------------------------


def test_file_writer_owns_a_duplicate_fd_and_refuses_writes_after_close(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    told: list[int] = []
    w = fileio.FileWriter(fd, 10, told.append, desc="download of '/f'")
    os.close(fd)  # the cache may close its own fd at any time: the writer has its own
    w.write(b"hello", 0)
    with pytest.raises(TransferError, match="longer than 10 bytes"):
        w.write(b"worldwide", 5)
    w.stored(5)
    w.close()
    w.stored(10)  # a report after the download ended is dropped
    with pytest.raises(CacheError) as ei:
        w.write(b"x", 5)
    assert to_errno(ei.value) == errno.EIO
    assert told == [5] and (tmp_path / "f").read_bytes() == b"hello"
    assert w._fd not in {int(n) for n in os.listdir("/proc/self/fd")}  # closed at close()

"""The persistent index of a kept cache directory, and the content cache using it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from guestfs_mount.cache import ContentCache, ContentKey, TransferEvent, fileio
from guestfs_mount.cache.persist import PersistentIndex, Record, file_hashes
from guestfs_mount.errors import CacheError
from guestfs_mount.model import TransferResult

DATA = b"guest bytes\n" * 100
VM = ("vc.example", "4211aaaa-bbbb-cccc-dddd-eeeeffff0000")


def _setup(tmp_path: Path) -> tuple[int, PersistentIndex, Record]:
    d = tmp_path / "cache"
    dir_fd, _ = fileio.prepare_directory(str(d))
    (d / "c1-1").write_bytes(DATA)
    idx = PersistentIndex(dir_fd)
    rec = Record("vc", "uuid-1", "/etc/motd", len(DATA), 5, hashlib.sha256(DATA).hexdigest(),
                 "c1-1", time.time(), time.time())  # fmt: skip
    idx.record(rec)
    return dir_fd, idx, rec


def test_record_survives_reopen_and_verifies(tmp_path: Path) -> None:
    dir_fd, idx, rec = _setup(tmp_path)
    idx.close()
    idx = PersistentIndex(dir_fd)
    assert idx.scan() == [rec]
    fd = os.open(tmp_path / "cache" / "c1-1", os.O_RDONLY)
    assert file_hashes(fd, rec) == hashlib.md5(DATA).hexdigest()
    os.close(fd)
    idx.close()


def test_corrupt_or_truncated_file_fails_the_check(tmp_path: Path) -> None:
    _, idx, rec = _setup(tmp_path)
    f = tmp_path / "cache" / "c1-1"
    for bad in (b"X" + DATA[1:], DATA[:-1], DATA + b"!"):
        f.write_bytes(bad)
        fd = os.open(f, os.O_RDONLY)
        assert file_hashes(fd, rec) is None
        os.close(fd)
    idx.drop(rec)
    assert not f.exists() and idx.scan() == []
    idx.close()


def test_scan_sweeps_orphans_and_drops_bad_records(tmp_path: Path) -> None:
    dir_fd, idx, rec = _setup(tmp_path)
    d = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True).stdout.strip().decode()  # fmt: skip
    (d / f"c{dead}-9").write_bytes(b"left by a SIGKILL before its record")
    (d / f"c{os.getpid()}-9").write_bytes(b"a download of a live mount sharing the directory")
    (d / "notes.txt").write_bytes(b"not ours: never removed")
    (d / "index" / ".x.1.tmp").write_bytes(b"{")
    (d / "index" / ("0" * 64 + ".json")).write_bytes(b"not json")
    other = Record("vc", "uuid-1", "/gone", 3, 0, "a" * 64, "c1-2", 0.0, 0.0)
    idx.record(other)  # its file does not exist
    evil = json.loads((d / "index" / (rec.id + ".json")).read_bytes())
    evil["file"] = "../../etc/passwd"
    (d / "index" / ("1" * 64 + ".json")).write_text(json.dumps(evil))
    assert idx.scan() == [rec]
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted(["c1-1", f"c{os.getpid()}-9", "index", "lock", "notes.txt"])
    assert [p.name for p in (d / "index").iterdir()] == [rec.id + ".json"]
    idx.close()


def test_second_index_on_same_dir_is_refused(tmp_path: Path) -> None:
    _, idx, _ = _setup(tmp_path)
    fd2 = os.open(tmp_path / "cache", os.O_RDONLY)
    with pytest.raises(CacheError, match="in use by another mount that keeps its cache"):
        PersistentIndex(fd2)
    os.close(fd2)
    idx.close()


def test_sigkill_while_recording_leaves_only_whole_records(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    fileio.prepare_directory(str(d))
    script = (
        "import os, sys, time\n"
        "from guestfs_mount.cache.persist import PersistentIndex, Record\n"
        "idx = PersistentIndex(os.open(sys.argv[1], os.O_RDONLY))\n"
        "print('ready', flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    idx.record(Record('vc', 'u', f'/f{i % 50}', i, 0, 'a' * 64, 'c1-1', 0.0, 0.0))\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(d)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    while len(list((d / "index").glob("*.json"))) < 20:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = list((d / "index").glob("*.json"))
    assert records
    for p in records:
        assert Record(**json.loads(p.read_bytes())).instance_uuid == "u"
    # The lock died with the process: a new mount may use the directory.
    PersistentIndex(os.open(d, os.O_RDONLY)).close()


# -- the content cache with a kept directory ------------------------------------------------


class _Guest:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.fetches: list[str] = []

    async def fetch(self, path: str, size: int, writer: Any, on_start: Any) -> TransferResult:
        self.fetches.append(path)
        data = self.files[path]
        on_start(len(data), None)
        await trio.to_thread.run_sync(writer.write, data, 0)
        writer.stored(len(data))
        return TransferResult(
            len(data), hashlib.sha256(data).hexdigest(), 0.0, hashlib.md5(data).hexdigest()
        )


async def _session(
    d: Path, guest: _Guest, keys: list[ContentKey], *, max_bytes: int = 1 << 30,
    persist_as: tuple[str, str] | None = VM,
) -> tuple[list[bytes], list[TransferEvent], dict[str, int]]:  # fmt: skip
    events: list[TransferEvent] = []
    out = []
    async with trio.open_nursery() as nursery:
        cache = ContentCache(
            str(d), max_bytes, guest.fetch, nursery=nursery, keep=True,
            on_transfer_end=events.append, persist_as=persist_as,
        )  # fmt: skip
        for key in keys:
            h = await cache.open(key)
            out.append(await cache.read(h, 0, key.size + 10))
            cache.release(h)
        stats = cache.stats
        await cache.aclose()
    return out, events, stats


def _key(path: str, data: bytes, mtime: int = 7) -> ContentKey:
    return ContentKey(path, len(data), mtime)


async def test_second_session_reuses_verified_files_without_fetching(tmp_path: Path) -> None:
    files = {"/a": b"A" * 5000, "/b": b"B" * 300}
    guest = _Guest(files)
    keys = [_key(p, v) for p, v in files.items()]
    d = tmp_path / "cache"
    await _session(d, guest, keys)
    assert guest.fetches == ["/a", "/b"]
    got, events, stats = await _session(d, guest, keys)
    assert got == [files["/a"], files["/b"]]
    assert guest.fetches == ["/a", "/b"]  # nothing fetched again
    assert stats["reused"] == 2 and stats["downloads"] == 0
    assert all(e.cached_from is not None and e.error is None for e in events)
    assert events[0].sha256 == hashlib.sha256(files["/a"]).hexdigest()
    assert events[0].md5 == hashlib.md5(files["/a"]).hexdigest()
    # Another VM (same vCenter, another instance UUID) never gets these files.
    await _session(d, guest, keys[:1], persist_as=("vc.example", "another-uuid"))
    assert guest.fetches == ["/a", "/b", "/a"]


async def test_changed_version_and_corrupt_copy_are_fetched_again(tmp_path: Path) -> None:
    files = {"/a": b"A" * 5000, "/b": b"B" * 300}
    guest = _Guest(files)
    d = tmp_path / "cache"
    await _session(d, guest, [_key(p, v) for p, v in files.items()])
    kept = {p.read_bytes(): p for p in d.iterdir() if p.name.startswith("c")}
    kept[files["/b"]].write_bytes(b"X" * 300)  # same length, other bytes
    files["/a"] = b"a" * 6000  # the guest file changed
    guest.fetches.clear()
    got, events, stats = await _session(d, guest, [_key(p, v) for p, v in files.items()])
    assert got == [files["/a"], b"B" * 300]
    assert guest.fetches == ["/a", "/b"]
    assert stats["reuse_rejected"] == 1 and stats["reused"] == 0
    assert [e.cached_from for e in events] == [None, None]
    # Only the current versions are kept.
    assert sorted(p.read_bytes() for p in d.iterdir() if p.name.startswith("c")) == sorted(
        [files["/a"], b"B" * 300]
    )


async def test_cache_size_bounds_the_directory_across_mounts(tmp_path: Path) -> None:
    files = {f"/f{i}": bytes([65 + i]) * 1000 for i in range(4)}
    guest = _Guest(files)
    d = tmp_path / "cache"
    keys = [_key(p, v) for p, v in files.items()]
    await _session(d, guest, keys[:2], max_bytes=2500)
    await _session(d, guest, keys[2:], max_bytes=2500)
    kept = sorted(p.read_bytes()[:1] for p in d.iterdir() if p.name.startswith("c"))
    assert kept == [b"C", b"D"]  # the least recently used went first
    guest.fetches.clear()
    await _session(d, guest, keys[3:], max_bytes=2500)
    assert guest.fetches == []


async def test_without_instance_uuid_nothing_is_reused(tmp_path: Path) -> None:
    files = {"/a": b"A" * 100}
    guest = _Guest(files)
    d = tmp_path / "cache"
    keys = [_key("/a", files["/a"])]
    await _session(d, guest, keys, persist_as=None)
    await _session(d, guest, keys, persist_as=None)
    assert guest.fetches == ["/a", "/a"]


async def test_kept_copy_closed_before_its_check_ends_stays_kept(tmp_path: Path) -> None:
    files = {"/a": b"A" * 5000}
    guest = _Guest(files)
    d = tmp_path / "cache"
    keys = [_key("/a", files["/a"])]
    await _session(d, guest, keys)
    async with trio.open_nursery() as nursery:
        cache = ContentCache(str(d), 1 << 30, guest.fetch, nursery=nursery, keep=True,
                             persist_as=VM)  # fmt: skip
        cache.linger_max_bytes = 0  # closed unread: cancelled at once
        cache.release(await cache.open(keys[0]))
        await cache.aclose()
    _, events, stats = await _session(d, guest, keys)
    assert guest.fetches == ["/a"] and stats["reused"] == 1

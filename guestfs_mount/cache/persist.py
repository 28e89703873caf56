"""The persistent index of a kept cache directory (``--cache-dir DIR --keep-cache``).

The on-disk half; content.py decides when to look up, verify, record and drop.

One small JSON file per complete download, ``DIR/index/<sha256 of the key>.json``, written
with write-to-temp + fsync + rename + fsync of the directory: a SIGKILL at any point leaves
either the old state or the new one, never a half-written record, and there is no shared
database to corrupt (sqlite3 would also work, but one file per entry needs no recovery
code and no schema). The key is (vCenter, VM instance UUID, guest path, size, mtime_ns):
a VM's name and moid can both be reused by another VM. A record is served only after the
cache file's SHA-256 is recomputed and equals the recorded one; otherwise it is dropped.
``DIR/lock`` is held with ``fcntl.flock`` for the life of a mount that keeps its cache: a
second one on the same directory is refused with a clear message. A mount that does not keep
its cache may share the directory: the orphan sweep spares files of live processes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, replace

from ..errors import CacheError

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Record:
    vcenter: str
    instance_uuid: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    file: str  # cache file name inside DIR (never derived from guest data)
    transfer_time: float  # epoch seconds at which the original download completed
    last_used: float
    md5: str = ""  # beside the SHA-256 (hashdeep manifests); "" in records without it

    @property
    def id(self) -> str:
        return key_id(self.vcenter, self.instance_uuid, self.path, self.size, self.mtime_ns)


#: The names content.py gives cache files (``c<pid>-<n>``): the only files a sweep removes.
CACHE_FILE = re.compile(r"c([0-9]+)-[0-9]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def key_id(vcenter: str, instance_uuid: str, path: str, size: int, mtime_ns: int) -> str:
    raw = json.dumps([vcenter, instance_uuid, path, size, mtime_ns], ensure_ascii=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def lock(dir_fd: int) -> int:
    """Take ``DIR/lock`` exclusively and return its fd, held until closed; CacheError EBUSY
    if another mount keeping its cache in this directory holds it."""
    fd = os.open("lock", os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise CacheError(
            "cache directory is in use by another mount that keeps its cache (DIR/lock is"
            " held): give each concurrent mount its own --cache-dir",
            errno.EBUSY,
        ) from exc
    return fd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_hashes(fd: int, rec: Record) -> str | None:
    """Blocking (a worker thread): the MD5 of the cache file open as ``fd`` if its length and
    SHA-256 are the recorded ones, else None (corrupt or truncated: never to be served)."""
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    n = 0
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        sha.update(chunk)
        md5.update(chunk)
        n += len(chunk)
        offset += len(chunk)
        if n > rec.size:
            return None
    if n != rec.size or sha.hexdigest() != rec.sha256:
        return None
    return md5.hexdigest()


class PersistentIndex:
    """The index of one cache directory; ``dir_fd`` is the already checked directory."""

    def __init__(self, dir_fd: int) -> None:
        self._dir_fd = dir_fd
        self._lock_fd = lock(dir_fd)
        try:
            try:
                os.mkdir("index", 0o700, dir_fd=dir_fd)
            except FileExistsError:
                pass
            self._index_fd = os.open(
                "index", os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd
            )
        except BaseException:
            os.close(self._lock_fd)
            raise

    def close(self) -> None:
        os.close(self._lock_fd)
        os.close(self._index_fd)

    def scan(self) -> list[Record]:
        """Blocking, at start: every valid record whose file exists. Drops unreadable
        records, records of missing files and half-written temporary files, and removes
        cache files no record names (left by a SIGKILL before their record was written)."""
        records: list[Record] = []
        named: set[str] = set()
        for name in os.listdir(self._index_fd):
            if name.endswith(".tmp"):
                self._unlink(self._index_fd, name)
                continue
            if not name.endswith(".json"):
                continue
            rec = self._read(name)
            if rec is None or rec.id + ".json" != name:
                self._unlink(self._index_fd, name)
                continue
            try:
                st = os.stat(rec.file, dir_fd=self._dir_fd, follow_symlinks=False)
            except OSError:
                st = None
            if st is None or st.st_size != rec.size or not CACHE_FILE.fullmatch(rec.file):
                self._drop(name, rec.file if st is not None else None)
                continue
            records.append(rec)
            named.add(rec.file)
        for name in os.listdir(self._dir_fd):
            m = CACHE_FILE.fullmatch(name)
            # A mount that does not keep its cache may share the directory: the files of a
            # live process (pid in the name) are its downloads, not orphans.
            if m and name not in named and not _alive(int(m.group(1))):
                self._unlink(self._dir_fd, name)
        return records

    def commit(self, fd: int, rec: Record) -> None:
        """Blocking: make the cache file open as ``fd`` durable, then record it (a crash
        in between leaves an orphan file, swept at the next start, never a bad record)."""
        os.fsync(fd)
        os.fsync(self._dir_fd)  # the file's name
        self.record(rec)

    def touch(self, rec: Record) -> Record:
        """Blocking: ``rec`` used now (the LRU order across mounts)."""
        new = replace(rec, last_used=time.time())
        self.record(new)
        return new

    def drop(self, rec: Record) -> None:
        """Forget ``rec`` and remove its cache file."""
        self._drop_record(rec)

    def record(self, rec: Record) -> None:
        """Write ``rec`` atomically (call after the cache file itself was fsync'ed)."""
        name = rec.id
        tmp = f".{name}.{os.getpid()}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW | _O_CLOEXEC, 0o600,
            dir_fd=self._index_fd,
        )  # fmt: skip
        try:
            os.write(fd, json.dumps(asdict(rec)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name + ".json", src_dir_fd=self._index_fd, dst_dir_fd=self._index_fd)
        os.fsync(self._index_fd)

    def _read(self, name: str) -> Record | None:
        """The record in ``index/name``; None if absent; dropped if it does not parse."""
        try:
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._index_fd)
        except FileNotFoundError:
            return None
        try:
            raw = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        try:
            rec = Record(**json.loads(raw))
            ok = (
                isinstance(rec.file, str) and CACHE_FILE.fullmatch(rec.file) is not None
                and isinstance(rec.sha256, str) and _HEX64.fullmatch(rec.sha256) is not None
                and all(isinstance(v, str) for v in (rec.vcenter, rec.instance_uuid, rec.path))
                and type(rec.size) is int and rec.size >= 0 and type(rec.mtime_ns) is int
                and all(isinstance(v, (int, float)) for v in (rec.transfer_time, rec.last_used))
            )  # fmt: skip
        except (ValueError, TypeError):
            ok = False
        if not ok:
            self._unlink(self._index_fd, name)
            return None
        return rec

    def _drop_record(self, rec: Record) -> None:
        self._drop(rec.id + ".json", rec.file)

    def _drop(self, index_name: str, file: str | None) -> None:
        self._unlink(self._index_fd, index_name)
        if file is not None:
            self._unlink(self._dir_fd, file)

    @staticmethod
    def _unlink(dir_fd: int, name: str) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass

"""The persistent index of a kept cache directory (``--cache-dir DIR --keep-cache``).

NOT YET WIRED INTO content.py (see the P5 report): this module is the on-disk half only.

One small JSON file per complete download, ``DIR/index/<sha256 of the key>.json``, written
with write-to-temp + fsync + rename + fsync of the directory: a SIGKILL at any point leaves
either the old state or the new one, never a half-written record, and there is no shared
database to corrupt (sqlite3 would also work, but one file per entry needs no recovery
code and no schema). The key is (vCenter, VM instance UUID, guest path, size, mtime_ns):
a VM's name and moid can both be reused by another VM. A record is served only after the
cache file's SHA-256 is recomputed and equals the recorded one; otherwise it is dropped.
``DIR/lock`` is held with ``fcntl.flock`` for the life of a mount: a second mount on the
same directory is refused with a clear message.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass

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


def key_id(vcenter: str, instance_uuid: str, path: str, size: int, mtime_ns: int) -> str:
    raw = json.dumps([vcenter, instance_uuid, path, size, mtime_ns], ensure_ascii=True)
    return hashlib.sha256(raw.encode()).hexdigest()


class PersistentIndex:
    """The index of one cache directory; ``dir_fd`` is the already checked directory."""

    def __init__(self, dir_fd: int) -> None:
        self._dir_fd = dir_fd
        try:
            os.mkdir("index", 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
        self._index_fd = os.open(
            "index", os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd
        )
        self._lock_fd = os.open(
            "lock", os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            os.close(self._index_fd)
            raise CacheError(
                "cache directory is in use by another mount (DIR/lock is held)", errno.EBUSY
            ) from exc

    def close(self) -> None:
        os.close(self._lock_fd)
        os.close(self._index_fd)

    def record(self, rec: Record) -> None:
        """Write ``rec`` atomically (call after the cache file itself was fsync'ed)."""
        name = key_id(rec.vcenter, rec.instance_uuid, rec.path, rec.size, rec.mtime_ns)
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

    def lookup(
        self, vcenter: str, instance_uuid: str, path: str, size: int, mtime_ns: int
    ) -> Record | None:
        name = key_id(vcenter, instance_uuid, path, size, mtime_ns) + ".json"
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
        except (ValueError, TypeError):
            self._drop(name, None)
            return None
        if (rec.vcenter, rec.instance_uuid, rec.path, rec.size, rec.mtime_ns) != (
            vcenter, instance_uuid, path, size, mtime_ns,
        ):  # fmt: skip
            return None
        return rec

    def verify(self, rec: Record) -> bool:
        """Blocking (run in a worker thread): the cache file still hashes to ``rec.sha256``.
        A corrupt or truncated entry is dropped (record and file)."""
        h = hashlib.sha256()
        n = 0
        try:
            fd = os.open(rec.file, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._dir_fd)
        except OSError:
            self._drop_record(rec)
            return False
        try:
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
                n += len(chunk)
        finally:
            os.close(fd)
        if n != rec.size or h.hexdigest() != rec.sha256:
            self._drop_record(rec)
            return False
        return True

    def _drop_record(self, rec: Record) -> None:
        name = key_id(rec.vcenter, rec.instance_uuid, rec.path, rec.size, rec.mtime_ns)
        self._drop(name + ".json", rec.file)

    def _drop(self, index_name: str, file: str | None) -> None:
        for fd, n in ((self._index_fd, index_name), (self._dir_fd, file)):
            if n is None:
                continue
            try:
                os.unlink(n, dir_fd=fd)
            except FileNotFoundError:
                pass

"""Private temporary cache directories that do not outlive a dead daemon.

A daemon killed by SIGKILL or the OOM killer cannot remove its cache, and the cache holds
copies of guest files (``/etc/shadow`` as well). So each temporary cache directory is
named for its owner, ``guestfs-mount-cache-UID-PID-XXXXXXXX`` in the temporary directory
(``$TMPDIR``), and the daemon holds an ``flock`` on the directory itself for its life: the
kernel drops it when the process dies, however it dies. Whenever a new one is made, the
directories of ours whose lock is free (their daemon is dead) are removed first. Another
user's directory (by name or by owner) and a symlink are never touched, nor followed;
neither are directories of the old ``guestfs-mount-XXXXXXXX`` form, whose owner cannot be
told.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import tempfile

log = logging.getLogger(__name__)

PREFIX = "guestfs-mount-cache-"
_NAME = re.compile(r"guestfs-mount-cache-(\d+)-(\d+)-[a-z0-9_]+\Z")
_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Our live directories and the descriptors holding their locks (never closed while the
# directory exists: closing would drop the lock).
_held: dict[str, int] = {}


def private_cache_dir() -> str:
    """A new private (0700) directory for this process's cache, locked for its life;
    stale ones of our dead daemons are removed first. OSError if it cannot be made."""
    _release_removed()
    remove_stale()
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.geteuid()}-{os.getpid()}-")
    fd = os.open(path, _OPEN)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else can hold it
    _held[path] = fd
    return path


def remove_stale(parent: str | None = None) -> list[str]:
    """Remove our temporary cache directories in ``parent`` ($TMPDIR) whose daemon is dead
    (their lock is free); the paths removed. Never raises: a cleanup problem is logged."""
    parent = parent or tempfile.gettempdir()
    uid = os.geteuid()
    try:
        names = os.listdir(parent)
    except OSError as exc:
        log.warning("cannot look for stale cache directories in %s: %s", parent, exc.strerror)
        return []
    removed = []
    for name in sorted(names):
        m = _NAME.match(name)
        path = os.path.join(parent, name)
        if m is None or int(m.group(1)) != uid or path in _held:
            continue
        try:
            if _remove_if_stale(path, uid):
                removed.append(path)
                log.info("removed cache directory %s of dead daemon pid %s", path, m.group(2))
        except OSError as exc:
            log.warning("stale cache directory %s not removed: %s", path, exc.strerror)
    return removed


def _remove_if_stale(path: str, uid: int) -> bool:
    try:
        fd = os.open(path, _OPEN)  # O_NOFOLLOW: a symlink is ELOOP, left alone
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return False
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its daemon is alive
        for entry in os.scandir(fd):
            # Flat by construction: files are unlinked (a symlink as itself), anything
            # else is left, and then so is the directory.
            if not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=fd)
        now = os.lstat(path)
        if not stat.S_ISDIR(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # the name no longer names what was emptied
        os.rmdir(path)
        return True
    finally:
        os.close(fd)


def _release_removed() -> None:
    """Drop the locks of our directories already removed (the cache's close removes its
    own): a process that makes many caches keeps one descriptor per live one."""
    for path, fd in list(_held.items()):
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            del _held[path]

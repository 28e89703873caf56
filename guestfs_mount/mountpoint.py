"""The mount point: an existing, empty directory that is not already mounted.

A stale mount left by a killed daemon (its statvfs fails with ENOTCONN) is cleaned up
first, with a lazy ``fusermount3 -u -z``.

The checks run seconds before mount(2) (the daemon logs in to the vCenter in between),
and mount(2) follows symlinks: another user who can write the parent could replace the
directory by a symlink meanwhile and have the guest mounted elsewhere. So the directory
checked is pinned (an ``O_PATH|O_NOFOLLOW`` descriptor): :func:`mount_target` re-checks
that the path still names it just before mounting and, as root, has the kernel mount on
the pinned directory itself (``/proc/self/fd/N``); :func:`check_mounted` then proves the
directory mounted is still at the path logged and shown by ``status``. A symlink, or a
parent another user may write (owned by someone else, or group/other-writable without the
sticky bit protecting a directory of ours), is refused unless ``allow_unsafe``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger("guestfs_mount")

_ALLOW = "--allow-unsafe-mountpoint"


@dataclass(frozen=True)
class MountPoint:
    path: str  # real path, as checked
    fd: int  # O_PATH pin of the directory checked; kept open for the daemon's life


def _is_stale(path: str) -> bool:
    # statvfs always reaches the filesystem; a stat may be answered from the
    # kernel's attribute cache even when the daemon behind it is dead.
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def detach_if_dead(path: str) -> None:
    """After serving: detach a mount left dead at ``path``. An abort of the connection
    (fusectl) leaves the mount in place and libfuse, finding the device errored, skips the
    unmount; every later access would fail with ENOTCONN until someone cleans it."""
    if _is_stale(path):
        tool = shutil.which("fusermount3") or "fusermount3"
        subprocess.run([tool, "-u", "-z", path], capture_output=True, check=False)


def _clean_stale(path: str) -> None:
    log.warning("%s is a stale mount (its daemon died): unmounting it", path)
    tool = shutil.which("fusermount3") or "fusermount3"
    res = subprocess.run([tool, "-u", "-z", path], capture_output=True, text=True)
    if res.returncode != 0 or _is_stale(path):
        raise ConfigError(
            f"mount point {path} is a stale mount and could not be cleaned: "
            f"run 'fusermount3 -u -z {path}' ({res.stderr.strip()})"
        )


def _ours(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def parent_problem(parent: os.stat_result, mnt: os.stat_result) -> str | None:
    """Why another user could replace a directory ``mnt`` in ``parent`` (None: nobody can)."""
    if not _ours(parent.st_uid):
        return f"is owned by uid {parent.st_uid}"
    if parent.st_mode & 0o022:
        # The sticky bit (/tmp) forbids renaming or removing another user's entry.
        if parent.st_mode & stat.S_ISVTX and _ours(mnt.st_uid):
            return None
        who = "others" if parent.st_mode & 0o002 else "its group"
        return f"is writable by {who}"
    return None


def check_mountpoint(path: str, allow_unsafe: bool = False) -> MountPoint:
    """The mount point, pinned, or ConfigError saying what is wrong with it.
    A stale mount left by a killed daemon is cleaned up (lazily unmounted)."""
    if _is_stale(path):
        _clean_stale(path)
    if not os.path.lexists(path):
        raise ConfigError(f"mount point {path} does not exist")
    absolute = os.path.abspath(path)
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    if os.path.islink(real):
        if not allow_unsafe:
            raise ConfigError(
                f"mount point {path} is a symlink (to {os.path.realpath(real)}): "
                f"give the directory itself, or {_ALLOW}"
            )
        real = os.path.realpath(real)
        log.warning("%s: mount point %s is a symlink: mounting on %s", _ALLOW, path, real)
    try:
        fd = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise ConfigError(f"mount point {path} is not a directory") from exc
        raise ConfigError(f"mount point {path}: {exc.strerror}") from exc
    try:
        _check_pinned(path, real, fd, allow_unsafe)
    except BaseException:
        os.close(fd)
        raise
    return MountPoint(real, fd)


def _check_pinned(path: str, real: str, fd: int, allow_unsafe: bool) -> None:
    if os.path.ismount(real):
        raise ConfigError(f"mount point {path} is already a mount point")
    try:
        if os.listdir(f"/proc/self/fd/{fd}"):  # the directory pinned, not a new one
            raise ConfigError(f"mount point {path} is not empty")
    except PermissionError as exc:
        raise ConfigError(f"mount point {path}: {exc.strerror}") from exc
    parent = os.path.dirname(real)
    problem = parent_problem(os.stat(parent), os.fstat(fd))
    if problem is None:
        return
    if not allow_unsafe:
        raise ConfigError(
            f"mount point {path}: its parent {parent} {problem}, so another user could "
            f"replace it before it is mounted; use a directory whose parent only you "
            f"(or root) can change, or {_ALLOW}"
        )
    log.warning("%s: the parent %s of mount point %s %s", _ALLOW, parent, real, problem)


def _same_directory(path: str, fd: int) -> str | None:
    """Why ``path`` no longer names the directory pinned by ``fd`` (None: it does)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror
    pinned = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode):
        return "it is now a symlink"
    if (st.st_dev, st.st_ino) != (pinned.st_dev, pinned.st_ino):
        return "it is now another file"
    where = os.readlink(f"/proc/self/fd/{fd}")
    if where != path:
        return f"the directory checked is now {where}"
    return None


def mount_target(mp: MountPoint) -> str:
    """What to hand to mount(2), just before mounting: ConfigError if the path was changed
    since it was checked. Root mounts on the pinned directory itself; a user's mount goes
    through fusermount3, which takes a path (and refuses a symlink itself)."""
    why = _same_directory(mp.path, mp.fd)
    if why is not None:
        raise ConfigError(f"mount point {mp.path} was replaced since it was checked: {why}")
    return f"/proc/self/fd/{mp.fd}" if os.geteuid() == 0 else mp.path


def check_mounted(mp: MountPoint) -> None:
    """Right after mount(2): ConfigError if the directory mounted is not at ``mp.path``
    (moved in the instant before the mount; once mounted it cannot be renamed)."""
    where = os.readlink(f"/proc/self/fd/{mp.fd}")
    if where != mp.path:
        raise ConfigError(f"mount point {mp.path} was moved to {where} while mounting")

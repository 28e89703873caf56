"""The mount point: an existing, empty directory that is not already mounted.

A stale mount left by a killed daemon (its statvfs fails with ENOTCONN) is cleaned up
first, with a lazy ``fusermount3 -u -z``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess

from .errors import ConfigError

log = logging.getLogger("guestfs_mount")


def _is_stale(path: str) -> bool:
    # statvfs always reaches the filesystem; a stat may be answered from the
    # kernel's attribute cache even when the daemon behind it is dead.
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def check_mountpoint(path: str) -> str:
    """The mount point as a real path, or ConfigError saying what is wrong with it.
    A stale mount left by a killed daemon is cleaned up (lazily unmounted)."""
    if _is_stale(path):
        log.warning("%s is a stale mount (its daemon died): unmounting it", path)
        tool = shutil.which("fusermount3") or "fusermount3"
        res = subprocess.run([tool, "-u", "-z", path], capture_output=True, text=True)
        if res.returncode != 0 or _is_stale(path):
            raise ConfigError(
                f"mount point {path} is a stale mount and could not be cleaned: "
                f"run 'fusermount3 -u -z {path}' ({res.stderr.strip()})"
            )
    if not os.path.lexists(path):
        raise ConfigError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise ConfigError(f"mount point {path} is already a mount point")
    try:
        if os.listdir(path):
            raise ConfigError(f"mount point {path} is not empty")
    except PermissionError as exc:
        raise ConfigError(f"mount point {path}: {exc.strerror}") from exc
    return os.path.realpath(path)

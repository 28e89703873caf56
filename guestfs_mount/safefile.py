"""Opening a log or audit file that another local user may have prepared for us.

The daemon often runs as root and appends to a path the user named. A symlink planted
there, or a file owned by someone else, would make it append to a file it was never
meant to touch (``/etc/passwd`` through a link in ``/tmp``). :func:`open_append` opens
without following a final symlink, creates the file private (0600), and refuses a file
that belongs to another user or that anyone may write.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import ConfigError


def open_append(path: str, what: str) -> int:
    """A write-only, append-only, close-on-exec descriptor for ``path`` (``what``: the
    option, for the message). Created with mode 0600 if missing. ConfigError with one
    line saying why otherwise: a symlink, not a regular file, owned by another user,
    writable by group or others, or the OS's own reason (no such directory, EACCES)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
    # O_NONBLOCK: a FIFO planted at the path must not block the start-up forever.
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path} is a symbolic link: refused") from exc
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        problem = _problem(st)
        if problem:
            raise ConfigError(f"{what} {path} {problem}: refused")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _problem(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if st.st_nlink > 1:
        # A hard link to another file of ours that a user could not write otherwise.
        return f"has {st.st_nlink} hard links"
    return None

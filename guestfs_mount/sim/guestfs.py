"""The guest's view of a host directory: path resolution, stat, listing. Pure, synchronous.

A VM's root directory stands for the guest's ``/``. Guest paths are resolved the way
the guest kernel would resolve them inside a chroot, but by hand, one component at a
time, without ever letting the host follow a symlink:

* ``..`` is clamped at the root (``/..`` is ``/``);
* a symlink met in the *middle* of a path is expanded within the root: an absolute
  target restarts from the root, a relative one from the link's directory; more than
  ``MAXSYMLINKS`` expansions is ``ELOOP``;
* the *last* component is never followed (``lstat`` semantics): a symlink is reported as
  a SYMLINK with its raw target text.

The resolved host path therefore contains no symlink in its directories, and
:func:`open_regular` opens the final component with ``O_NOFOLLOW`` and checks the
opened file is under the root, so nothing outside the root is ever served even if the
tree changes between resolution and use.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone

from .vapi import FILE_NOT_FOUND, NOT_A_DIRECTORY, PATH_TOO_LONG, VapiError, file_error

MAXSYMLINKS = 40
PATH_MAX = 4096
NAME_MAX = 255


@dataclass(frozen=True, slots=True)
class Resolved:
    """A guest path resolved inside a root."""

    guest_path: str  # canonical guest path ("/a/b"), symlinks in the middle expanded
    host_path: bytes  # absolute host path
    st: os.stat_result  # lstat of host_path


def _split(path: bytes) -> list[bytes]:
    return [c for c in path.split(b"/") if c and c != b"."]


def os_error(exc: OSError, guest_path: str) -> VapiError:
    """Map an OS error met while serving ``guest_path`` to what vCenter answers."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return file_error("NOT_FOUND", FILE_NOT_FOUND, guest_path, f"File {guest_path} not found.")
    if code in (errno.EACCES, errno.EPERM):
        return VapiError(
            "UNAUTHORIZED",
            f"Access to {guest_path} is denied in the guest.",
            msg_id="com.vmware.api.vcenter.vm.guest.filesystem.access_denied",
            args=[guest_path],
        )
    if code == errno.ELOOP:
        return VapiError(
            "INVALID_ARGUMENT",
            f"Too many levels of symbolic links in {guest_path}.",
            msg_id="com.vmware.api.vcenter.vm.guest.filesystem.symlink_loop",
            args=[guest_path],
        )
    if code == errno.ENAMETOOLONG:
        return file_error(
            "INVALID_ARGUMENT", PATH_TOO_LONG, guest_path, f"Path {guest_path} is too long."
        )
    return VapiError(
        "ERROR",
        f"Guest operation on {guest_path} failed: {os.strerror(code or errno.EIO)}.",
        args=[guest_path],
    )


def resolve(root: bytes, guest_path: str, follow: bool = False) -> Resolved:
    """Resolve ``guest_path`` under ``root`` (an absolute, symlink-free host path).

    With ``follow`` a final symlink is expanded too (``stat`` rather than ``lstat``;
    used for listing, as the guest's opendir() follows it).

    Raises VapiError (INVALID_ARGUMENT for a relative or over-long path or a symlink
    loop, NOT_FOUND for a missing component).
    """
    if not guest_path.startswith("/"):
        raise VapiError(
            "INVALID_ARGUMENT",
            f"The path {guest_path!r} is not an absolute guest path.",
            msg_id="com.vmware.api.vcenter.vm.guest.filesystem.invalid_path",
            args=[guest_path],
        )
    raw = os.fsencode(guest_path)
    if b"\0" in raw:
        raise VapiError("INVALID_ARGUMENT", "The path contains a NUL byte.", args=[guest_path])
    if len(raw) >= PATH_MAX:
        raise file_error("INVALID_ARGUMENT", PATH_TOO_LONG, guest_path, "Path is too long.")
    pending = _split(raw)
    pending.reverse()  # a stack: next component at the end
    done: list[bytes] = []
    links = 0
    st = os.lstat(root)
    while pending:
        comp = pending.pop()
        if comp == b"..":
            if done:
                done.pop()
            st = os.lstat(_join(root, done))
            continue
        if len(comp) > NAME_MAX:
            raise file_error("INVALID_ARGUMENT", PATH_TOO_LONG, guest_path, "Name too long.")
        if not stat.S_ISDIR(st.st_mode):
            raise os_error(OSError(errno.ENOTDIR, "not a directory"), guest_path)
        host = _join(root, [*done, comp])
        try:
            st = os.lstat(host)
        except OSError as exc:
            raise os_error(exc, guest_path) from exc
        if stat.S_ISLNK(st.st_mode) and (pending or follow):
            links += 1
            if links > MAXSYMLINKS:
                raise os_error(OSError(errno.ELOOP, "loop"), guest_path)
            target = os.readlink(host)
            if target.startswith(b"/"):
                done = []
            expansion = _split(target)
            expansion.reverse()
            pending.extend(expansion)
            st = os.lstat(_join(root, done))
            continue
        done.append(comp)
    canonical = "/" + "/".join(os.fsdecode(c) for c in done)
    return Resolved(canonical, _join(root, done), st)


def _join(root: bytes, comps: list[bytes]) -> bytes:
    return os.path.join(root, *comps) if comps else root


def within(subtree: str, guest_path: str) -> bool:
    """Whether ``guest_path`` (canonical) is ``subtree`` or below it."""
    sub = subtree.rstrip("/")
    return sub == "" or guest_path == sub or guest_path.startswith(sub + "/")


def file_type(st: os.stat_result) -> str:
    """FILE | DIRECTORY | SYMLINK; sockets, devices and fifos are FILE (as Tools reports)."""
    if stat.S_ISDIR(st.st_mode):
        return "DIRECTORY"
    if stat.S_ISLNK(st.st_mode):
        return "SYMLINK"
    return "FILE"


def iso_time(ns: int) -> str:
    """``2024-01-02T03:04:05.123Z`` (UTC, millisecond precision)."""
    secs, rem = divmod(ns, 1_000_000_000)
    dt = datetime.fromtimestamp(secs, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{rem // 1_000_000:03d}Z"


def info(res: Resolved) -> dict[str, object]:
    """The ``Files.Info`` body for a resolved path."""
    st = res.st
    attrs: dict[str, object] = {
        "last_modified": iso_time(st.st_mtime_ns),
        "last_accessed": iso_time(st.st_atime_ns),
        "filesystem_family": "POSIX",
        "posix_attributes": {
            "owner": st.st_uid,
            "group": st.st_gid,
            "permissions": format(stat.S_IMODE(st.st_mode), "o"),
        },
    }
    if stat.S_ISLNK(st.st_mode):
        attrs["symlink_target"] = os.fsdecode(os.readlink(res.host_path))
    return {"type": file_type(st), "size": st.st_size, "attributes": attrs}


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None or pattern in ("", ".*"):
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise VapiError(
            "INVALID_ARGUMENT",
            f"Invalid match pattern {pattern!r}: {exc}.",
            msg_id="com.vmware.api.vcenter.vm.guest.filesystem.invalid_pattern",
            args=[pattern],
        ) from exc


def list_entries(res: Resolved, pattern: re.Pattern[str] | None) -> list[tuple[str, str, int]]:
    """(name, type, size) of a directory's entries, sorted by name bytes; or the one
    entry of a non-directory. Never ``.`` nor ``..``."""
    if not stat.S_ISDIR(res.st.st_mode):
        name = res.guest_path.rsplit("/", 1)[-1] or "/"
        items = [(name, file_type(res.st), res.st.st_size)]
    else:
        items = []
        try:
            with os.scandir(res.host_path) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # vanished while listing
                    items.append((os.fsdecode(entry.name), file_type(st), st.st_size))
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                raise file_error(
                    "INVALID_ARGUMENT", NOT_A_DIRECTORY, res.guest_path, "Not a directory."
                ) from exc
            raise os_error(exc, res.guest_path) from exc
        items.sort(key=lambda t: os.fsencode(t[0]))
    if pattern is not None:
        items = [t for t in items if pattern.search(t[0])]
    return items


def open_regular(root: bytes, res: Resolved) -> int:
    """Open the resolved regular file read-only without following a final symlink and
    check that what was opened is still under ``root``. Returns an fd."""
    try:
        fd = os.open(res.host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(exc, res.guest_path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise os_error(OSError(errno.EISDIR, "not a file"), res.guest_path)
        real = (
            os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
            if os.path.exists("/proc/self/fd")
            else os.path.realpath(res.host_path)
        )
        if not (real == root or real.startswith(root.rstrip(b"/") + b"/")):
            raise os_error(OSError(errno.EACCES, "outside root"), res.guest_path)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise

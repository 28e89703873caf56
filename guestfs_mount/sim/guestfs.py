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

from .entry import FILE, GuestEntry
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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", 0)


def resolve(root: bytes, guest_path: str, follow: bool = False) -> Resolved:
    """Resolve ``guest_path`` under ``root`` (an absolute, symlink-free host path).

    With ``follow`` a final symlink is expanded too (``stat`` rather than ``lstat``;
    used for listing, as the guest's opendir() follows it).

    The walk holds a descriptor of the current directory and looks each component up
    relative to it, so a path of depth d costs O(d) work (joining and re-walking the
    whole prefix per component made ``ls -la`` at depth 1000 take minutes). ``..``
    reopens the parent through the descriptor and checks it is the directory it came
    from (a concurrent rename cannot lead the walk out of the root).

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
    walk = DirWalk(root)
    try:
        links = 0
        while pending:
            comp = pending.pop()
            if not stat.S_ISDIR(walk.st.st_mode):
                raise os_error(OSError(errno.ENOTDIR, "not a directory"), guest_path)
            if comp == b"..":
                walk.up(guest_path)
                continue
            if len(comp) > NAME_MAX:
                raise file_error("INVALID_ARGUMENT", PATH_TOO_LONG, guest_path, "Name too long.")
            try:
                st = os.lstat(comp, dir_fd=walk.fd)
            except OSError as exc:
                raise os_error(exc, guest_path) from exc
            if stat.S_ISLNK(st.st_mode) and (pending or follow):
                links += 1
                if links > MAXSYMLINKS:
                    raise os_error(OSError(errno.ELOOP, "loop"), guest_path)
                try:
                    target = os.readlink(comp, dir_fd=walk.fd)
                except OSError as exc:
                    raise os_error(exc, guest_path) from exc
                if target.startswith(b"/"):
                    walk.to_root()
                expansion = _split(target)
                expansion.reverse()
                pending.extend(expansion)
                continue
            walk.down(comp, st, guest_path)
        canonical = "/" + "/".join(os.fsdecode(c) for c in walk.done)
        return Resolved(canonical, _join(root, walk.done), walk.st)
    finally:
        walk.close()


class DirWalk:
    """Where a resolution stands: its host components, their stat and a descriptor.

    ``st`` is the lstat of the last component; ``fd`` is open on it when it is a
    directory (a non-directory ends the walk: any further component is ENOTDIR).
    ``flags`` open the directories (``O_PATH`` by default; readable ones for a walk
    that lists each directory)."""

    def __init__(self, root: bytes, flags: int = _DIR_FLAGS) -> None:
        self.root = root
        self.flags = flags
        self.done: list[bytes] = []
        self.fd = os.open(root, flags)
        self.st = os.fstat(self.fd)
        self.ids: list[tuple[int, int]] = [(self.st.st_dev, self.st.st_ino)]

    def close(self) -> None:
        os.close(self.fd)

    def _replace(self, fd: int) -> None:
        os.close(self.fd)
        self.fd = fd

    def to_root(self) -> None:
        self._replace(os.open(self.root, self.flags))
        self.st = os.fstat(self.fd)
        self.done = []
        self.ids = [(self.st.st_dev, self.st.st_ino)]

    def up(self, guest_path: str) -> None:
        if not self.done:
            return  # ".." is clamped at the root
        parent = os.open(b"..", self.flags, dir_fd=self.fd)
        st = os.fstat(parent)
        if (st.st_dev, st.st_ino) != self.ids[-2]:
            os.close(parent)
            raise os_error(OSError(errno.ENOENT, "moved while resolving"), guest_path)
        self._replace(parent)
        self.st = st
        self.done.pop()
        self.ids.pop()

    def down(self, comp: bytes, st: os.stat_result, guest_path: str) -> None:
        if stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(comp, self.flags, dir_fd=self.fd)
            except OSError as exc:
                raise os_error(exc, guest_path) from exc
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise os_error(OSError(errno.ENOENT, "replaced while resolving"), guest_path)
            self._replace(fd)
            self.ids.append((st.st_dev, st.st_ino))
        self.done.append(comp)
        self.st = st


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


def entry(
    root: bytes, name: str, guest_path: str, host_path: bytes, lst: os.stat_result
) -> GuestEntry:
    """What the guest reports for the file at ``guest_path`` whose lstat is ``lst``.

    Real Tools takes the attributes from ``stat``, which follows a symlink: a link keeps
    its type and target text but shows its target's owner, mode and times (the target
    is looked up inside the VM's root, as the guest kernel would). A link the guest
    cannot stat through (dangling, looping) keeps its own attributes: a choice, the
    sources do not say. Raises OSError when the entry itself is gone.
    """
    st = lst
    target = None
    if stat.S_ISLNK(lst.st_mode):
        target = os.fsdecode(os.readlink(host_path))
        try:
            st = resolve(root, guest_path, follow=True).st
        except (OSError, VapiError):
            st = lst
    ftype = file_type(lst)
    return GuestEntry(
        name=name,
        type=ftype,
        size=st.st_size if ftype == FILE else 0,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        ctime_ns=st.st_ctime_ns,
        symlink_target=target,
    )


def stat_entry(root: bytes, res: Resolved) -> GuestEntry:
    """The guest's report of one resolved path (its final symlink not followed)."""
    name = res.guest_path.rsplit("/", 1)[-1] or "/"
    return entry(root, name, res.guest_path, res.host_path, res.st)


def info(e: GuestEntry) -> dict[str, object]:
    """The ``Files.Info`` body of a guest entry."""
    attrs: dict[str, object] = {
        "last_modified": iso_time(e.mtime_ns),
        "last_accessed": iso_time(e.atime_ns),
        "filesystem_family": "POSIX",
        "posix_attributes": {
            "owner": e.uid,
            "group": e.gid,
            "permissions": format(e.permissions, "o"),
        },
    }
    if e.symlink_target is not None:
        attrs["symlink_target"] = e.symlink_target
    return {"type": e.type, "size": e.size, "attributes": attrs}


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


def scan(root: bytes, res: Resolved) -> list[GuestEntry]:
    """A directory's listing as the guest sends it: ``.`` and ``..`` first, then every
    entry sorted by name bytes (real Tools: directory order); an entry that vanishes or
    cannot be read while listing is left out. A non-directory lists its one entry."""
    if not stat.S_ISDIR(res.st.st_mode):
        return [stat_entry(root, res)]
    try:
        with os.scandir(res.host_path) as it:
            found = [(os.fsdecode(d.name), d.path) for d in it]
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise file_error(
                "INVALID_ARGUMENT", NOT_A_DIRECTORY, res.guest_path, "Not a directory."
            ) from exc
        raise os_error(exc, res.guest_path) from exc
    found.sort(key=lambda t: os.fsencode(t[0]))
    if res.guest_path == "/":
        parent_guest, parent_host, prefix = "/", res.host_path, "/"
    else:
        parent_guest = res.guest_path.rsplit("/", 1)[0] or "/"
        parent_host, prefix = os.path.dirname(res.host_path), res.guest_path + "/"
    out = [
        entry(root, ".", res.guest_path, res.host_path, res.st),
        entry(root, "..", parent_guest, parent_host, os.lstat(parent_host)),
    ]
    for name, host in found:
        try:
            out.append(entry(root, name, prefix + name, host, os.lstat(host)))
        except OSError:
            continue  # removed meanwhile, or not readable: the guest leaves it out
    return out


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

"""A Windows guest's view of host directories (one per drive letter). Pure, synchronous.

Guest paths are ``C:\\Users\\Admin\\file.txt``; ``/`` is accepted as a separator too.
Names are matched case-insensitively (per-character simple upper-casing, like NTFS's
upcase table) and reported with their stored case. On the host side:

* a host name that is not a valid Windows name (``\\ / : * ? " < > |`` or a control
  character) is invisible; of names equal up to case, the first in byte order is
  served and the others are invisible (each logged once);
* ``.`` and ``..`` in the guest path are removed lexically before any lookup, as Win32
  does (``C:\\x\\..\\y`` is ``C:\\y`` even if ``x`` does not exist), and ``..`` is
  clamped at the drive root (``C:\\..`` is ``C:\\``);
* host symlinks are *followed*, within the drive root, as if they were the files they
  point to (an absolute target restarts at the drive root, a relative one at the link's
  directory; more than ``MAXSYMLINKS`` expansions is ELOOP). A Windows Info has no
  ``symlink_target``, so the guest never sees a SYMLINK; a dangling or looping link is
  left out of listings and NOT_FOUND / INVALID_ARGUMENT when named.

The resolved host path therefore contains no symlink at all, and transfers open it
with :func:`guestfs.open_regular` (``O_NOFOLLOW`` + "still under the root" check).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat

from .entry import FILE, GuestEntry
from .guestfs import (
    MAXSYMLINKS,
    NAME_MAX,
    PATH_MAX,
    DirWalk,
    Resolved,
    compile_pattern,
    file_type,
    iso_time,
    os_error,
)
from .vapi import PATH_TOO_LONG, VapiError, file_error

__all__ = [
    "compile_pattern",
    "drive_of",
    "entry",
    "fold",
    "info",
    "resolve",
    "scan",
    "stat_entry",
    "within",
]

log = logging.getLogger("guestfs_mount.sim.winfs")

_DRIVE = re.compile(r"([A-Za-z]):(?=[\\/]|$)")
_SEP = re.compile(r"[\\/]")
_INVALID = re.compile(r'[\x00-\x1f\\/:*?"<>|]')
_warned: set[tuple[bytes, bytes]] = set()
_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def fold(name: str) -> str:
    """The case-insensitive key of a name: each character upper-cased on its own
    (``ß`` stays ``ß``, unlike ``str.upper``)."""
    upper = name.upper()
    if len(upper) == len(name):
        return upper  # upper() never shrinks: no character expanded
    return "".join(u if len(u := c.upper()) == 1 else c for c in name)


def _warn_once(directory: bytes, name: bytes, why: str) -> None:
    if (directory, name) not in _warned:
        _warned.add((directory, name))
        log.warning("windows VM: ignoring %r in %r: %s", name, directory, why)


def _names(directory: bytes, fd: int | None = None) -> dict[str, bytes]:
    """``fold(name) -> host name`` of the visible entries of a host directory (read
    through ``fd`` when given; ``directory`` names it in warnings)."""
    out: dict[str, bytes] = {}
    listed = os.listdir(directory) if fd is None else [os.fsencode(n) for n in os.listdir(fd)]
    for raw in sorted(listed):
        name = os.fsdecode(raw)
        if _INVALID.search(name):
            _warn_once(directory, raw, "not a valid Windows name")
            continue
        key = fold(name)
        if key in out:
            _warn_once(directory, raw, f"differs only by case from {out[key]!r}")
            continue
        out[key] = raw
    return out


def _invalid_path(guest_path: str, why: str) -> VapiError:
    return VapiError(
        "INVALID_ARGUMENT",
        f"The path {guest_path!r} {why}.",
        msg_id="com.vmware.api.vcenter.vm.guest.filesystem.invalid_path",
        args=[guest_path],
    )


def _join(root: bytes, comps: list[bytes]) -> bytes:
    return os.path.join(root, *comps) if comps else root


def resolve(drives: dict[str, bytes], guest_path: str) -> Resolved:
    """Resolve a Windows ``guest_path`` on ``drives`` (letter -> absolute host dir).

    Raises VapiError: INVALID_ARGUMENT for a UNC, relative, malformed or over-long path
    or a symlink loop; NOT_FOUND for an unknown drive or a missing component.
    OSErrors from the host (EACCES...) propagate.
    """
    if "\0" in guest_path:
        raise VapiError("INVALID_ARGUMENT", "The path contains a NUL byte.", args=[guest_path])
    if _SEP.match(guest_path[:1]) and _SEP.match(guest_path[1:2]):
        raise _invalid_path(guest_path, "is a UNC path; only local drives are served")
    m = _DRIVE.match(guest_path)
    if m is None:
        raise _invalid_path(guest_path, "is not an absolute guest path (expected C:\\...)")
    if len(os.fsencode(guest_path)) >= PATH_MAX:
        raise file_error("INVALID_ARGUMENT", PATH_TOO_LONG, guest_path, "Path is too long.")
    letter = m.group(1).upper()
    root = drives.get(letter)
    if root is None:
        raise os_error(OSError(errno.ENOENT, "no such drive"), guest_path)
    comps: list[str] = []  # normalized lexically first, as Win32 GetFullPathName does
    for comp in _SEP.split(guest_path[2:]):
        if comp in ("", "."):
            continue
        if comp == "..":
            if comps:
                comps.pop()
            continue
        if _INVALID.search(comp):
            raise _invalid_path(guest_path, "contains characters not allowed in a name")
        if len(os.fsencode(comp)) > NAME_MAX:
            raise file_error("INVALID_ARGUMENT", PATH_TOO_LONG, guest_path, "Name too long.")
        comps.append(comp)
    pending = comps[::-1]  # a stack: next component at the end ("..": only from symlinks)
    walk = DirWalk(root, _READ_DIR)  # readable: each directory is listed for its names
    try:
        links = 0
        while pending:
            comp = pending.pop()
            if comp == "..":
                walk.up(guest_path)
                continue
            if not stat.S_ISDIR(walk.st.st_mode):
                raise os_error(OSError(errno.ENOTDIR, "not a directory"), guest_path)
            name = _names(_join(root, walk.done), walk.fd).get(fold(comp))
            if name is None:
                raise os_error(OSError(errno.ENOENT, "not found"), guest_path)
            st = os.lstat(name, dir_fd=walk.fd)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAXSYMLINKS:
                    raise os_error(OSError(errno.ELOOP, "loop"), guest_path)
                target = os.readlink(name, dir_fd=walk.fd)
                if target.startswith(b"/"):
                    walk.to_root()
                pending.extend(
                    os.fsdecode(c) for c in reversed(target.split(b"/")) if c and c != b"."
                )
                continue
            walk.down(name, st, guest_path)
        canonical = f"{letter}:\\" + "\\".join(os.fsdecode(c) for c in walk.done)
        return Resolved(canonical, _join(root, walk.done), walk.st)
    finally:
        walk.close()


def drive_of(guest_path: str) -> str:
    """The drive letter of a canonical guest path (``C:\\x`` -> ``C``)."""
    return guest_path[:1].upper()


def within(subtree: str, guest_path: str) -> bool:
    """Whether canonical ``guest_path`` is in an account's ``subtree``: ``/`` allows
    everything, ``C:\\Users\\alice`` (case-insensitive) that directory, a POSIX subtree
    nothing."""
    if subtree == "/":
        return True
    if _DRIVE.match(subtree) is None:
        return False
    sub = fold(_SEP.sub(r"\\", subtree).rstrip("\\"))
    path = fold(guest_path)
    return path == sub or path.startswith(sub + "\\")


def _hidden(host_path: bytes, is_drive_root: bool) -> bool:
    if is_drive_root:
        return False
    if os.path.basename(host_path).startswith(b"."):
        return True
    try:
        value = os.getxattr(host_path, "user.hidden", follow_symlinks=False)
    except OSError:
        return False
    return value.strip() == b"1"


def entry(name: str, host_path: bytes, st: os.stat_result, is_drive_root: bool) -> GuestEntry:
    """What a Windows guest reports for a (symlink-free) host path with stat ``st``."""
    ftype = file_type(st)
    return GuestEntry(
        name=name,
        type=ftype,
        size=st.st_size if ftype == FILE else 0,
        mode=st.st_mode,
        uid=0,
        gid=0,
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        ctime_ns=getattr(st, "st_birthtime_ns", None) or st.st_ctime_ns,
        family="WINDOWS",
        hidden=_hidden(host_path, is_drive_root),
        read_only=not st.st_mode & stat.S_IWUSR,
    )


def stat_entry(res: Resolved) -> GuestEntry:
    name = res.guest_path.rstrip("\\").rsplit("\\", 1)[-1]
    return entry(name, res.host_path, res.st, res.guest_path.endswith(":\\"))


def info(e: GuestEntry) -> dict[str, object]:
    """The ``Files.Info`` body of a Windows guest entry."""
    attrs: dict[str, object] = {
        "last_modified": iso_time(e.mtime_ns),
        "last_accessed": iso_time(e.atime_ns),
        "filesystem_family": "WINDOWS",
        "win_attributes": {
            "hidden": e.hidden,
            "read_only": e.read_only,
            "created": iso_time(e.ctime_ns),
        },
    }
    return {"type": e.type, "size": e.size, "attributes": attrs}


def scan(drives: dict[str, bytes], res: Resolved) -> list[GuestEntry]:
    """A directory's visible entries as a Windows guest lists them: ``.`` and ``..``
    first, then NTFS order (by upper-cased name), symlinks followed; a dangling,
    looping or vanished entry is left out. A file lists its one entry."""
    if not stat.S_ISDIR(res.st.st_mode):
        return [stat_entry(res)]
    try:
        names = _names(res.host_path)
    except OSError as exc:
        raise os_error(exc, res.guest_path) from exc
    at_root = res.guest_path.endswith(":\\")
    prefix = res.guest_path.rstrip("\\") + "\\"
    parent_host = res.host_path if at_root else os.path.dirname(res.host_path)
    parent_root = at_root or res.guest_path.count("\\") == 1
    out = [
        entry(".", res.host_path, res.st, at_root),
        entry("..", parent_host, os.stat(parent_host), parent_root),
    ]
    items: list[GuestEntry] = []
    for raw in names.values():
        name = os.fsdecode(raw)
        host = os.path.join(res.host_path, raw)
        try:
            st = os.lstat(host)
            if stat.S_ISLNK(st.st_mode):
                target = resolve(drives, prefix + name)
                host, st = target.host_path, target.st
            items.append(entry(name, host, st, False))
        except (OSError, VapiError):
            continue  # vanished, dangling, looping
    items.sort(key=lambda e: (fold(e.name), e.name))
    return out + items

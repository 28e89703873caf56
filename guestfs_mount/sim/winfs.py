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

from .guestfs import (
    MAXSYMLINKS,
    NAME_MAX,
    PATH_MAX,
    Resolved,
    compile_pattern,
    file_type,
    iso_time,
    os_error,
)
from .vapi import PATH_TOO_LONG, VapiError, file_error

__all__ = ["compile_pattern", "drive_of", "fold", "info", "list_entries", "resolve", "within"]

log = logging.getLogger("guestfs_mount.sim.winfs")

_DRIVE = re.compile(r"([A-Za-z]):(?=[\\/]|$)")
_SEP = re.compile(r"[\\/]")
_INVALID = re.compile(r'[\x00-\x1f\\/:*?"<>|]')
_warned: set[tuple[bytes, bytes]] = set()


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


def _names(directory: bytes) -> dict[str, bytes]:
    """``fold(name) -> host name`` of the visible entries of a host directory."""
    out: dict[str, bytes] = {}
    for raw in sorted(os.listdir(directory)):
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
    done: list[bytes] = []
    links = 0
    st = os.lstat(root)
    while pending:
        comp = pending.pop()
        if comp == "..":
            if done:
                done.pop()
            st = os.lstat(_join(root, done))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise os_error(OSError(errno.ENOTDIR, "not a directory"), guest_path)
        directory = _join(root, done)
        name = _names(directory).get(fold(comp))
        if name is None:
            raise os_error(OSError(errno.ENOENT, "not found"), guest_path)
        host = os.path.join(directory, name)
        st = os.lstat(host)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAXSYMLINKS:
                raise os_error(OSError(errno.ELOOP, "loop"), guest_path)
            target = os.readlink(host)
            if target.startswith(b"/"):
                done = []
            pending.extend(os.fsdecode(c) for c in reversed(target.split(b"/")) if c and c != b".")
            st = os.lstat(_join(root, done))
            continue
        done.append(name)
    canonical = f"{letter}:\\" + "\\".join(os.fsdecode(c) for c in done)
    return Resolved(canonical, _join(root, done), st)


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


def _size(st: os.stat_result) -> int:
    return 0 if stat.S_ISDIR(st.st_mode) else st.st_size


def _hidden(res: Resolved) -> bool:
    if res.guest_path.endswith(":\\"):
        return False  # a drive root
    if os.path.basename(res.host_path).startswith(b"."):
        return True
    try:
        value = os.getxattr(res.host_path, "user.hidden", follow_symlinks=False)
    except OSError:
        return False
    return value.strip() == b"1"


def info(res: Resolved) -> dict[str, object]:
    """The ``Files.Info`` body of a resolved Windows path."""
    st = res.st
    created = getattr(st, "st_birthtime_ns", None) or st.st_ctime_ns
    attrs: dict[str, object] = {
        "last_modified": iso_time(st.st_mtime_ns),
        "last_accessed": iso_time(st.st_atime_ns),
        "filesystem_family": "WINDOWS",
        "win_attributes": {
            "hidden": _hidden(res),
            "read_only": not st.st_mode & stat.S_IWUSR,
            "created": iso_time(created),
        },
    }
    return {"type": file_type(st), "size": _size(st), "attributes": attrs}


def list_entries(
    drives: dict[str, bytes], res: Resolved, pattern: re.Pattern[str] | None
) -> list[tuple[str, str, int]]:
    """(name, type, size) of a directory's visible entries in NTFS order (by upper-cased
    name), symlinks followed; or the one entry of a file."""
    if not stat.S_ISDIR(res.st.st_mode):
        name = res.guest_path.rsplit("\\", 1)[-1]
        items = [(name, file_type(res.st), _size(res.st))]
    else:
        items = []
        try:
            names = _names(res.host_path)
        except OSError as exc:
            raise os_error(exc, res.guest_path) from exc
        prefix = res.guest_path.rstrip("\\") + "\\"
        for raw in names.values():
            name = os.fsdecode(raw)
            try:
                st = os.lstat(os.path.join(res.host_path, raw))
                if stat.S_ISLNK(st.st_mode):
                    st = resolve(drives, prefix + name).st
            except (OSError, VapiError):
                continue  # vanished, dangling, looping
            items.append((name, file_type(st), _size(st)))
        items.sort(key=lambda t: (fold(t[0]), t[0]))
    if pattern is not None:
        items = [t for t in items if pattern.search(t[0])]
    return items

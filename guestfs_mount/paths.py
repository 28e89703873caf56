"""Guest path arithmetic: joining, normalising, and making symlink targets safe.

Functions on ``str`` guest paths (POSIX form, ``/`` separated), pure but for
:func:`resolve_in_guest`, which asks the guest (through a stat it is given) what the
names of a symlink chain are. Guest data is untrusted: nothing here ever yields a path
that leaves the guest root. This module is the one definition of a safe guest name.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import deque
from collections.abc import Awaitable, Callable

from .errors import GuestfsError
from .model import FileType, GuestStat

NAME_MAX = 255  # bytes in one name, as Linux's NAME_MAX
MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS
PATH_MAX = 4096  # bytes in a path or symlink target with its NUL, as Linux's PATH_MAX


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one directory entry of the mount, or None when it can: not
    empty, ``.`` or ``..``, no ``/`` or NUL, encodable, at most ``NAME_MAX`` bytes."""
    if name in ("", ".", ".."):
        return "not allowed"
    if "/" in name or "\0" in name:
        return "contains '/' or NUL"
    try:
        nbytes = len(os.fsencode(name))
    except (UnicodeError, ValueError):
        return "cannot be encoded"  # a lone surrogate no guest byte decodes to
    if nbytes > NAME_MAX:
        return f"is {nbytes} bytes long"
    return None


def is_safe_name(name: str) -> bool:
    """True when ``name`` can be one directory entry of the mount (see :func:`name_problem`)."""
    return name_problem(name) is None


def join(parent: str, name: str) -> str:
    return parent + name if parent.endswith("/") else parent + "/" + name


def parent_of(path: str) -> str:
    return posixpath.dirname(path) or "/"


def split_components(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c != "."]


def normalize(path: str) -> str:
    """Absolute, with ``.``/``..``/``//`` resolved lexically and ``..`` clamped at ``/``
    (as the kernel does at a root)."""
    out: list[str] = []
    for comp in split_components(path):
        if comp == "..":
            if out:
                out.pop()
        else:
            out.append(comp)
    return "/" + "/".join(out)


def contained_form(link_path: str, target: str) -> bool:
    """True when ``target`` cannot lead out of the mount whatever the other links are:
    relative, with all its ``..`` first and no more of them than the link's directory is
    deep. The ``..`` then climb the link's real parent directories, and what follows only
    descends; any symlink met on the way is itself shown in this form, so no chain of them
    escapes either."""
    if target.startswith("/"):
        return False
    comps = split_components(target)
    ups = 0
    while ups < len(comps) and comps[ups] == "..":
        ups += 1
    if ".." in comps[ups:]:
        return False
    return ups <= len(split_components(parent_of(link_path)))


def dotdot_after_name(target: str) -> bool:
    """True when a ``..`` of ``target`` follows a name: lexical rules then take the ``..``
    to cancel the name, which a symlink of that name would make wrong."""
    comps = split_components(target)
    first_name = next((i for i, c in enumerate(comps) if c != ".."), len(comps))
    return ".." in comps[first_name:]


def relative_to_link(link_path: str, resolved: str) -> str:
    """The contained-form target of a link at ``link_path`` pointing at the normalized
    absolute guest path ``resolved``."""
    return posixpath.relpath(resolved, parent_of(link_path))


def rewrite_symlink(link_path: str, target: str) -> str:
    """The target to show for the guest symlink ``link_path -> target``, by lexical rules
    alone (``..`` after a name is taken to cancel that name).

    The result is in :func:`contained_form`: an absolute target becomes relative to the
    link's directory, a relative one that climbs above the guest root is clamped. A
    relative target already in contained form is kept as the guest wrote it. When a name
    before a ``..`` may be a symlink, the FUSE layer resolves it with
    :func:`resolve_in_guest` first.
    """
    if not target or contained_form(link_path, target):
        return target
    base = parent_of(link_path)
    resolved = normalize(target if target.startswith("/") else join(base, target))
    rel = relative_to_link(link_path, resolved)
    if target.endswith("/") and target.strip("/") and rel != ".":
        rel += "/"
    return rel


async def resolve_in_guest(
    link: str, target: str, stat: Callable[[str], Awaitable[GuestStat]]
) -> str:
    """Where ``link -> target`` leads in the guest, as a normalized absolute path.

    A name followed by ``..`` is only cancelled lexically once ``stat`` says it is not a
    symlink (or fails: nothing there to follow); a symlink there is expanded first, as
    the guest kernel would. Names not followed by ``..`` stay as they are: they are shown
    as (contained) links too. A chain longer than ``MAX_SYMLINK_HOPS`` is a loop: the
    rest is taken lexically, contained all the same.
    """
    if target.startswith("/"):
        resolved: list[str] = []
        real = 0
    else:
        resolved = split_components(parent_of(link))
        real = len(resolved)  # the link's own ancestors are real directories
    pending = deque(split_components(target))
    hops = 0
    while pending:
        c = pending.popleft()
        if c != "..":
            resolved.append(c)
            continue
        if len(resolved) > real:
            try:
                st: GuestStat | None = await stat("/" + "/".join(resolved))
            except GuestfsError:
                st = None  # missing: nothing to follow, cancel lexically
            if st is not None and st.type is FileType.SYMLINK and st.symlink_target:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    break
                resolved.pop()
                inner = st.symlink_target
                if inner.startswith("/"):
                    resolved, real = [], 0
                pending.appendleft("..")
                pending.extendleft(reversed(split_components(inner)))
                continue
        if resolved:
            resolved.pop()
        real = min(real, len(resolved))
    return normalize("/" + "/".join(resolved) + "/" + "/".join(pending))


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]?$")


class PosixPaths:
    """How guest paths are spelled on a POSIX guest."""

    windows = False
    case_insensitive = False
    sep = "/"

    def join(self, parent: str, name: str) -> str:
        return join(parent, name)

    def parent(self, path: str) -> str:
        return parent_of(path)

    def name_problem(self, name: str) -> str | None:
        """Why ``name`` cannot be one entry of a directory of this guest, or None."""
        return name_problem(name)

    def is_safe_name(self, name: str) -> bool:
        return self.name_problem(name) is None

    def basename(self, path: str) -> str:
        return path.rsplit("/", 1)[-1]


class WindowsPaths(PosixPaths):
    """``C:\\Users\\x``: backslashes, drive roots, case-insensitive names."""

    windows = True
    case_insensitive = True
    sep = "\\"

    def join(self, parent: str, name: str) -> str:
        return parent + name if parent.endswith(("\\", "/")) else parent + "\\" + name

    def parent(self, path: str) -> str:
        trimmed = path.rstrip("\\/")
        cut = max(trimmed.rfind("\\"), trimmed.rfind("/"))
        if cut < 0:
            return path
        head = trimmed[:cut]
        return head + "\\" if head.endswith(":") else head

    def name_problem(self, name: str) -> str | None:
        # Joined with "\\", a listed "..\\Secret\\sam.txt" would name another file
        # (under a false name) and "D:evil" another drive: neither is one entry.
        if "\\" in name or ":" in name:
            return "contains '\\' or ':'"
        return name_problem(name)

    def basename(self, path: str) -> str:
        trimmed = path.rstrip("\\/")
        return trimmed[max(trimmed.rfind("\\"), trimmed.rfind("/")) + 1 :]


def flavor_for(root: str, windows: bool = False) -> PosixPaths:
    """The path flavour of a guest, from its root path (``C:\\``) or reported family."""
    return WindowsPaths() if windows or _DRIVE.match(root) else PosixPaths()

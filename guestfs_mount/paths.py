"""Guest path arithmetic: joining, normalising, and making symlink targets safe.

Pure functions on ``str`` guest paths (POSIX form, ``/`` separated). Guest data is
untrusted: nothing here ever yields a path that leaves the guest root.
"""

from __future__ import annotations

import os
import posixpath
import re

NAME_MAX = 255


def is_safe_name(name: str) -> bool:
    """True when ``name`` can be one directory entry of the mount."""
    if name in ("", ".", ".."):
        return False
    if "/" in name or "\0" in name:
        return False
    return len(os.fsencode(name)) <= NAME_MAX


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
    before a ``..`` may be a symlink, the FUSE layer resolves it in the guest first.
    """
    if not target or contained_form(link_path, target):
        return target
    base = parent_of(link_path)
    resolved = normalize(target if target.startswith("/") else join(base, target))
    rel = relative_to_link(link_path, resolved)
    if target.endswith("/") and target.strip("/") and rel != ".":
        rel += "/"
    return rel


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

    def is_safe_name(self, name: str) -> bool:
        return is_safe_name(name)

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

    def is_safe_name(self, name: str) -> bool:
        return is_safe_name(name) and not any(c in name for c in "\\:")

    def basename(self, path: str) -> str:
        trimmed = path.rstrip("\\/")
        return trimmed[max(trimmed.rfind("\\"), trimmed.rfind("/")) + 1 :]


def flavor_for(root: str, windows: bool = False) -> PosixPaths:
    """The path flavour of a guest, from its root path (``C:\\``) or reported family."""
    return WindowsPaths() if windows or _DRIVE.match(root) else PosixPaths()

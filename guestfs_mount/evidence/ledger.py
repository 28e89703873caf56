"""What the daemon has seen: every guest stat it fetched and every transfer's hashes.

One entry per guest path, holding only the latest stat (an immutable ``GuestStat``, shared
with the metadata cache) and the hashes of the latest complete transfer, so memory per
entry is bounded whatever the mount does. Unlike the metadata cache the ledger never
expires entries (an export must not forget what was seen); past ``max_entries`` new paths
are counted as dropped and every export says so.
"""

from __future__ import annotations

import base64
import hashlib
import stat as statmod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..cache.content import TransferEvent
from ..model import DirEntry, FilesystemFamily, FileType, GuestStat
from ..paths import PosixPaths

EMPTY_MD5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_KIND = {
    FileType.FILE: statmod.S_IFREG,
    FileType.DIRECTORY: statmod.S_IFDIR,
    FileType.SYMLINK: statmod.S_IFLNK,
}


def path_b64(path: str) -> str | None:
    """The guest bytes of a path that is not valid UTF-8, in base64; None for one that is.

    Such a path holds lone surrogates (``os.fsdecode``'s escapes of the raw bytes), which
    JSON writes as ``\\udcXX`` and most tools (jq, browsers) show as U+FFFD: two paths
    that differ only in those bytes would look alike. This form tells them apart."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # surrogatepass: a Windows name may hold an unpaired UTF-16 half, not a raw byte.
        try:
            raw = path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = path.encode("utf-8", "surrogatepass")
        return base64.b64encode(raw).decode("ascii")
    return None


@dataclass(frozen=True, slots=True)
class Hashes:
    """The digests of one complete transfer of one version (size, mtime) of a file."""

    size: int
    mtime_ns: int
    sha256: str
    md5: str | None
    time: float  # epoch seconds at which the transfer completed


@dataclass(slots=True)
class _Entry:
    stat: GuestStat
    hashes: Hashes | None = None


class Ledger:
    def __init__(self, *, root: str, paths: PosixPaths, max_entries: int = 5_000_000) -> None:
        self.root = root
        self.paths = paths
        self.max_entries = max_entries
        self.dropped = 0
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def saw(self, path: str, st: GuestStat) -> None:
        entry = self._entries.get(path)
        if entry is not None:
            entry.stat = st
        elif len(self._entries) < self.max_entries:
            self._entries[path] = _Entry(st)
        else:
            self.dropped += 1

    def fetched(
        self, path: str, size: int, mtime_ns: int, sha256: str, md5: str | None, when: float
    ) -> None:
        entry = self._entries.get(path)
        if entry is None:
            return  # opened without a stat first cannot happen; nothing to attach it to
        entry.hashes = Hashes(size, mtime_ns, sha256, md5, when)

    def relative(self, guest_path: str) -> str:
        """The path below the mount point ("" for the root), '/'-separated."""
        root = self.root
        if guest_path == root:
            return ""
        rest = guest_path[len(root) :] if guest_path.startswith(root) else guest_path
        if self.paths.windows:
            rest = rest.replace("\\", "/")
        return rest.strip("/")

    def records(self) -> Iterator[dict[str, Any]]:
        """Plain records (JSON-ready) of every entry, in path order, built as they are
        consumed (the control socket sends them in batches between FUSE requests)."""
        items = sorted(self._entries.items())
        for path, e in items:
            yield record(path, self.relative(path), e.stat, e.hashes)


def record(path: str, rel: str, st: GuestStat, hashes: Hashes | None) -> dict[str, Any]:
    """One entry as the evidence formats take it. Only what the guest reported is set;
    a hash only when the bytes of this very version (size, mtime) were fetched."""
    perms = st.permissions
    rec: dict[str, Any] = {
        "guest_path": path,
        "path": rel,
        "type": st.type.value,
        "size": st.size,
        "mode": _KIND[st.type] | (perms & 0o7777 if perms is not None else 0),
        "permissions_known": perms is not None,
        "uid": st.owner,
        "gid": st.group,
        "mtime_ns": st.mtime_ns,
        "atime_ns": st.atime_ns,
        "crtime_ns": st.created_ns if st.family is FilesystemFamily.WINDOWS else None,
        "family": st.family.value,
        "link_target": st.symlink_target if st.type is FileType.SYMLINK else None,
        "sha256": None,
        "md5": None,
        "fetched": None,
    }
    exact = path_b64(path)
    if exact is not None:
        rec["guest_path_b64"] = exact
    if st.type is FileType.FILE:
        if st.size == 0:
            # Nothing to transfer: the digest of no bytes is not an invented one.
            rec["sha256"], rec["md5"] = EMPTY_SHA256, EMPTY_MD5
        elif hashes is not None and (hashes.size, hashes.mtime_ns) == (st.size, st.mtime_ns):
            rec["sha256"], rec["md5"], rec["fetched"] = hashes.sha256, hashes.md5, hashes.time
    return rec


class RecordingBackend:
    """The metadata backend with every stat it returns noted in the ledger."""

    def __init__(self, backend: Any, ledger: Ledger) -> None:
        self._backend = backend
        self._ledger = ledger

    async def list_dir(
        self, path: str, more: Callable[[int], bool] | None = None
    ) -> list[DirEntry]:
        result: list[DirEntry] = await self._backend.list_dir(path, more)
        # vim25 listings carry every entry's attributes: the stat cache is seeded from
        # them without a stat call, so they are what the mount shows.
        for entry in result:
            if entry.stat is not None:
                self._ledger.saw(self._ledger.paths.join(path, entry.name), entry.stat)
        return result

    async def stat(self, path: str) -> GuestStat:
        st: GuestStat = await self._backend.stat(path)
        self._ledger.saw(path, st)
        return st


def transfer_hook(ledger: Ledger) -> Callable[[TransferEvent], None]:
    """``on_transfer_end`` for the content cache: the hashes of a complete transfer."""

    def hook(ev: TransferEvent) -> None:
        if ev.error is None and ev.sha256 is not None:
            when = ev.started + ev.seconds
            ledger.fetched(ev.key.path, ev.key.size, ev.key.mtime_ns, ev.sha256, ev.md5, when)

    return hook

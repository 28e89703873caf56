"""What a guest reports about one file: the record every listing and stat is built from.

Real VMware Tools (``VixToolsPrintFileExtendedInfo``) sends, per entry, the name, the
type, the size, mtime/atime, uid/gid, the full ``st_mode`` and the symlink target, taken
from ``stat`` (which follows symlinks) plus ``readlink``. A :class:`GuestEntry` holds
exactly that, so the REST listing/stat and the vim25 ``ListFilesInGuest`` /
``InitiateFileTransferFromGuest`` answers are cut from the same facts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FILE = "FILE"
DIRECTORY = "DIRECTORY"
SYMLINK = "SYMLINK"


@dataclass(frozen=True, slots=True)
class GuestEntry:
    """One file as the guest reports it.

    ``type`` is the entry's own type (lstat: a symlink is SYMLINK); every attribute
    after it is the *target's* when the guest could stat through the link, the link's
    own otherwise (a dangling link). ``size`` is 0 for directories and symlinks.
    """

    name: str  # surrogateescape-decoded; ``name_bytes`` gives the guest bytes
    type: str  # FILE | DIRECTORY | SYMLINK (sockets, fifos, devices are FILE)
    size: int
    mode: int  # full st_mode, file-type bits included
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int  # Windows: creation time (st_birthtime where the host has it)
    symlink_target: str | None = None  # POSIX symlinks only
    family: str = "POSIX"  # POSIX | WINDOWS
    hidden: bool = False  # WINDOWS only
    read_only: bool = False  # WINDOWS only

    @property
    def name_bytes(self) -> bytes:
        return os.fsencode(self.name)

    @property
    def mtime(self) -> int:
        """Whole seconds, as real Tools reports them."""
        return self.mtime_ns // 1_000_000_000

    @property
    def atime(self) -> int:
        return self.atime_ns // 1_000_000_000

    @property
    def ctime(self) -> int:
        return self.ctime_ns // 1_000_000_000

    @property
    def permissions(self) -> int:
        """The chmod bits (``0o4755``)."""
        return self.mode & 0o7777

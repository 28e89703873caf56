"""The daemon's ledger: what it records of stats and transfers, and the records it gives."""

from __future__ import annotations

import hashlib

from guestfs_mount.cache.content import ContentKey, TransferEvent
from guestfs_mount.evidence.ledger import Ledger, transfer_hook
from guestfs_mount.model import FilesystemFamily, FileType, GuestStat
from guestfs_mount.paths import PosixPaths, WindowsPaths

S = 1_000_000_000


def _file(size: int, mtime: int = 100) -> GuestStat:
    return GuestStat(FileType.FILE, size, mtime * S, 50 * S, owner=1, group=2, permissions=0o640)


def _ok(path: str, size: int, mtime: int = 100) -> TransferEvent:
    return TransferEvent(ContentKey(path, size, mtime * S), 10.0, 1.0, size, "a" * 64, None,
                         md5="b" * 32)  # fmt: skip


def test_hash_only_for_the_version_that_was_fetched():
    led = Ledger(root="/", paths=PosixPaths())
    hook = transfer_hook(led)
    led.saw("/etc/hosts", _file(20))
    hook(_ok("/etc/hosts", 20))
    (rec,) = list(led.records())
    assert (rec["sha256"], rec["md5"], rec["fetched"]) == ("a" * 64, "b" * 32, 11.0)
    assert rec["mode"] == 0o100640 and (rec["uid"], rec["gid"]) == (1, 2)
    led.saw("/etc/hosts", _file(21, mtime=101))  # the guest file changed since
    (rec,) = list(led.records())
    assert rec["sha256"] is None and rec["md5"] is None and rec["size"] == 21


def test_failed_transfer_and_unfetched_file_have_no_hash_but_empty_files_do():
    led = Ledger(root="/", paths=PosixPaths())
    led.saw("/a", _file(5))
    led.saw("/empty", _file(0))
    bad = TransferEvent(ContentKey("/a", 5, 100 * S), 1.0, 1.0, 2, None, OSError("cut"))
    transfer_hook(led)(bad)
    a, empty = list(led.records())
    assert a["sha256"] is None
    assert empty["sha256"] == hashlib.sha256(b"").hexdigest()
    assert empty["md5"] == hashlib.md5(b"").hexdigest()


def test_entries_are_bounded_and_drops_counted():
    led = Ledger(root="/", paths=PosixPaths(), max_entries=2)
    for name in ("/a", "/b", "/c", "/a"):
        led.saw(name, _file(1))
    assert len(led) == 2 and led.dropped == 1


def test_windows_paths_become_mount_relative_and_crtime_is_kept():
    led = Ledger(root="C:\\", paths=WindowsPaths())
    st = GuestStat(FileType.FILE, 3, 5 * S, 6 * S, family=FilesystemFamily.WINDOWS,
                   created_ns=4 * S)  # fmt: skip
    led.saw("C:\\Users\\x\\a.txt", st)
    (rec,) = list(led.records())
    assert rec["path"] == "Users/x/a.txt" and rec["crtime_ns"] == 4 * S
    assert rec["uid"] is None and not rec["permissions_known"]

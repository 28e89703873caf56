"""A fleet's evidence records: every VM's ledger, each record under its VM's directory."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from guestfs_mount.evidence.ledger import Ledger
from guestfs_mount.fleet.evidence import fleet_head, fleet_records, vm_relative
from guestfs_mount.model import FilesystemFamily, FileType, GuestStat
from guestfs_mount.paths import PosixPaths, WindowsPaths


def _vm(vm: str, dirname: str, windows: bool, seen: dict[str, FileType]) -> Any:
    paths = WindowsPaths() if windows else PosixPaths()
    ledger = Ledger(root="C:\\" if windows else "/", paths=paths)
    family = FilesystemFamily.WINDOWS if windows else FilesystemFamily.POSIX
    for path, kind in seen.items():
        ledger.saw(path, GuestStat(kind, 4, 0, 0, family=family))
    roots = {"C:\\": None} if windows else {"/": None}
    return SimpleNamespace(vm=vm, name=dirname.upper(), dirname=dirname, windows=windows,
                           ledger=ledger, roots=roots)  # fmt: skip


def test_paths_below_the_vm_directory():
    linux = _vm("vm-1", "web", False, {})
    win = _vm("vm-2", "win", True, {})
    assert vm_relative(linux, "/") == "" and vm_relative(linux, "/etc/hosts") == "etc/hosts"
    assert vm_relative(win, "C:\\") == "C" and vm_relative(win, "d:\\Data\\x") == "D/Data/x"


def test_records_name_their_vm_and_untouched_vms_have_none():
    d, f = FileType.DIRECTORY, FileType.FILE
    web = _vm("vm-1", "web", False, {"/": d, "/etc/hosts": f})
    db = _vm("vm-2", "db", False, {"/etc/hosts": f})
    win = _vm("vm-3", "win", True, {"C:\\Users\\a.txt": f})
    untouched: Any = SimpleNamespace(vm="vm-4", name="x", dirname="x", windows=False, ledger=None)
    records = list(fleet_records([web, untouched, win, db]))
    assert [(r["path"], r["vm"], r["guest_path"]) for r in records] == [
        ("db/etc/hosts", "vm-2", "/etc/hosts"),
        ("web", "vm-1", "/"),
        ("web/etc/hosts", "vm-1", "/etc/hosts"),
        ("win/C/Users/a.txt", "vm-3", "C:\\Users\\a.txt"),
    ]
    assert all(r["vm_dir"] == r["path"].split("/")[0] for r in records)
    head = fleet_head([web, untouched, win, db])
    assert [v["vm_dir"] for v in head["vms"]] == ["db", "web", "win"]
    assert head["vms"][2]["guest_roots"] == ["C:\\"] and head["dropped"] == 0

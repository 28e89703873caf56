"""A Windows guest mounted end to end: drive root, case-insensitive names, attributes."""

from __future__ import annotations

import os
import stat

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mounted

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    root = tmp_path_factory.mktemp("c-drive")
    (root / "Users" / "Admin").mkdir(parents=True)
    (root / "Users" / "Admin" / "Report.TXT").write_bytes(b"quarterly numbers\n")
    (root / "Windows" / "System32").mkdir(parents=True)
    (root / "Windows" / "System32" / "hosts").write_bytes(b"127.0.0.1 localhost\r\n")
    ro = root / "Users" / "Admin" / "locked.txt"
    ro.write_bytes(b"read only\n")
    os.chmod(ro, 0o444)
    (root / ".hidden-file").write_bytes(b"h")
    return root


@pytest.fixture(scope="module")
def sim(drive):
    with run_simulator("--windows-vm", f"win={drive}") as s:
        yield s


@pytest.fixture(scope="module")
def mnt(sim, api, tmp_path_factory):
    mp = str(tmp_path_factory.mktemp("mnt"))
    with mounted(ViaApi(sim, api), mp, "--guest-root", sim.guest_root("win"), vm="win") as m:
            yield m


def test_drive_root_listing(mnt):
    assert sorted(os.listdir(mnt.mnt)) == [".hidden-file", "Users", "Windows"]
    assert os.getxattr(mnt.path("Users"), "user.guestfs.guest_path") == b"C:\\Users"


def test_content_and_case_insensitive_names(mnt):
    with open(mnt.path("Users/Admin/Report.TXT"), "rb") as f:
        assert f.read() == b"quarterly numbers\n"
    with open(mnt.path("users/ADMIN/report.txt"), "rb") as f:
        assert f.read() == b"quarterly numbers\n"
    # One file, one inode, whatever the spelling.
    assert os.stat(mnt.path("USERS/admin/REPORT.txt")).st_ino == os.stat(
        mnt.path("Users/Admin/Report.TXT")).st_ino
    assert os.getxattr(mnt.path("users/admin/report.txt"), "user.guestfs.guest_path") == (
        b"C:\\Users\\Admin\\Report.TXT")
    with pytest.raises(FileNotFoundError):
        os.stat(mnt.path("Users/Nobody"))


def test_windows_attributes(mnt):
    locked = mnt.path("Users/Admin/locked.txt")
    assert os.getxattr(locked, "user.guestfs.read_only") == b"1"
    assert not stat.S_IMODE(os.stat(locked).st_mode) & 0o222
    assert os.getxattr(mnt.path(".hidden-file"), "user.guestfs.hidden") == b"1"
    assert os.getxattr(mnt.path("Users/Admin/Report.TXT"), "user.guestfs.hidden") == b"0"
    st = os.stat(mnt.path("Windows/System32/hosts"))
    assert st.st_size == len(b"127.0.0.1 localhost\r\n")
    assert st.st_uid == os.getuid()  # Windows guests report no POSIX owner

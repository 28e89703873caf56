"""Issue 10 item 8, the checks themselves: the pin detects any change of the path."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from guestfs_mount.errors import ConfigError
from guestfs_mount.mountpoint import check_mounted, check_mountpoint, mount_target, parent_problem


def test_path_changed_after_the_check_is_refused(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mp = check_mountpoint(str(mnt))
    try:
        assert mount_target(mp) == f"/proc/self/fd/{mp.fd}"  # root: the pinned directory
        os.rename(mnt, tmp_path / "moved")
        os.mkdir(mnt)  # a look-alike: same path, another directory
        with pytest.raises(
            ConfigError, match="replaced since it was checked: it is now another file"
        ):
            mount_target(mp)
        # moved in the instant between the re-check and mount(2): found right after
        with pytest.raises(ConfigError, match=f"was moved to {tmp_path}/moved while mounting"):
            check_mounted(mp)
    finally:
        os.close(mp.fd)


def test_symlinks_in_the_parent_are_resolved_once(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "mnt").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    mp = check_mountpoint(str(tmp_path / "alias" / "mnt"))
    try:
        assert mp.path == str(tmp_path / "real" / "mnt")
        check_mounted(mp)
    finally:
        os.close(mp.fd)


def _st(uid, mode):
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


def test_parent_rules():
    me = os.geteuid()
    d = stat.S_IFDIR
    assert parent_problem(_st(me, d | 0o755), _st(me, d | 0o755)) is None
    assert parent_problem(_st(0, d | 0o755), _st(me, d | 0o755)) is None
    assert parent_problem(_st(12345, d | 0o700), _st(me, d | 0o755)) == "is owned by uid 12345"
    assert parent_problem(_st(me, d | 0o775), _st(me, d | 0o755)) == "is writable by its group"
    assert parent_problem(_st(0, d | 0o1777), _st(me, d | 0o755)) is None  # /tmp
    assert parent_problem(_st(0, d | 0o1777), _st(12345, d | 0o755)) == "is writable by others"


@pytest.mark.parametrize(
    ("err", "ends_cleanly"), [(errno.ECONNABORTED, True), (errno.EIO, False)]
)
def test_the_fuse_loop_ends_cleanly_on_an_aborted_connection(monkeypatch, err, ends_cleanly):
    # Seen in CI on Linux 6.18: `fusermount3 -u` ended the loop with ECONNABORTED (libfuse
    # treats only ENODEV as the end), and the daemon reported a clean unmount as a failure.
    import pyfuse3
    import trio

    from guestfs_mount import mount

    async def main(max_tasks: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(pyfuse3, "main", main)
    if ends_cleanly:
        trio.run(mount.fuse_main, 4)
    else:
        with pytest.raises(OSError):
            trio.run(mount.fuse_main, 4)

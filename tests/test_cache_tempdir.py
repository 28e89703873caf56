"""Issue 10 item 14, the rules: only our own dead daemons' cache directories are removed."""

from __future__ import annotations

import os
import subprocess
import sys

from guestfs_mount.cache import tempdir

OTHER = 12345
MAKE = (
    "import sys; from guestfs_mount.cache import tempdir; d = tempdir.private_cache_dir(); "
    "open(d + '/1', 'w').write('root:secret'); print(d, flush=True); sys.stdin.read()"
)


def _daemon(tmp):
    """A process that made its cache directory in ``tmp`` and holds it until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", MAKE],
        env=dict(os.environ, TMPDIR=str(tmp)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_only_dead_daemons_directories_of_ours_are_removed(tmp_path):
    me = os.geteuid()
    alive, alive_dir = _daemon(tmp_path)
    dead, dead_dir = _daemon(tmp_path)
    dead.communicate("")  # exits: its lock is released
    try:
        assert os.path.basename(dead_dir).startswith(f"guestfs-mount-cache-{me}-{dead.pid}-")
        theirs = tmp_path / f"guestfs-mount-cache-{OTHER}-1-abc"
        planted = tmp_path / f"guestfs-mount-cache-{me}-2-planted"  # our name, their directory
        for d in (theirs, planted):
            d.mkdir()
            (d / "1").write_text("x")
            os.chown(d, OTHER, OTHER)
        keep = tmp_path / "keep"
        keep.mkdir()
        (keep / "1").write_text("x")
        link = tmp_path / f"guestfs-mount-cache-{me}-3-link"
        os.symlink(keep, link)
        old = tmp_path / "guestfs-mount-abcd1234"  # the old form: whose it is cannot be told
        old.mkdir()

        assert tempdir.remove_stale(str(tmp_path)) == [dead_dir]
        assert not os.path.exists(dead_dir)
        assert os.listdir(alive_dir) == ["1"]
        assert all(os.path.exists(d / "1") for d in (theirs, planted, keep))
        assert os.path.islink(link) and old.is_dir()
    finally:
        alive.communicate("")
    assert tempdir.remove_stale(str(tmp_path)) == [alive_dir]


def test_our_directories_are_private_locked_and_released_once_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    d = tempdir.private_cache_dir()
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert tempdir.remove_stale(str(tmp_path)) == []  # held by this process
    os.rmdir(d)  # what the cache's close does
    assert f"{d} (deleted)" in _open_fds()  # still locked until the next one is made
    d2 = tempdir.private_cache_dir()
    assert f"{d} (deleted)" not in _open_fds() and d2 in _open_fds()
    os.rmdir(d2)


def _open_fds():
    """What this process's descriptors point to."""
    out = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{n}"))
        except FileNotFoundError:  # the descriptor listdir used
            pass
    return out

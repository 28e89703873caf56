"""End to end: the real kernel mount against the simulator, checked as a user would."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import random
import stat
import subprocess

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mounted
from tests import trees

pytestmark = pytest.mark.fuse

BIG = 256 * 1024 * 1024 + 12345


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("guest"))
    trees.build(root)
    trees.build_big_dir(root, 5000)
    trees.write_random_file(os.path.join(root, "data", "large.bin"), BIG)
    return root


@pytest.fixture(scope="module")
def sim(source):
    with run_simulator("--root", source) as s:
        yield s


@pytest.fixture(scope="module")
def mnt(sim, api, tmp_path_factory):
    mp = str(tmp_path_factory.mktemp("mnt"))
    with mounted(ViaApi(sim, api), mp) as m:
        yield m


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _listed(api: str, names: set[bytes]) -> set[bytes]:
    """What the guest lists of ``names`` over ``api``: vim25 leaves out names that are not
    UTF-8 (docs/simulator.md), REST lists them all."""
    return names if api == "rest" else {n for n in names if _utf8(n)}


def test_diff_r_equal_to_source(source, mnt, api):
    unlisted = {os.fsdecode(n) for n in trees.ODD_NAMES_BYTES if not _utf8(n)}
    skip = [] if api == "rest" else [a for n in unlisted for a in ("-x", n)]
    for sub in ("data", "etc", "names", "empty-dir"):
        res = subprocess.run(
            ["diff", "-r", *skip, os.path.join(source, sub), mnt.path(sub)], capture_output=True
        )
        assert res.returncode == 0, res.stdout.decode(errors="replace")[:2000]


def test_stat_fields_equal_to_source(source, mnt, api):
    checked = 0
    for dirpath, dirnames, filenames in os.walk(source):
        if os.path.basename(dirpath) in ("big", "solo"):
            continue
        for name in dirnames + filenames:
            if not _listed(api, {os.fsencode(name)}):
                continue
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, source)
            s = os.lstat(src)
            m = os.lstat(mnt.path(rel))
            assert stat.S_IFMT(m.st_mode) == stat.S_IFMT(s.st_mode), rel
            if not stat.S_ISLNK(s.st_mode):
                assert stat.S_IMODE(m.st_mode) == stat.S_IMODE(s.st_mode), rel
                assert m.st_mtime_ns // 10**9 == s.st_mtime_ns // 10**9, rel
            if stat.S_ISREG(s.st_mode):
                assert m.st_size == s.st_size, rel
            if not stat.S_ISLNK(s.st_mode):
                # a guest stats through a symlink: its owner is its target's
                # (real-guest-ops.md section 4)
                assert (m.st_uid, m.st_gid) == (s.st_uid, s.st_gid), rel
            checked += 1
    assert checked > 30


def test_times_exactly_as_reported(source, mnt, api):
    s = os.stat(os.path.join(source, "solo/times.txt"))
    m = os.stat(mnt.path("solo/times.txt"))
    # REST carries milliseconds, vim25 (as guests report it) whole seconds
    unit = 10**6 if api == "rest" else 10**9
    assert m.st_mtime_ns // unit == s.st_mtime_ns // unit
    assert m.st_atime_ns // unit == s.st_atime_ns // unit


def test_owner_and_setuid_bits(mnt):
    a = os.stat(mnt.path("data/nested/a.txt"))
    assert (a.st_uid, a.st_gid, stat.S_IMODE(a.st_mode)) == (1234, 5678, 0o640)
    assert stat.S_IMODE(os.stat(mnt.path("data/setuid")).st_mode) == 0o4755


def test_big_directory_listing_complete(mnt):
    names = os.listdir(mnt.path("big"))
    assert len(names) == 5000
    assert set(names) == {f"entry-{i:05d}" for i in range(5000)}


def test_odd_names(source, mnt, api):
    got = set(os.listdir(os.fsencode(mnt.path("names"))))
    want = _listed(api, set(os.listdir(os.fsencode(os.path.join(source, "names")))))
    assert got == want
    for name in trees.ODD_NAMES:
        if not _utf8(os.fsencode(name)) and api != "rest":
            continue
        with open(mnt.path("names", name), "rb") as f:
            assert f.read().startswith(b"odd ")


def test_empty_file_and_dir(mnt):
    with open(mnt.path("data/empty"), "rb") as f:
        assert f.read() == b""
    assert os.listdir(mnt.path("empty-dir")) == []


def test_symlinks(mnt):
    assert os.readlink(mnt.path("links/relative")) == "../etc/hosts"
    assert os.readlink(mnt.path("links/absolute")) == "../etc/hosts"
    assert os.readlink(mnt.path("links/climbing")) == "../etc/hosts"
    with open(mnt.path("links/absolute")) as f:
        assert f.read() == "127.0.0.1 localhost\n"  # the guest's file, not the host's
    assert sorted(os.listdir(mnt.path("links/absolute-dir"))) == ["a.txt", "deeper"]
    assert os.readlink(mnt.path("links/dangling")) == "../nonexistent/target"
    with pytest.raises(FileNotFoundError):
        open(mnt.path("links/dangling"))
    with pytest.raises(OSError) as e:
        open(mnt.path("links/loop-a"))
    assert e.value.errno == errno.ELOOP


def test_missing_file_and_directory_errors(mnt):
    with pytest.raises(FileNotFoundError):
        os.stat(mnt.path("no/such/file"))
    with pytest.raises(IsADirectoryError), open(mnt.path("data")) as f:
        f.read()


@pytest.mark.one_transport
def test_large_file_sequential_and_random(source, sim, mnt):
    src = os.path.join(source, "data/large.bin")
    assert _sha256(mnt.path("data/large.bin")) == _sha256(src)
    rnd = random.Random(7)
    with open(src, "rb") as a, open(mnt.path("data/large.bin"), "rb") as b:
        for _ in range(200):
            off = rnd.randrange(0, BIG)
            n = rnd.choice([1, 100, 4096, 65536, 1 << 20])
            assert os.pread(b.fileno(), n, off) == os.pread(a.fileno(), n, off)
        assert os.pread(b.fileno(), 10, BIG) == b""


def test_concurrent_readers_share_one_transfer(source, sim, mnt):
    sim.reset_stats()
    path = mnt.path("solo/shared.bin")
    want = open(os.path.join(source, "solo/shared.bin"), "rb").read()

    def read_all(_):
        with open(path, "rb") as f:
            return f.read()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(read_all, range(16)))
    assert all(r == want for r in results)
    assert sim.stats()["transfers"]["by_path"].get("/solo/shared.bin") == 1


@pytest.mark.one_transport
def test_writes_are_refused(mnt):
    target = mnt.path("data/small.txt")
    attempts = [
        lambda: open(target, "wb"),
        lambda: open(target, "ab"),
        lambda: open(mnt.path("data/new"), "wb"),
        lambda: os.mkdir(mnt.path("newdir")),
        lambda: os.rename(target, mnt.path("data/renamed")),
        lambda: os.chmod(target, 0o777),
        lambda: os.truncate(target, 0),
        lambda: os.unlink(target),
        lambda: os.symlink("x", mnt.path("data/ln")),
        lambda: os.utime(target, None),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert open(target, "rb").read() == b"hello guest\n" * 10


def test_xattrs(mnt):
    p = mnt.path("data/small.txt")
    assert os.getxattr(p, "user.guestfs.guest_path") == b"/data/small.txt"
    with open(p, "rb") as f:
        data = f.read()
    assert os.getxattr(p, "user.guestfs.sha256").decode() == hashlib.sha256(data).hexdigest()
    assert "user.guestfs.guest_path" in os.listxattr(p)


def test_tools_work(source, mnt):
    out = subprocess.run(
        ["grep", "-r", "-l", "alpha", mnt.path("data")], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == mnt.path("data/nested/a.txt")
    found = subprocess.run(
        ["find", mnt.path("data"), "-name", "*.txt"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(os.path.relpath(p, mnt.path("data")) for p in found) == [
        "nested/a.txt",
        "nested/deeper/b.txt",
        "small.txt",
    ]
    ls = subprocess.run(
        ["ls", "-l", mnt.path("etc")], capture_output=True, text=True, check=True
    ).stdout
    assert "-rw------- 1 root root" in ls and "hosts" in ls
    df = subprocess.run(["df", mnt.mnt], capture_output=True, text=True)
    assert df.returncode == 0

"""The FUSE layer without the kernel: handlers called directly, as s3ql's tests do."""

from __future__ import annotations

import errno
import stat

import pyfuse3
import pytest
import trio
import trio.testing

from guestfs_mount.cache.content import ContentKey
from guestfs_mount.errors import NotFound, TransferError, Unauthorized
from guestfs_mount.fs import FsOptions, Operations
from guestfs_mount.meta import Budget, MetadataCache
from guestfs_mount.model import DirEntry, FileType, GuestStat

CTX = object()


class Guest:
    def __init__(self):
        self.stat_calls = []
        self.tree = {
            "/": [DirEntry(f"f{i}", FileType.FILE, 10) for i in range(100)]
            + [DirEntry("d", FileType.DIRECTORY, 0), DirEntry("ln", FileType.SYMLINK, 11),
               DirEntry("secret", FileType.FILE, 5)],
            "/d": [],
        }

    async def list_dir(self, path, more=None):
        return self.tree[path]

    async def stat(self, path):
        self.stat_calls.append(path)
        if path in ("/", "/d"):
            return GuestStat(FileType.DIRECTORY, 4096, 1, 1, owner=0, group=0, permissions=0o755)
        if path == "/ln":
            return GuestStat(FileType.SYMLINK, 11, 1, 1, symlink_target="/etc/passwd")
        if path == "/secret":
            raise Unauthorized("no access", path=path)
        if path == "/boom":
            raise RuntimeError("a bug")
        if path.startswith("/f"):
            return GuestStat(FileType.FILE, 10, 2_000_000_000, 1_000_000_000, owner=7, group=8,
                             permissions=0o640)
        raise NotFound("gone", path=path)


class Content:
    def __init__(self, fail=False):
        self.fail = fail
        self.opened = []
        self.prefetched = []
        self.version_listener = None

    async def open(self, key):
        self.opened.append(key)
        return len(self.opened)

    async def started(self, handle):
        pass

    async def read(self, handle, offset, size):
        if self.fail:
            raise TransferError("cut")
        return b"x" * min(size, 10 - offset)

    def release(self, handle):
        pass

    def sha256(self, key):
        return "ab" * 32

    def transfer_time(self, key):
        return 1_700_000_000.0

    async def prefetch(self, key):
        self.prefetched.append(key.path)
        return True


def make(nursery, content=None, **opts):
    g = Guest()
    meta = MetadataCache(g, nursery=nursery)
    return g, Operations(meta, content or Content(), FsOptions(**opts), nursery=nursery)


def counted_once(inodes, ino):
    """The kernel holds exactly one reference: forgetting none keeps it, one drops it."""
    return not inodes.forget(ino, 0) and inodes.forget(ino, 1)


async def test_lookup_getattr_maps_guest_attributes(nursery):
    g, ops = make(nursery)
    a = await ops.lookup(1, b"f1", CTX)
    assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o640
    assert (a.st_uid, a.st_gid, a.st_size) == (7, 8, 10)
    assert a.st_mtime_ns == 2_000_000_000 and a.st_atime_ns == 1_000_000_000
    assert (await ops.getattr(a.st_ino, CTX)).st_ino == a.st_ino
    assert counted_once(ops.inodes, a.st_ino)


async def test_uid_override_and_missing_names(nursery):
    g, ops = make(nursery, uid=1000, gid=1001)
    a = await ops.lookup(1, b"f1", CTX)
    assert (a.st_uid, a.st_gid) == (1000, 1001)
    neg = await ops.lookup(1, b"nope", CTX)
    assert neg.st_ino == 0  # negative entry, cached by the kernel
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(1, b"a/b", CTX)
    assert e.value.errno == errno.ENOENT


async def test_errors_become_errno_never_other_exceptions(nursery):
    g, ops = make(nursery)
    ino = ops.inodes.inode("/secret")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(ino, CTX)
    assert e.value.errno == errno.EACCES
    ino = ops.inodes.inode("/boom")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(ino, CTX)
    assert e.value.errno == errno.EIO
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(9999, CTX)
    assert e.value.errno == errno.ESTALE


async def test_readdir_offsets_and_lookup_counts(nursery, monkeypatch):
    g, ops = make(nursery)
    got = []
    budget = [30]

    def reply(token, name, attrs, next_id):
        if budget[0] == 0:
            return False
        budget[0] -= 1
        got.append((name, next_id, attrs.attr_timeout))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(1, CTX)
    start = 0
    while True:
        before = len(got)
        await ops.readdir(fh, start, None)
        if len(got) == before:
            break
        start = got[-1][1]
        budget[0] = 30
    await ops.releasedir(fh)
    names = [n for n, _, _ in got]
    assert len(names) == 103 and len(set(names)) == 103
    assert g.stat_calls == []  # a listing alone makes no per-file call
    assert all(t == 0 for _, _, t in got)  # attributes not known yet: kernel must ask
    ino = ops.inodes.inode("/f5")
    assert counted_once(ops.inodes, ino)  # counted once, only for accepted entries


async def test_symlink_rewritten_or_raw(nursery):
    g, ops = make(nursery)
    ino = ops.inodes.inode("/ln")
    assert await ops.readlink(ino, CTX) == b"etc/passwd"
    g, raw = make(nursery, raw_symlinks=True)
    assert await raw.readlink(raw.inodes.inode("/ln"), CTX) == b"/etc/passwd"
    a = await ops.getattr(ino, CTX)
    assert stat.S_ISLNK(a.st_mode) and a.st_size == len(b"etc/passwd")


async def test_open_read_and_keep_cache_by_version(nursery):
    g, ops = make(nursery)
    ino = (await ops.lookup(1, b"f1", CTX)).st_ino
    fi = await ops.open(ino, 0, CTX)
    assert fi.keep_cache is False  # first open of this version
    assert await ops.read(fi.fh, 0, 4096) == b"x" * 10
    await ops.release(fi.fh)
    fi2 = await ops.open(ino, 0, CTX)
    assert fi2.keep_cache is True
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(ino, 1, CTX)  # O_WRONLY
    assert e.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(ops.inodes.inode("/d"), 0, CTX)
    assert e.value.errno == errno.EISDIR


async def test_failed_download_is_eio(nursery):
    g, ops = make(nursery, Content(fail=True))
    ino = (await ops.lookup(1, b"f2", CTX)).st_ino
    fi = await ops.open(ino, 0, CTX)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(fi.fh, 0, 10)
    assert e.value.errno == errno.EIO


async def test_deadline_gives_etimedout(nursery):
    g, ops = make(nursery, timeout=0.05)

    async def slow(path):
        await trio.sleep(10)

    g.stat = slow
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(1, b"f3", CTX)
    assert e.value.errno == errno.ETIMEDOUT


async def test_xattrs(nursery):
    g, ops = make(nursery)
    ino = (await ops.lookup(1, b"f1", CTX)).st_ino
    assert await ops.getxattr(ino, b"user.guestfs.guest_path", CTX) == b"/f1"
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getxattr(ino, b"user.guestfs.sha256", CTX)  # not read yet
    fi = await ops.open(ino, 0, CTX)
    assert await ops.getxattr(ino, b"user.guestfs.sha256", CTX) == b"ab" * 32
    assert b"user.guestfs.transfer_time" in await ops.listxattr(ino, CTX)
    await ops.release(fi.fh)
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getxattr(ino, b"security.selinux", CTX)


async def test_handlers_tell_readahead_what_was_asked(nursery):
    content = Content()
    g, ops = make(nursery, content)
    fh = await ops.opendir(1, CTX)  # lists /
    ino = (await ops.lookup(1, b"f1", CTX)).st_ino  # known from the listing: no stat yet
    assert g.stat_calls == []
    await ops.getattr(ino, CTX)
    await trio.testing.wait_all_tasks_blocked()
    # f1, and stat-ahead of its siblings as far as the budget goes (nobody read them yet)
    assert len(set(g.stat_calls)) == 1 + Budget().calls
    fi = await ops.open(ino, 0, CTX)
    await trio.testing.wait_all_tasks_blocked()
    assert content.prefetched == [f"/f{i}" for i in range(2, 34)]  # the next 32 files
    await ops.release(fi.fh)
    await ops.releasedir(fh)
    _, quiet = make(nursery, content, prefetch=False)
    await quiet.opendir(1, CTX)
    fi = await quiet.open((await quiet.lookup(1, b"f40", CTX)).st_ino, 0, CTX)
    await trio.testing.wait_all_tasks_blocked()
    assert len(content.prefetched) == 32  # --no-prefetch


def test_content_key_is_version():
    assert ContentKey("/a", 1, 2) != ContentKey("/a", 1, 3)

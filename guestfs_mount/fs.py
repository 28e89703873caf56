"""The FUSE layer: the kernel's requests, answered (pyfuse3 is used only here and, to
start and stop the session, in ``mount``).

It turns kernel requests into calls on the metadata cache and the content cache, and
their errors into errno values. Every handler runs under ``_handler``: a deadline, one
log line per failure with the guest path, and no exception other than ``FUSEError``
ever reaches pyfuse3 (any other one would stop the whole mount). What is fetched ahead
of the requests is not decided here: the handlers tell ``readahead`` what was asked.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import stat as statmod
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from .cache.content import ContentKey
from .errors import GuestfsError, NotFound, to_errno
from .inodes import InodeTable
from .meta import MetadataCache
from .model import EMPTY_SHA256, DirEntry, FilesystemFamily, FileType, GuestStat
from .paths import (
    NAME_MAX,
    PATH_MAX,
    PosixPaths,
    contained_form,
    dotdot_after_name,
    relative_to_link,
    resolve_in_guest,
    rewrite_symlink,
)
from .readahead import Prefetcher, ReadAhead
from .readdeadline import Outcome, ReadChain

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_XATTR_PREFIX = b"user.guestfs."


class ContentStore(Prefetcher, Protocol):
    """What the FUSE layer (and, through it, read-ahead) needs of the content cache."""

    version_listener: Callable[[ContentKey, ContentKey, GuestStat | None], None] | None

    async def open(self, key: ContentKey) -> int: ...
    async def started(self, handle: int) -> None: ...
    async def read(self, handle: int, offset: int, size: int) -> bytes: ...
    def release(self, handle: int) -> None: ...
    def sha256(self, key: ContentKey) -> str | None: ...
    def transfer_time(self, key: ContentKey) -> float | None: ...


@dataclass(frozen=True)
class FsOptions:
    uid: int | None = None
    gid: int | None = None
    raw_symlinks: bool = False
    negative_ttl: float = 5.0
    timeout: float = 60.0
    prefetch: bool = True
    debug: bool = False


@dataclass
class _OpenFile:
    key: ContentKey
    handle: int | None  # None: an empty file, nothing to download
    # The requests of one read(2) share one --timeout (see readdeadline).
    reads: ReadChain


P = ParamSpec("P")
R = TypeVar("R")


def _handler(
    fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, R]]:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        t0 = time.monotonic()
        try:
            with trio.fail_after(self.opts.timeout):
                result = await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            if self.opts.debug:
                log.debug(
                    "fuse %s(%s) -> %s", name, _show_args(args),
                    errno.errorcode.get(exc.errno, exc.errno),
                )  # fmt: skip
            raise
        except trio.TooSlowError:
            self._report(name, args, f"no answer within {self.opts.timeout:g}s")
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except GuestfsError as exc:
            if not isinstance(exc, NotFound):
                self._report(name, args, str(exc))
            raise pyfuse3.FUSEError(to_errno(exc)) from exc
        except Exception as exc:
            log.exception("internal error in %s(%s)", name, _show_args(args))
            raise pyfuse3.FUSEError(to_errno(exc)) from exc
        if self.opts.debug:
            log.debug(
                "fuse %s(%s) ok %.1fms", name, _show_args(args), (time.monotonic() - t0) * 1e3
            )
        return result

    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        meta: MetadataCache,
        content: ContentStore,
        opts: FsOptions,
        *,
        nursery: trio.Nursery,
        root: str = "/",
        paths: PosixPaths | None = None,
    ) -> None:
        super().__init__()
        self.paths = paths or PosixPaths()
        self.meta = meta
        self.content = content
        self.opts = opts
        self.root = root
        self.readahead = ReadAhead(
            meta, content, nursery=nursery, root=root, paths=self.paths, prefetch=opts.prefetch
        )
        self.inodes = InodeTable(root)
        self._dirs: dict[int, tuple[str, tuple[DirEntry, ...]]] = {}
        self._files: dict[int, _OpenFile] = {}
        self._next_fh = 1
        self._last_key: dict[int, ContentKey] = {}
        self._resolved_links: dict[tuple[str, str], str] = {}
        self._reported: dict[tuple[str, str], float] = {}
        self.initialized = trio.Event()
        content.version_listener = self._version_changed

    def init(self) -> None:
        # Called by pyfuse3 when the kernel's INIT arrives, before its reply: settings the
        # kernel negotiates at INIT (read-ahead) can only be changed after this.
        self.initialized.set()

    # -- helpers --------------------------------------------------------------

    def _report(self, op: str, args: Sequence[object], message: str) -> None:
        """Log a failure once a minute per (operation, guest path)."""
        path = self._path_for_log(op, args)
        now = time.monotonic()
        key = (op, path)
        if now - self._reported.get(key, -1e9) < 60:
            return
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported[key] = now
        log.warning("%s %s: %s", op, path, message)

    def _path_for_log(self, op: str, args: Sequence[object]) -> str:
        # The first argument is a file handle or an inode, by operation.
        first = args[0] if args else None
        if not isinstance(first, int):
            return "?"
        if op in ("read", "release"):
            f = self._files.get(first)
            return f.key.path if f else "?"
        if op in ("readdir", "releasedir"):
            d = self._dirs.get(first)
            return d[0] if d else "?"
        base = self.inodes.path(first) or "?"
        if op == "lookup" and len(args) > 1 and isinstance(args[1], bytes):
            return self.paths.join(base, os.fsdecode(args[1]))
        return base

    def _path(self, ino: int) -> str:
        path = self.inodes.path(ino)
        if path is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return path

    def _symlink_text(self, path: str, st: GuestStat) -> str:
        """The target shown (and its length, for st_size), by lexical rules. ``readlink``
        may refine it with ``resolve_in_guest``; both are always contained."""
        target = st.symlink_target or ""
        if self.opts.raw_symlinks or self.paths.windows:
            return target
        return self._resolved_links.get((path, target)) or rewrite_symlink(path, target)

    def _attrs(self, ino: int, path: str, st: GuestStat) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if st.type is FileType.DIRECTORY:
            kind, default = statmod.S_IFDIR, 0o755
        elif st.type is FileType.SYMLINK:
            kind, default = statmod.S_IFLNK, 0o777
        else:
            kind, default = statmod.S_IFREG, 0o644
        perm = default if st.permissions is None else st.permissions & 0o7777
        if st.family is FilesystemFamily.WINDOWS and st.read_only:
            perm &= ~0o222
        if kind == statmod.S_IFLNK:
            perm = 0o777
            size = len(os.fsencode(self._symlink_text(path, st)))
        else:
            size = max(st.size, 0)
        a.st_mode = kind | perm
        a.st_nlink = 1  # unknown subdirectory count: 1 tells fts/find not to rely on it
        a.st_uid = self.opts.uid if self.opts.uid is not None else _id_or(st.owner, os.getuid())
        a.st_gid = self.opts.gid if self.opts.gid is not None else _id_or(st.group, os.getgid())
        a.st_size = size
        a.st_blocks = (size + 511) // 512
        a.st_blksize = 128 * 1024
        a.st_atime_ns = st.atime_ns
        a.st_mtime_ns = st.mtime_ns
        a.st_ctime_ns = st.mtime_ns
        a.entry_timeout = self._entry_timeout()
        a.attr_timeout = a.entry_timeout
        return a

    def _entry_timeout(self) -> float:
        # The kernel takes no infinity (a frozen view): a day is as good as for ever.
        return self.meta.ttl if self.meta.ttl != float("inf") else 86400.0

    def _partial_attrs(self, ino: int, e: DirEntry) -> pyfuse3.EntryAttributes:
        """Attributes known from a listing only (type, size). ``attr_timeout = 0`` makes
        the kernel ask ``getattr`` before it shows any of them to a program."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        kind = {
            FileType.DIRECTORY: statmod.S_IFDIR | 0o555,
            FileType.SYMLINK: statmod.S_IFLNK | 0o777,
            FileType.FILE: statmod.S_IFREG | 0o444,
        }[e.type]
        a.st_mode = kind
        a.st_nlink = 1
        a.st_uid = self.opts.uid if self.opts.uid is not None else os.getuid()
        a.st_gid = self.opts.gid if self.opts.gid is not None else os.getgid()
        a.st_size = max(e.size, 0) if e.type is FileType.FILE else 0
        a.st_blocks = (a.st_size + 511) // 512
        a.entry_timeout = self._entry_timeout()
        a.attr_timeout = 0
        return a

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0  # a negative entry: the kernel remembers "no such name"
        a.entry_timeout = min(self.opts.negative_ttl, self.meta.ttl)
        return a

    def _version_changed(
        self, old: ContentKey, new: ContentKey, stat: GuestStat | None
    ) -> None:
        """A transfer found ``old.path`` changed since its stat: show the version fetched
        (runs on the loop before any of its bytes is served)."""
        path = old.path
        known = self.meta.cached_stat(path)
        if stat is None and known is not None:
            # REST gives no stat with the URL: the length is certain, the mtime is not.
            stat = dataclasses.replace(known, size=new.size, mtime_ns=new.mtime_ns)
        if stat is not None:
            self.meta.replace(path, stat)  # --frozen too: nothing of the old one was read
        ino = self.inodes.inode(path)
        if self._last_key.get(ino) == old:
            self._last_key[ino] = new
        for f in self._files.values():
            if f.key == old:
                f.key = new
        try:
            # Attributes only: never the pages (that could wait on a read we serve).
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError:
            pass  # the kernel does not know the inode (a prefetch): nothing to update

    # -- metadata ---------------------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        if name == b".":
            path = parent
        elif name == b"..":
            path = self.paths.parent(parent) if parent != self.root else parent
        else:
            sname = os.fsdecode(name)
            if not self.paths.is_safe_name(sname):
                raise pyfuse3.FUSEError(errno.ENOENT)
            known = self.meta.entry(parent, sname)
            if self.paths.case_insensitive and not isinstance(known, DirEntry):
                # One name, one inode: resolve "readme.TXT" to the listed "README.txt".
                if known is None:
                    await self.meta.listdir(parent)
                known = self.meta.entry_casefold(parent, sname)
                if isinstance(known, DirEntry):
                    sname = known.name
            path = self.paths.join(parent, sname)
            if known is False:
                return self._negative()
            if isinstance(known, DirEntry) and self.meta.cached_stat(path) is None:
                ino = self.inodes.inode(path)
                attrs = self._partial_attrs(ino, known)
                self.inodes.add_lookup(ino)
                return attrs
        try:
            st = await self.meta.stat(path)
        except NotFound:
            return self._negative()
        ino = self.inodes.inode(path)
        attrs = self._attrs(ino, path, st)
        if name not in (b".", b".."):
            self.inodes.add_lookup(ino)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            try:
                if self.inodes.forget(ino, n):
                    self._last_key.pop(ino, None)
            except Exception:  # forget must never raise
                log.exception("forget(%d, %d)", ino, n)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        st = self.meta.cached_stat(path)
        if st is None:
            self.readahead.on_getattr(path)
            st = await self.meta.stat(path)
        return self._attrs(inode, path, st)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._path(inode)
        st = await self.meta.stat(path)
        if st.type is not FileType.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        target = st.symlink_target or ""
        if (
            not self.opts.raw_symlinks
            and not self.paths.windows
            and not contained_form(path, target)
            and dotdot_after_name(target)
        ):
            # Lexical rules could be fooled by a symlink before a "..": ask the guest.
            resolved = relative_to_link(path, await resolve_in_guest(path, target, self.meta.stat))
            if len(self._resolved_links) > 100_000:
                self._resolved_links.clear()
            self._resolved_links[(path, target)] = resolved
        text = os.fsencode(self._symlink_text(path, st))
        if len(text) >= PATH_MAX:
            # The kernel refuses a longer reply (EIO and a pyfuse3 error line); say why.
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        return text

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Without default_permissions the guest decides who reads what; only writes
        # are known to fail.
        return not mode & os.W_OK

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statfs_data()

    # -- directories --------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        entries = await self.meta.listdir(path)
        self.readahead.on_opendir(path)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (path, entries)
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        snap = self._dirs.get(fh)
        if snap is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        path, entries = snap
        for i in range(start_id, len(entries)):
            e = entries[i]
            child = self.paths.join(path, e.name)
            ino = self.inodes.inode(child)
            st = self.meta.cached_stat(child)
            attrs = self._attrs(ino, child, st) if st else self._partial_attrs(ino, e)
            if not pyfuse3.readdir_reply(token, os.fsencode(e.name), attrs, i + 1):
                break
            self.inodes.add_lookup(ino)

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files ----------------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self._path(inode)
        st = await self.meta.stat(path)
        if st.type is FileType.DIRECTORY:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if st.type is FileType.SYMLINK:
            raise pyfuse3.FUSEError(errno.ELOOP)
        key = ContentKey(path, st.size, st.mtime_ns)
        handle = None
        if st.size != 0:
            handle = await self.content.open(key)
            try:
                # The transfer may find another version: it is shown before the first read.
                await self.content.started(handle)
            except BaseException:
                self.content.release(handle)
                raise
            now = self.meta.cached_stat(path)  # _version_changed updated it if it changed
            if now is not None and (now.size, now.mtime_ns) != (key.size, key.mtime_ns):
                key = ContentKey(path, now.size, now.mtime_ns)
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = _OpenFile(key, handle, ReadChain(self.opts.timeout))
        # Pages cached by the kernel stay valid only while the version is the same.
        keep = self._last_key.get(inode) == key
        self._last_key[inode] = key
        self.readahead.on_open(path)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if f.handle is None:
            return b""
        req = f.reads.begin(off, size, trio.current_time())
        outcome = Outcome.ERROR
        try:
            # TooSlowError becomes ETIMEDOUT in _handler, as for its own deadline.
            with trio.fail_at(req.deadline):
                # The cache knows the length of the version fetched, which may not be f.key's.
                data = await self.content.read(f.handle, off, size)
            outcome = Outcome.OK
            return data
        except BaseException:
            # Ours or _handler's (the same instant for a fresh chain) deadline: TooSlowError
            # or Cancelled, whichever scope caught it.
            if trio.current_time() >= req.deadline:
                outcome = Outcome.TIMEOUT
            raise
        finally:
            f.reads.end(req, outcome, trio.current_time())

    @_handler
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None and f.handle is not None:
            self.content.release(f.handle)

    # -- xattrs -------------------------------------------------------------------------

    async def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        path = self._path(inode)
        out = {b"user.guestfs.guest_path": os.fsencode(path)}
        key = self._last_key.get(inode)
        st = await self.meta.stat(path)
        if key is not None and (st.size, st.mtime_ns) == (key.size, key.mtime_ns):
            digest = EMPTY_SHA256 if key.size == 0 else self.content.sha256(key)
            if digest:
                out[b"user.guestfs.sha256"] = digest.encode()
            when = self.content.transfer_time(key)
            if when is not None:
                iso = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")
                out[b"user.guestfs.transfer_time"] = iso.replace("+00:00", "Z").encode()
        if st.family is FilesystemFamily.WINDOWS:
            if st.hidden is not None:
                out[b"user.guestfs.hidden"] = b"1" if st.hidden else b"0"
            if st.read_only is not None:
                out[b"user.guestfs.read_only"] = b"1" if st.read_only else b"0"
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # `ls -l` asks for security.selinux and system.posix_acl_access on every entry:
        # answer those without the handler machinery (nothing here can raise otherwise).
        if not name.startswith(_XATTR_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self._getxattr(inode, name)

    @_handler
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        value = (await self._xattrs(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(await self._xattrs(inode))

    # Writes never get here: the mount is 'ro', so the kernel answers EROFS itself.


def statfs_data() -> pyfuse3.StatvfsData:
    """``statfs`` of a read-only mount with no size of its own (also the fleet's)."""
    s = pyfuse3.StatvfsData()
    s.f_bsize = s.f_frsize = 4096
    s.f_blocks = s.f_bfree = s.f_bavail = 0
    s.f_files = s.f_ffree = s.f_favail = 0
    s.f_namemax = NAME_MAX
    return s


def _show_args(args: Sequence[object]) -> str:
    # Request contexts and readdir tokens say nothing useful in a log line.
    return ", ".join(
        repr(a) for a in args if not isinstance(a, (pyfuse3.RequestContext, pyfuse3.ReaddirToken))
    )


def _id_or(value: int | None, default: int) -> int:
    return default if value is None or value < 0 or value > 0xFFFFFFFE else value

"""The fleet's FUSE layer (pyfuse3 is used here, as in ``fs``): the root of VMs,
``.by-id``, each VM's directory, and everything below handed to that VM's own
``fs.Operations``.

Inode numbers come from one :class:`~.space.InodeSpace`, so the VM of any inode is
known; file handles are the fleet's own and map to the VM's. What the root and the VM
directories show comes from the inventory alone: listing ``/mnt/vc`` or stat'ing a VM
directory costs no guest call. The first request *inside* a VM's directory opens the
VM (:meth:`FleetVm.ready`); a VM that cannot be opened answers its errno there, and
its reason in ``user.guestfs.error`` on its directory, without touching any other VM.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import posixpath
import stat as statmod
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from ..errors import GuestfsError, NotFound, to_errno
from ..fs import FsOptions, Operations, statfs_data
from ..inodes import ROOT_INODE
from ..paths import NAME_MAX
from .names import BY_ID
from .readahead import FleetReadAhead, relative_path
from .space import FLEET, InodeSpace
from .vm import FleetVm

log = logging.getLogger(__name__)

__all__ = ["FleetOperations", "FleetTree"]

_XATTR_PREFIX = b"user.guestfs."


class FleetTree:
    """What the fleet FUSE layer needs of the inventory (see ``fleet.serve``)."""

    async def current(self) -> dict[str, FleetVm]:
        """Directory name -> VM, refreshed when older than its TTL."""
        raise NotImplementedError

    def by_id(self, vm: str) -> FleetVm | None:
        raise NotImplementedError

    @property
    def ttl(self) -> float:
        raise NotImplementedError

    @property
    def refreshed(self) -> float:
        raise NotImplementedError


@dataclass
class _Listing:
    entries: list[tuple[bytes, int, pyfuse3.EntryAttributes]]


@dataclass
class _Delegated:
    ops: Operations
    fh: int


P = ParamSpec("P")
R = TypeVar("R")


def _handler(
    fn: Callable[Concatenate[FleetOperations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[FleetOperations, P], Coroutine[Any, Any, R]]:
    """No exception but FUSEError reaches pyfuse3 (another one would stop the mount);
    a VM's own requests keep the deadline and logging of ``fs._handler`` inside."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: FleetOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with trio.fail_after(self.opts.timeout):
                return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except trio.TooSlowError:
            log.warning("%s: no answer within %gs", name, self.opts.timeout)
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except GuestfsError as exc:
            if not isinstance(exc, NotFound):
                log.debug("%s: %s", name, exc)
            raise pyfuse3.FUSEError(to_errno(exc)) from exc
        except Exception as exc:
            log.exception("internal error in fleet %s", name)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


class FleetOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        tree: FleetTree,
        space: InodeSpace,
        opts: FsOptions,
        readahead: FleetReadAhead | None = None,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.readahead = readahead  # told what the user reached in which VM (see .readahead)
        self.space = space
        self.opts = opts
        self.by_id_ino = space.inode(FLEET, BY_ID)
        self._handles: dict[int, _Listing | _Delegated] = {}
        self._files: dict[int, _Delegated] = {}
        self._next_fh = 1
        self.initialized = trio.Event()
        self.started = time.time()

    def init(self) -> None:
        self.initialized.set()

    # -- attributes of the fleet's own entries -----------------------------------------

    def _base(self, ino: int, mode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = mode
        a.st_nlink = 1
        a.st_uid = self.opts.uid if self.opts.uid is not None else os.getuid()
        a.st_gid = self.opts.gid if self.opts.gid is not None else os.getgid()
        when = int(self.tree.refreshed * 1e9) or int(self.started * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = when
        a.st_blksize = 4096
        # The names change with the inventory: the kernel keeps them as long as it does.
        a.entry_timeout = a.attr_timeout = self.tree.ttl
        return a

    def _dir_attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        return self._base(ino, statmod.S_IFDIR | 0o555)

    def _link_attrs(self, ino: int, target: bytes) -> pyfuse3.EntryAttributes:
        a = self._base(ino, statmod.S_IFLNK | 0o777)
        a.st_size = len(target)
        return a

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = min(self.opts.negative_ttl, self.tree.ttl)
        return a

    @staticmethod
    def _link_target(vm: FleetVm) -> bytes:
        return b"../" + os.fsencode(vm.dirname)

    # -- who owns an inode -----------------------------------------------------------

    def _owner(self, ino: int) -> tuple[FleetVm | None, str]:
        key = self.space.key(ino)
        if key is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        owner, path = key
        if owner == FLEET:
            return None, path
        vm = self.tree.by_id(owner)
        if vm is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return vm, path

    def _vm_ops(self, vm: FleetVm, path: str) -> Operations:
        ops = vm.ops_for(path)
        if ops is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return ops

    async def _root_entries(self) -> list[tuple[bytes, int, pyfuse3.EntryAttributes]]:
        vms = await self.tree.current()
        out = [(BY_ID.encode(), self.by_id_ino, self._dir_attrs(self.by_id_ino))]
        names = sorted(vms)
        for name in names:
            vm = vms[name]
            out.append((os.fsencode(name), vm.dir_ino, self._dir_attrs(vm.dir_ino)))
        if self.readahead is not None:
            self.readahead.on_listing([vms[n] for n in names])
        return out

    async def _by_id_entries(self) -> list[tuple[bytes, int, pyfuse3.EntryAttributes]]:
        vms = await self.tree.current()
        out = []
        for vm in sorted(vms.values(), key=lambda v: v.vm):
            ino = self.space.inode(FLEET, f"{BY_ID}/{vm.vm}")
            out.append((os.fsencode(vm.vm), ino, self._link_attrs(ino, self._link_target(vm))))
        return out

    async def _drive_entries(self, vm: FleetVm) -> list[tuple[bytes, int, pyfuse3.EntryAttributes]]:
        out = []
        for letter in vm.drive_letters():
            ops = await vm.drive(letter)
            ino = ops.inodes.inode(ops.root)
            out.append((letter.encode(), ino, await ops.getattr(ino, _NO_CTX)))
        return out

    # -- metadata --------------------------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        vm, path = self._owner(parent_inode)
        if vm is None:
            return await self._lookup_fleet(parent_inode, path, name)
        if name not in (b".", b".."):
            # Before this VM answers (its open may take a while): a glob's next VMs
            # are read ahead meanwhile.
            self._looking_up(vm, parent_inode, name)
            if parent_inode == vm.dir_ino and not vm.roots and not _drive_like(name):
                # `/mnt/vc/*/root/...` reaches every Windows VM too: vCenter alone says
                # there is no such drive (no guest login for nothing).
                try:
                    windows = await vm.identify() == "windows"
                except GuestfsError:
                    windows = False  # the open below will say what is wrong
                if windows:
                    return self._negative()
        await vm.ready()
        if parent_inode == vm.dir_ino and vm.windows:
            if name in (b".", b".."):
                return self._dir_attrs(parent_inode if name == b"." else ROOT_INODE)
            try:
                ops = await vm.drive(os.fsdecode(name))
            except NotFound:
                return self._negative()
            ino = ops.inodes.inode(ops.root)
            return await ops.getattr(ino, ctx)
        if parent_inode == vm.dir_ino and name == b"..":
            return self._dir_attrs(ROOT_INODE)
        return await self._vm_ops(vm, path).lookup(parent_inode, name, ctx)

    def _looking_up(self, vm: FleetVm, parent_inode: int, name: bytes) -> None:
        """Tell read-ahead (found or not: a glob reaches every VM either way)."""
        if self.readahead is None:
            return
        text = os.fsdecode(name)
        if parent_inode == vm.dir_ino:
            self.readahead.on_lookup(vm, "/" + text)
            return
        key = self.space.key(parent_inode)
        if key is not None and key[0] == vm.vm and key[1]:
            self.readahead.on_lookup(vm, posixpath.join(relative_path(vm, key[1]), text))

    async def _lookup_fleet(self, parent: int, path: str, name: bytes) -> pyfuse3.EntryAttributes:
        if name in (b".", b".."):
            return self._dir_attrs(parent if name == b"." else ROOT_INODE)
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        text = os.fsdecode(name)
        if parent == ROOT_INODE:
            if text == BY_ID:
                return self._dir_attrs(self.by_id_ino)
            vm = (await self.tree.current()).get(text)
            return self._dir_attrs(vm.dir_ino) if vm is not None else self._negative()
        if parent == self.by_id_ino:
            found = self.tree.by_id(text)
            if found is None or found not in (await self.tree.current()).values():
                return self._negative()
            ino = self.space.inode(FLEET, f"{BY_ID}/{found.vm}")
            return self._link_attrs(ino, self._link_target(found))
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            try:
                key = self.space.key(ino)
                if key is None or key[0] == FLEET:
                    continue
                vm = self.tree.by_id(key[0])
                ops = vm.ops_for(key[1]) if vm is not None else None
                if ops is not None:
                    await ops.forget([(ino, n)])
            except Exception:  # forget must never raise
                log.exception("forget(%d, %d)", ino, n)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        vm, path = self._owner(inode)
        if vm is None:
            if path.startswith(BY_ID + "/"):
                target = self.tree.by_id(path[len(BY_ID) + 1 :])
                if target is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return self._link_attrs(inode, self._link_target(target))
            return self._dir_attrs(inode)
        if inode == vm.dir_ino:
            return self._dir_attrs(inode)
        await vm.ready()
        return await self._vm_ops(vm, path).getattr(inode, ctx)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        vm, path = self._owner(inode)
        if vm is None:
            target = (
                self.tree.by_id(path[len(BY_ID) + 1 :]) if path.startswith(BY_ID + "/") else None
            )
            if target is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return self._link_target(target)
        if inode == vm.dir_ino:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await vm.ready()
        return await self._vm_ops(vm, path).readlink(inode, ctx)

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statfs_data()

    # -- directories -------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        vm, path = self._owner(inode)
        handle: _Listing | _Delegated
        if vm is None:
            if inode == ROOT_INODE:
                handle = _Listing(await self._root_entries())
            elif inode == self.by_id_ino:
                handle = _Listing(await self._by_id_entries())
            else:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        else:
            await vm.ready()
            if inode == vm.dir_ino and vm.windows:
                handle = _Listing(await self._drive_entries(vm))
            else:
                ops = self._vm_ops(vm, path)
                handle = _Delegated(ops, await ops.opendir(inode, ctx))
        fh = self._new_fh()
        self._handles[fh] = handle
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if isinstance(handle, _Delegated):
            await handle.ops.readdir(handle.fh, start_id, token)
            return
        for i in range(start_id, len(handle.entries)):
            name, _, attrs = handle.entries[i]
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    @_handler
    async def releasedir(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _Delegated):
            await handle.ops.releasedir(handle.fh)

    # -- files -----------------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        vm, path = self._owner(inode)
        if vm is None or inode == vm.dir_ino:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await vm.ready()
        ops = self._vm_ops(vm, path)
        info = await ops.open(inode, flags, ctx)
        fh = self._new_fh()
        self._files[fh] = _Delegated(ops, info.fh)
        info.fh = fh
        if self.readahead is not None:
            found = self.space.key(inode)
            if found is not None and found[0] == vm.vm:
                self.readahead.on_open(vm, relative_path(vm, found[1]))
        return info

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await f.ops.read(f.fh, off, size)

    @_handler
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            await f.ops.release(f.fh)

    # -- xattrs ----------------------------------------------------------------------

    def _vm_xattrs(self, vm: FleetVm) -> dict[bytes, bytes]:
        out = {
            b"user.guestfs.vm": vm.vm.encode(),
            b"user.guestfs.vm_name": os.fsencode(vm.name.replace("\0", "\\0")),
            b"user.guestfs.state": vm.state.encode(),
        }
        err = vm.error()
        if err is not None:
            out[b"user.guestfs.error"] = str(err).encode("utf-8", "replace")
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(_XATTR_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self._getxattr(inode, name, ctx)

    @_handler
    async def _getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        vm, path = self._owner(inode)
        if vm is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if inode == vm.dir_ino:
            value = self._vm_xattrs(vm).get(name)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value
        await vm.ready()
        return await self._vm_ops(vm, path).getxattr(inode, name, ctx)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        vm, path = self._owner(inode)
        if vm is None:
            return []
        if inode == vm.dir_ino:
            return list(self._vm_xattrs(vm))
        await vm.ready()
        return await self._vm_ops(vm, path).listxattr(inode, ctx)


def _drive_like(name: bytes) -> bool:
    return len(name) == 1 and name.isalpha()


class _NoContext:
    """``fs.Operations.getattr`` ignores its context; the drive listing has none."""


_NO_CTX: Any = _NoContext()

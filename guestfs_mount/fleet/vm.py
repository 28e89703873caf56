"""One VM of a fleet mount: its single-VM machinery, built on first use, or why not.

Nothing here runs before a program looks inside the VM's directory: then the VM is
*opened* once (its family and whether Tools runs: from the inventory listing when it is
vim25's, which has both, else from vCenter the guest identity: its family, and proof
that Tools runs; without one, the power and Tools state and the configured guest OS,
asked at once; the first credential rule that matches; one guest call proving the
login: the listing of a Linux guest's ``/``, the stat of a Windows guest's first
drive), and from then on it has what a single-VM mount has: a ``_Guest`` binding, a
metadata cache, read-ahead and an ``fs.Operations`` per guest root (Linux ``/``; Windows
one per drive letter), all sharing the fleet's content cache, client and nursery. A VM
that cannot be opened keeps the reason (:class:`VmUnavailable`, with the errno the
kernel is given): a refused login for the life of the mount, anything else for
``retry_after`` seconds.
"""

from __future__ import annotations

import errno
import logging
import math
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..cache.content import ContentCache, ContentKey
from ..errors import (
    CircuitOpen,
    GuestAuthFailed,
    GuestfsError,
    InvalidArgument,
    NotAllowedInCurrentState,
    NotFound,
    ServiceUnavailable,
    Unauthenticated,
    Unauthorized,
)
from ..evidence.ledger import Ledger, RecordingBackend
from ..fs import FsOptions, Operations
from ..meta import MetadataCache
from ..model import FileType, GuestStat, PowerState
from ..paths import PosixPaths, WindowsPaths
from ..vcenter.client import VCenterClient
from ..vcenter.inventory import InventoryVm, configured_family, family_of, running_family
from ..vcenter.soap import SoapTransport
from ..vcenter.vi_json import ViJsonTransport
from ..vcenter.vim_inventory import read_vm
from .options import FleetOptions
from .space import InodeSpace, VmInodes

log = logging.getLogger(__name__)

__all__ = ["FleetVm", "VmContent", "VmUnavailable", "content_path", "split_content_path"]

_SEP = "\0"  # between VM id and guest path in a shared-cache key: no guest path holds NUL


def content_path(vm: str, path: str) -> str:
    return f"{vm}{_SEP}{path}"


def split_content_path(key_path: str) -> tuple[str, str]:
    vm, sep, path = key_path.partition(_SEP)
    if not sep:
        raise ValueError(f"not a fleet cache key: {key_path!r}")
    return vm, path


class VmUnavailable(GuestfsError):
    """A VM that cannot be read now; ``errno`` is what its directory answers."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class _Failure:
    error: VmUnavailable
    until: float  # trio.current_time(); inf: for the life of the mount


class VmContent:
    """The shared content cache as one VM (root) sees it: the keys it is given are
    that VM's guest paths; the cache's are prefixed with the VM id, so two VMs' equal
    files (same path, size and mtime) never share an entry."""

    def __init__(self, cache: ContentCache, vm: str) -> None:
        self._cache = cache
        self._vm = vm
        self.version_listener: Callable[[ContentKey, ContentKey, GuestStat | None], None] | None = (
            None
        )

    def _key(self, key: ContentKey) -> ContentKey:
        return ContentKey(content_path(self._vm, key.path), key.size, key.mtime_ns)

    async def open(self, key: ContentKey) -> int:
        return await self._cache.open(self._key(key))

    async def started(self, handle: int) -> None:
        await self._cache.started(handle)

    async def read(self, handle: int, offset: int, size: int) -> bytes:
        return await self._cache.read(handle, offset, size)

    def release(self, handle: int) -> None:
        self._cache.release(handle)

    def sha256(self, key: ContentKey) -> str | None:
        return self._cache.sha256(self._key(key))

    def transfer_time(self, key: ContentKey) -> float | None:
        return self._cache.transfer_time(self._key(key))

    async def prefetch(self, key: ContentKey) -> bool:
        return await self._cache.prefetch(self._key(key))


@dataclass
class FleetContext:
    """What every VM of the mount shares."""

    client: VCenterClient
    content: ContentCache
    nursery: trio.Nursery
    space: InodeSpace
    fs: FsOptions
    options: FleetOptions
    metadata_ttl: float
    frozen: bool
    in_folder: Callable[[str, str], bool]  # (vm id, folder path) -> member?
    guest_factory: Callable[[VCenterClient, str, PosixPaths], object] = field(repr=False)


async def _first_error(*fns: Callable[[], Awaitable[object]] | None) -> None:
    """Run ``fns`` at once; raise the error of the first one (in argument order) that
    failed, once all are done."""
    errors: list[BaseException | None] = [None] * len(fns)

    async def one(i: int, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
        except (GuestfsError, trio.TooSlowError) as exc:
            errors[i] = exc

    async with trio.open_nursery() as nursery:
        for i, fn in enumerate(fns):
            if fn is not None:
                nursery.start_soon(one, i, fn)
    for exc in errors:
        if exc is not None:
            raise exc


def _classify(exc: BaseException, vm: str) -> VmUnavailable:
    text = str(exc)
    if isinstance(exc, (GuestAuthFailed, Unauthenticated, Unauthorized)):
        return VmUnavailable(f"guest login refused: {text}", errno.EACCES)
    if isinstance(exc, (NotAllowedInCurrentState, ServiceUnavailable, CircuitOpen)):
        return VmUnavailable(text, errno.EHOSTDOWN)
    if isinstance(exc, trio.TooSlowError):
        return VmUnavailable(f"VM {vm}: no answer while opening it", errno.EIO)
    return VmUnavailable(text or type(exc).__name__, errno.EIO)


class FleetVm:
    def __init__(self, ctx: FleetContext, vm: str, name: str, dirname: str) -> None:
        self.ctx = ctx
        self.vm = vm
        self.name = name  # as vCenter has it (guest-controlled: escape before showing)
        self.dirname = dirname
        self.dir_ino = ctx.space.inode(vm, "")
        self.family: str | None = None
        self.windows = False
        self.user: str | None = None
        self.roots: dict[str, Operations] = {}  # guest root ("/", "C:\\") -> its operations
        self.meta: MetadataCache | None = None
        self.guest: object | None = None
        self.ledger: Ledger | None = None  # what was seen in it (guestfs-mount evidence)
        self.failure: _Failure | None = None
        self.gone: VmUnavailable | None = None  # --frozen: left the listing, directory kept
        self.opened_at: float | None = None
        self._lock = trio.Lock()
        self._identity_lock = trio.Lock()
        self._identified = False  # the guest identity was asked
        self._running = False  # ... and answered: Tools runs
        self._listed: InventoryVm | None = None  # a vim25 listing's word on it

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.gone is not None:
            return "gone"
        if self.roots:
            return "ready"
        if self.failure is not None:
            return "failed"
        return "untouched"

    def error(self) -> VmUnavailable | None:
        if self.gone is not None:
            return self.gone
        return self.failure.error if self.failure is not None else None

    def snapshot(self) -> dict[str, object]:
        err = self.error()
        return {
            "dir": self.dirname,
            "vm": self.vm,
            "name": self.name,
            "state": self.state,
            "family": self.family,
            "guest_user": self.user,
            "roots": sorted(self.roots),
            "error": str(err) if err is not None else None,
            "errno": errno.errorcode.get(err.errno) if err is not None else None,
            "metadata": dict(self.meta.counters) if self.meta is not None else None,
        }

    # -- opening ---------------------------------------------------------------------

    async def ready(self) -> None:
        """Open the VM unless it is open; raise its :class:`VmUnavailable` if it cannot
        be (remembered, so a burst of lookups costs one attempt)."""
        if self.gone is not None:
            raise self.gone
        if self.roots:
            return
        async with self._lock:
            if self.roots:
                return
            f = self.failure
            if f is not None and trio.current_time() < f.until:
                raise f.error
            try:
                with trio.fail_after(self.ctx.fs.timeout * 0.9):
                    await self._open()
            except VmUnavailable as exc:
                self._fail(exc, math.inf if exc.errno == errno.EACCES else None)
                raise
            except (GuestfsError, trio.TooSlowError) as exc:
                err = _classify(exc, self.vm)
                self._fail(err, math.inf if err.errno == errno.EACCES else None)
                raise err from exc
            self.failure = None
            self.opened_at = trio.current_time()

    async def identify(self) -> str | None:
        """The guest family as vCenter reports it while Tools runs (one vCenter call,
        asked once; no guest call): enough to answer that a Windows VM's directory has
        no ``root`` (only drive letters), without a guest login. None: not known."""
        if self.family is None and not self._identified:
            async with self._identity_lock:
                if self.family is None and not self._identified:
                    rest = await self.ctx.client.inventory_transport()
                    family = await running_family(rest, self.vm)
                    self._identified = True
                    if family is not None:
                        self.family, self._running = family, True
        return self.family

    def listed(self, v: InventoryVm) -> None:
        """What the last inventory listing said of the VM. A vim25 listing has its
        family and Tools state: opening it then asks vCenter nothing (REST's has
        neither; they are asked when the VM is opened)."""
        if v.tools_running is None:
            self._listed = None
            return
        self._listed = v
        self._identified = True  # identify() answers from the listing
        if not self.roots and v.family is not None:
            self.family = v.family

    def _not_ready(self, v: InventoryVm) -> VmUnavailable | None:
        """Why the listing says the VM cannot answer guest operations, or None."""
        if v.power_state is not PowerState.POWERED_ON:
            word = "powered off" if v.power_state is PowerState.POWERED_OFF else "suspended"
            return VmUnavailable(f"VM {self.vm} is {word}", errno.EHOSTDOWN)
        if not v.tools_running:
            return VmUnavailable(
                f"VMware Tools is not running in VM {self.vm} (inventory listing;"
                f" listed again every {self.ctx.options.inventory_ttl:g} s)",
                errno.EHOSTDOWN,
            )
        return None

    async def _relisted(self) -> VmUnavailable | None:
        """Read the VM's own entry again (one property collector call): None if it can
        answer now, else why not."""
        t = await self.ctx.client.transport()
        if not isinstance(t, (ViJsonTransport, SoapTransport)):
            return None if self._listed is None else self._not_ready(self._listed)
        fresh = await read_vm(t, self.vm)
        if fresh is None:
            return VmUnavailable(f"VM {self.vm} is no longer in the inventory", errno.EHOSTDOWN)
        self.listed(fresh)
        return self._not_ready(fresh)

    def _fail(self, err: VmUnavailable, until: float | None) -> None:
        self._running = False  # a retry asks vCenter again why not
        when = until if until is not None else trio.current_time() + self.ctx.options.retry_after
        self.failure = _Failure(err, when)
        log.warning("VM %s (%s): %s", self.dirname, self.vm, err)

    async def _open(self) -> None:
        ctx = self.ctx
        client = ctx.client
        # From vCenter, not the guest: the guest family (the credential rules need it)
        # and whether Tools runs. A guest call to a VM without Tools is retried as
        # "busy" for the whole retry budget: such a VM must fail here, at once.
        listed = self._listed
        if listed is not None:  # a vim25 listing told both: no call
            why = self._not_ready(listed)
            if why is not None and self.failure is not None:
                # A retry: the VM may have started (or Tools) since the listing was read.
                why = await self._relisted()
            if why is not None:
                raise why
        else:
            # The guest identity answers both in one call while Tools runs.
            await self.identify()
            if not self._running:  # why not (powered off, no Tools), the configured family
                rest = await client.inventory_transport()
                await _first_error(
                    lambda: rest.check_guest(self.vm),
                    self._learn_family if self.family is None else None,
                )
        match = next(
            (
                c
                for c in ctx.options.credentials
                if c.matches(self.name, self.family, lambda f: ctx.in_folder(self.vm, f))
            ),
            None,
        )
        if match is None:
            raise VmUnavailable(
                f"no [[guest_credentials]] rule matches VM {self.vm}"
                f" (family {self.family or 'unknown'})",
                errno.EACCES,
            )
        self.user = match.creds.user_name
        client.set_guest_credentials(self.vm, match.creds)
        if self.family != "windows":
            try:
                # One guest call proves the login and is the listing the first lookup
                # in the VM needs (`/mnt/vc/*/etc/...`).
                await self._open_posix()
                return
            except (NotFound, InvalidArgument):
                if self.family is not None:
                    raise
                # vCenter could not tell the family: a Windows guest has no "/".
        root = "C:\\"
        st = await client.stat(self.vm, root)
        if st.type is not FileType.DIRECTORY:
            raise VmUnavailable(
                f"guest root {root!r} of VM {self.vm} is not a directory", errno.EIO
            )
        self.windows = True
        meta = self._build(WindowsPaths(), root)
        assert self.ledger is not None
        self.ledger.saw(root, st)
        meta.seed(root, st)
        self._add_root(root)

    async def _learn_family(self) -> None:
        rest = await self.ctx.client.inventory_transport()
        # The identity had no answer (asked by identify()): the configured guest OS.
        self.family = await (configured_family if self._identified else family_of)(rest, self.vm)

    async def _open_posix(self) -> None:
        self.windows = False
        meta = self._build(PosixPaths(), "/")
        try:
            await meta.listdir("/")
        except BaseException:
            self.guest = self.meta = self.ledger = None
            raise
        self._add_root("/")

    def _build(self, paths: PosixPaths, root: str) -> MetadataCache:
        ctx = self.ctx
        client = ctx.client
        guest = ctx.guest_factory(client, self.vm, paths)
        ledger = Ledger(root=root, paths=paths)
        meta = MetadataCache(
            RecordingBackend(guest, ledger),
            nursery=ctx.nursery,
            ttl=ctx.metadata_ttl,
            negative_ttl=ctx.fs.negative_ttl,
            frozen=ctx.frozen,
            paths=paths,
            stat_by_listing=client.transport_name in ("vi-json", "soap"),
        )
        guest.on_stat = meta.seed  # type: ignore[attr-defined]
        self.guest, self.meta, self.ledger = guest, meta, ledger
        return meta

    def _add_root(self, root: str) -> Operations:
        ctx = self.ctx
        assert self.meta is not None
        view = VmContent(ctx.content, self.vm)
        ops = Operations(
            self.meta, view, ctx.fs, root=root, paths=self.meta.paths, nursery=ctx.nursery
        )
        ops.inodes = VmInodes(ctx.space, self.vm)
        if not self.windows:
            ctx.space.alias(self.vm, root, self.dir_ino)  # the VM's directory is its "/"
        ops.initialized.set()  # the fleet answers INIT; nothing per VM waits for it
        self.roots[root] = ops
        return ops

    # -- Windows drives ----------------------------------------------------------------

    def drive_letters(self) -> list[str]:
        return sorted(r[0] for r in self.roots)

    async def drive(self, letter: str) -> Operations:
        """The operations of drive ``letter`` (``C``), opened once its root stats."""
        letter = letter.upper()
        if len(letter) != 1 or letter not in string.ascii_uppercase:
            raise NotFound(f"{letter!r} is not a drive letter")
        root = f"{letter}:\\"
        ops = self.roots.get(root)
        if ops is not None:
            return ops
        assert self.meta is not None
        st = await self.meta.stat(root)
        if st.type is not FileType.DIRECTORY:
            raise NotFound(f"drive {root} of VM {self.vm}")
        return self.roots.get(root) or self._add_root(root)

    def ops_for(self, path: str) -> Operations | None:
        """The operations serving guest ``path`` of this VM."""
        if not self.windows:
            return self.roots.get("/")
        return self.roots.get(path[:1].upper() + ":\\")

"""A fleet mount's lifecycle (``--all-vms``): the inventory, the shared caches, mount,
serve, unmount, on one ``AsyncExitStack`` as in :func:`guestfs_mount.mount.serve`.

At start only vCenter is contacted (its session, the first inventory listing); no
guest. One client (one HTTP session, one lane per VM), one content cache, one nursery
serve every VM; each VM's own machinery is built when it is first used
(:mod:`.vm`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyfuse3
import trio

from .. import mount as m
from ..audit import AuditLog
from ..cache.content import ContentCache, ContentKey, OnStart, Sink, TransferEvent
from ..control import socket_path
from ..errors import ConfigError, GuestfsError, NotFound
from ..evidence.ledger import transfer_hook
from ..model import GuestStat, TransferResult
from ..vcenter.client import VCenterClient
from ..vcenter.inventory import InventoryVm, folder_subtree, list_vms
from ..vcenter.soap import SoapTransport
from ..vcenter.vi_json import ViJsonTransport
from ..vcenter.vim_inventory import VimListing, list_inventory, select
from .evidence import fleet_head, fleet_records
from .fuse import FleetOperations, FleetTree
from .names import is_safe_id, vm_dir_names
from .options import FleetOptions
from .readahead import FleetReadAhead
from .space import InodeSpace
from .vm import FleetContext, FleetVm, VmUnavailable, split_content_path

log = logging.getLogger(__name__)

__all__ = ["Inventory", "serve_fleet"]

# FUSE requests served at once. Each request blocked in a VM whose guest stopped answering
# holds one until --timeout; with the single-VM figure (64) as many programs reading in
# one hung VM left no task to read the other VMs' requests from /dev/fuse. An idle
# task ends, and a busy one costs a trio task and its request buffer.
FLEET_MAX_TASKS = 1024


class Inventory(FleetTree):
    """The VMs shown, from one inventory listing, listed again when older than the
    TTL (a failed listing keeps the last one). Every VM ever listed is kept by id, so
    inodes the kernel still holds stay valid after the VM left the listing.

    ``frozen`` (``--frozen``): the VMs and names of the first listing are shown for the
    life of the mount. Later listings only tell which of them left it (their directory
    stays, every access inside fails with ENXIO and the reason) or came back, and how
    many VMs are listed but not shown."""

    def __init__(self, client: VCenterClient, options: FleetOptions, frozen: bool = False) -> None:
        self.client = client
        self.options = options
        self.frozen = frozen
        self.unshown = 0  # frozen: VMs of the last listing that the first one did not have
        self.make_vm: Callable[[str, str, str], FleetVm] | None = None
        self._by_id: dict[str, FleetVm] = {}
        self._current: dict[str, FleetVm] = {}
        self._members: dict[str, frozenset[str]] = {}
        self._checked = -float("inf")  # trio time of the last listing attempt
        self._refreshed_wall = 0.0
        self._lock = trio.Lock()
        self.listings = 0
        self.last_error: str | None = None
        self.source = "rest"  # "vim25" once a listing came from the property collector
        self._listing: VimListing | None = None  # the last vim25 listing

    @property
    def ttl(self) -> float:
        return self.options.inventory_ttl

    @property
    def refreshed(self) -> float:
        return self._refreshed_wall

    def by_id(self, vm: str) -> FleetVm | None:
        return self._by_id.get(vm)

    def in_folder(self, vm: str, folder: str) -> bool:
        return vm in self._members.get(folder, frozenset())

    def all_known(self) -> list[FleetVm]:
        """Every VM ever listed, the ones gone from the inventory too."""
        return list(self._by_id.values())

    def all_current(self) -> list[FleetVm]:
        return [self._current[k] for k in sorted(self._current)]

    async def current(self) -> dict[str, FleetVm]:
        if trio.current_time() - self._checked >= self.ttl:
            async with self._lock:
                if trio.current_time() - self._checked >= self.ttl:
                    try:
                        await self.refresh()
                    except GuestfsError as exc:
                        self._checked = trio.current_time()
                        self.last_error = str(exc)
                        log.warning("inventory listing failed (showing the last one): %s", exc)
        return self._current

    async def _list(self) -> list[InventoryVm]:
        """The VMs the options select, with a usable id."""
        opts = self.options
        folders: list[str] = []
        t = await self.client.transport()
        if isinstance(t, (ViJsonTransport, SoapTransport)):
            # vim25 (--api vi-json or soap): one property collector read of every VM,
            # no 4,000 limit, the family and Tools state included; folders from it too.
            listing = await list_inventory(t)
            if opts.folder:
                folders = sorted(listing.folder_subtree(opts.folder))
            found = select(listing, folders=folders, powered_on=opts.powered_on)
            self._listing, self.source = listing, "vim25"
        else:
            rest = await self.client.inventory_transport()
            if opts.folder:
                folders = await folder_subtree(rest, opts.folder)
            found = await list_vms(rest, folders=folders, powered_on=opts.powered_on)
            self._listing, self.source = None, "rest"
        self.listings += 1
        if opts.vm_globs:
            found = [v for v in found if any(fnmatch.fnmatchcase(v.name, g) for g in opts.vm_globs)]
        kept = []
        for v in found:
            if is_safe_id(v.vm):
                kept.append(v)
            else:
                log.warning("inventory: skipped a VM with an unusable id %r", v.vm[:80])
        return kept

    async def refresh(self) -> None:
        assert self.make_vm is not None
        kept = await self._list()
        if self.frozen and self._refreshed_wall:
            self._freeze({v.vm for v in kept})
            self._checked = trio.current_time()
            self.last_error = None
            return  # the times shown stay the first listing's: nothing shown changed
        names = vm_dir_names((v.vm, v.name) for v in kept)
        current: dict[str, FleetVm] = {}
        for v in kept:
            vm = self._by_id.get(v.vm)
            if vm is None:
                vm = self._by_id[v.vm] = self.make_vm(v.vm, v.name, names[v.vm])
            vm.name, vm.dirname = v.name, names[v.vm]
            vm.listed(v)
            current[vm.dirname] = vm
        self._members = await self._rule_folders()
        self._current = current
        self._checked = trio.current_time()
        self._refreshed_wall = time.time()
        self.last_error = None

    def _freeze(self, listed: set[str]) -> None:
        """--frozen: mark the shown VMs that left the listing, clear the ones back."""
        shown = {vm.vm for vm in self._current.values()}
        self.unshown = len(listed - shown)
        for vm in self._current.values():
            if vm.vm in listed:
                if vm.gone is not None:
                    log.info("VM %s (%s) is listed again", vm.dirname, vm.vm)
                vm.gone = None
            elif vm.gone is None:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                vm.gone = VmUnavailable(
                    f"VM {vm.vm} left the vCenter inventory listing at {when} (removed, or"
                    " no longer selected or powered on); --frozen keeps its directory",
                    errno.ENXIO,
                )
                log.warning("VM %s: %s", vm.dirname, vm.gone)

    async def _rule_folders(self) -> dict[str, frozenset[str]]:
        """VM ids of each folder a credential rule names (its subtree)."""
        out: dict[str, frozenset[str]] = {}
        folders = {c.rule.folder for c in self.options.credentials if c.rule.folder}
        listing = self._listing
        if listing is not None:  # vim25: the listing has every VM's folder
            for folder in folders:
                try:
                    subtree = listing.folder_subtree(folder)
                except NotFound as exc:
                    log.warning("credential rule folder %r: %s (the rule matches no VM)",
                                folder, exc)  # fmt: skip
                    subtree = frozenset()
                out[folder] = frozenset(v.vm for v in listing.in_folders(subtree))
            return out
        rest = await self.client.inventory_transport()
        for folder in folders:
            try:
                ids = await folder_subtree(rest, folder)
                vms = await list_vms(rest, folders=ids, powered_on=False)
            except NotFound as exc:
                log.warning("credential rule folder %r: %s (the rule matches no VM)", folder, exc)
                vms = []
            out[folder] = frozenset(v.vm for v in vms)
        return out


async def serve_fleet(cfg: m.MountConfig, ready: Callable[[], None]) -> None:
    """Mount every VM of the vCenter and serve until unmounted or signalled."""
    fleet = cfg.fleet
    assert fleet is not None
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            VCenterClient(m.client_deadlines(cfg.client, cfg.fs.timeout))
        )
        inventory = Inventory(client, fleet, frozen=cfg.frozen)
        audit = None
        if cfg.audit_log:
            audit = AuditLog(
                cfg.audit_log, vcenter=client.vcenter_netloc, vm="*", vm_name="*", case=cfg.case
            )
            stack.callback(audit.close)
        space = InodeSpace()

        async def fetch(path: str, size: int, sink: Sink, on_start: OnStart) -> TransferResult:
            vm_id, guest_path = split_content_path(path)
            vm = inventory.by_id(vm_id)
            if vm is None or vm.guest is None:
                raise NotFound(f"VM {vm_id} is not open", path=guest_path)
            result: TransferResult = await vm.guest.fetch(  # type: ignore[attr-defined]
                guest_path, size, sink, on_start
            )
            return result

        def on_transfer_end(ev: TransferEvent) -> None:
            vm_id, guest_path = split_content_path(ev.key.path)
            vm = inventory.by_id(vm_id)
            seen = ev.seen
            if seen is not None:
                seen = dataclasses.replace(seen, path=guest_path)
            local = dataclasses.replace(
                ev, key=dataclasses.replace(ev.key, path=guest_path), seen=seen
            )
            if vm is not None and vm.ledger is not None:
                transfer_hook(vm.ledger)(local)
            if audit is not None:
                audit.record(local, extra={"vm": vm_id, "vm_name": vm.name if vm else "?"})

        nursery = await stack.enter_async_context(trio.open_nursery())
        content = ContentCache(
            cfg.cache_dir,
            (1 << 62) if cfg.frozen else cfg.cache_size,
            fetch,
            nursery=nursery,
            keep=cfg.keep_cache,
            on_transfer_end=on_transfer_end,
        )
        stack.push_async_callback(m._shielded, content.aclose)
        stack.callback(nursery.cancel_scope.cancel)

        def on_version(old: ContentKey, new: ContentKey, st: GuestStat | None) -> None:
            vm_id, old_path = split_content_path(old.path)
            _, new_path = split_content_path(new.path)
            vm = inventory.by_id(vm_id)
            ops = vm.ops_for(old_path) if vm is not None else None
            listener = ops.content.version_listener if ops is not None else None
            if listener is not None:
                listener(
                    dataclasses.replace(old, path=old_path),
                    dataclasses.replace(new, path=new_path),
                    st,
                )

        content.version_listener = on_version
        ctx = FleetContext(
            client=client,
            content=content,
            nursery=nursery,
            space=space,
            fs=cfg.fs,
            options=fleet,
            metadata_ttl=cfg.metadata_ttl,
            frozen=cfg.frozen,
            in_folder=inventory.in_folder,
            guest_factory=m._Guest,
        )
        inventory.make_vm = lambda vm, name, dirname: FleetVm(ctx, vm, name, dirname)
        try:
            await inventory.refresh()  # the first listing: its failure is the mount's
        except NotFound as exc:
            raise ConfigError(f"--folder {fleet.folder!r}: {exc}") from exc
        # As many VMs at once as the cap has slots: read-ahead's calls are background
        # ones, which the cap keeps off its last eighth (the user's calls find room).
        # Half the cap left a 100-VM glob level waiting for three rounds of opens.
        width = max(1, client.config.max_guest_ops or 64)
        readahead = FleetReadAhead(nursery, prefetch=cfg.fs.prefetch, width=width)
        ops = FleetOperations(inventory, space, cfg.fs, readahead)
        started = time.time()

        def snapshot() -> dict[str, Any]:
            vms = [vm.snapshot() for vm in inventory.all_current()]
            return {
                "mountpoint": cfg.mountpoint,
                "vcenter": client.vcenter_netloc,
                "transport": client.transport_name,
                "transport_reason": client.transport_reason,
                "vm": "*",
                "vm_name": f"all VMs ({len(vms)})",
                "guest_root": "-",
                "pid": os.getpid(),
                "started": started,
                "frozen": cfg.frozen,
                **m.cache_status(content),
                "api": client.stats.snapshot(),
                "metadata": _sum_counters(v["metadata"] for v in vms),
                "inodes": len(space),
                "fleet": {
                    "inventory_ttl": fleet.inventory_ttl,
                    "inventory_refreshed": inventory.refreshed,
                    "inventory_listings": inventory.listings,
                    "inventory_source": inventory.source,
                    "inventory_error": inventory.last_error,
                    "inventory_frozen": cfg.frozen,
                    "inventory_unshown": inventory.unshown,
                    "readahead": readahead.snapshot(),
                    "vms": vms,
                },
            }

        def evidence() -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
            vms = inventory.all_known()
            head = {
                "mountpoint": cfg.mountpoint,
                "vcenter": client.vcenter_netloc,
                "frozen": cfg.frozen,
                "case": cfg.case,
                "audit_chain": audit.chain_id if audit is not None else None,
                **fleet_head(vms),
            }
            return head, fleet_records(vms)

        control_path = socket_path(cfg.mountpoint)
        pyfuse3.init(ops, cfg.mountpoint, m._mount_options(cfg))
        stack.callback(m._unmount, cfg.mountpoint)
        log.info(
            "mounted %d VMs of %s on %s; vCenter API: %s (%s)",
            len(inventory.all_current()), client.vcenter_netloc, cfg.mountpoint,
            client.transport_name, client.transport_reason,
        )  # fmt: skip
        nursery.start_soon(m._serve_control_quietly, control_path, snapshot, evidence)
        _settle_gc()
        ready()
        m.sd_notify("READY=1")
        nursery.start_soon(m._stop_on_signal, nursery.cancel_scope, cfg.grace)
        await m.fuse_main(max(cfg.max_tasks, FLEET_MAX_TASKS))


# Young objects collected this many allocations apart (CPython's default: 700). A fleet
# command makes hundreds of HTTPS exchanges at once, each leaving short-lived cycles
# (httpx/httpcore, trio cancel scopes) behind: at the default the collector ran every
# few milliseconds and a full collection walked every object of the mount.
_GC_YOUNG = 10_000


def _settle_gc() -> None:
    """What the mount holds once set up (modules, the inventory, one object per VM)
    lives as long as the mount: move it out of the collector's way (``gc.freeze``),
    so a full collection during a command walks only what the command made."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, older, oldest)


def _sum_counters(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for counters in items:
        for k, v in (counters or {}).items():
            out[k] = out.get(k, 0) + v
    return out

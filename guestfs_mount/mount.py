"""Lifecycle of one mount: connect, check, mount, serve, unmount.

Everything runs in one ``trio.run``, and everything opened is entered on one
``AsyncExitStack``, so it is closed in the reverse order, once, whatever happens: the
vCenter client, the audit log, the nursery of the background tasks, the content cache,
the mount itself. ``serve`` reports readiness through a callback (any error before that
propagates), so the CLI can return only when the mount is usable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from .audit import AuditLog
from .cache.content import ContentCache, OnStart, Sink, TransferEvent
from .control import serve_control, socket_path
from .errors import ConfigError, InvalidArgument, NotFound
from .evidence.ledger import Ledger, RecordingBackend, transfer_hook
from .fleet.options import FleetOptions
from .fs import FsOptions, Operations
from .meta import MetadataCache
from .model import DirEntry, FilesystemFamily, FileType, GuestStat, TransferResult, VmInfo
from .mountpoint import MountPoint, check_mounted, detach_if_dead, mount_target
from .paths import PosixPaths, flavor_for
from .vcenter.client import ClientConfig, VCenterClient

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    """One mount. The client's own deadlines are derived from ``fs.timeout`` by
    :func:`serve` (see :func:`client_deadlines`)."""

    client: ClientConfig
    vm: str
    mountpoint: str
    guest_root: str = "/"
    # The directory checked, pinned (settings.check_mountpoint): mounted through it.
    pinned: MountPoint | None = None
    fs: FsOptions = field(default_factory=FsOptions)
    metadata_ttl: float = 60.0  # how long listings and attributes are reused
    case: dict[str, str] = field(default_factory=dict)  # --case, --examiner, ... (evidence)
    frozen: bool = False
    cache_dir: str | None = None
    cache_size: int = 4 << 30
    keep_cache: bool = False
    allow_other: bool = False
    audit_log: str | None = None
    grace: float = 5.0
    max_tasks: int = 64
    read_ahead_kb: int = 4096
    debug_fuse: bool = False
    progress: bool = False  # live transfer display (foreground on a terminal)
    fleet: FleetOptions | None = None  # --all-vms: every VM of the vCenter (``vm`` unused)


class _Guest:
    """The metadata backend: the client's calls bound to one VM."""

    def __init__(self, client: VCenterClient, vm: str, paths: PosixPaths) -> None:
        self.client = client
        self.vm = vm
        self.paths = paths
        # Told the attributes a transfer came with (vim25), so the stat cache has them.
        self.on_stat: Callable[[str, GuestStat], None] | None = None
        # --frozen with a kept cache: (size, mtime_ns) an earlier mount fetched of a path.
        self.kept_version: Callable[[str], tuple[int, int] | None] | None = None

    def _as_kept(self, path: str, st: GuestStat) -> GuestStat:
        """A file an earlier mount fetched is shown as it was then (size and mtime; its
        content is the kept copy), so a frozen view reproduces that session's."""
        kept = self.kept_version(path) if self.kept_version is not None else None
        if kept is None or st.type is not FileType.FILE or kept == (st.size, st.mtime_ns):
            return st
        log.info("%s: shown as an earlier mount fetched it (%d bytes; %d bytes now)",
                 path, kept[0], st.size)  # fmt: skip
        return dataclasses.replace(st, size=kept[0], mtime_ns=kept[1])

    async def list_dir(
        self, path: str, more: Callable[[int], bool] | None = None
    ) -> list[DirEntry]:
        entries = await self.client.list_dir(self.vm, path, more)
        if self.kept_version is not None:
            entries = [self._kept_entry(path, e) for e in entries]
        # The client checks what is hostile on any guest; what only this guest's path
        # flavour makes hostile (a "\\" or ":" on Windows) is skipped here, as it does.
        kept = [e for e in entries if self.paths.is_safe_name(e.name)]
        if len(kept) < len(entries):
            first = next(e.name for e in entries if not self.paths.is_safe_name(e.name))
            log.warning(
                "list %s on VM %s: skipped %d invalid entries (first: %r %s)",
                path, self.vm, len(entries) - len(kept), first[:60],
                self.paths.name_problem(first),
            )  # fmt: skip
        return kept

    def _kept_entry(self, parent: str, e: DirEntry) -> DirEntry:
        if e.type is not FileType.FILE or self.kept_version is None:
            return e
        path = self.paths.join(parent, e.name)
        kept = self.kept_version(path)
        if kept is None:
            return e
        st = None if e.stat is None else self._as_kept(path, e.stat)
        return dataclasses.replace(e, size=kept[0], stat=st)

    async def stat(self, path: str) -> GuestStat:
        return self._as_kept(path, await self.client.stat(self.vm, path))

    async def fetch(
        self, path: str, size: int, sink: Sink, on_start: OnStart | None = None
    ) -> TransferResult:
        result = await self.client.download(self.vm, path, size, sink, on_start)
        if result.stat is not None and self.on_stat is not None:
            self.on_stat(path, result.stat)
        return result


def client_deadlines(client: ClientConfig, fuse_timeout: float) -> ClientConfig:
    """``client`` with its deadlines inside the FUSE deadline (``--timeout``): the client
    must give up first, with its own error (counted by the circuit breaker), rather than
    be cancelled by the request handler."""
    return dataclasses.replace(
        client,
        call_timeout=min(30.0, fuse_timeout * 0.4),
        retry_budget=min(20.0, fuse_timeout * 0.5),
        transfer_stall_timeout=fuse_timeout * 0.8,
    )


def _mount_options(cfg: MountConfig) -> set[str]:
    opts = {"ro", "fsname=guestfs", "subtype=guestfs", "nodev", "nosuid", "noatime"}
    if cfg.allow_other:
        # Other local users get the guest's mode bits checked by the kernel; the
        # mounting user alone otherwise, limited only by what the guest account can read.
        opts |= {"allow_other", "default_permissions"}
    if cfg.debug_fuse:
        opts.add("debug")
    return opts


def _bdi_of(mountpoint: str) -> str | None:
    """``major:minor`` of a mount from /proc/self/mountinfo (a stat of the mount point
    itself would deadlock here: this thread serves it). ``mountpoint`` must already be
    a real path."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = os.fsencode(mountpoint)
    found = None
    for line in lines:
        parts = line.split()
        if len(parts) > 4 and _unescape(parts[4]) == want:
            found = parts[2].decode()  # the last match is the topmost mount
    return found


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _raise_read_ahead(mountpoint: str, kb: int) -> None:
    dev = _bdi_of(mountpoint)
    if dev is None or os.geteuid() != 0:
        return
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.debug("could not raise read_ahead_kb: %s", exc)


async def _raise_read_ahead_after_init(ops: Operations, mountpoint: str, kb: int) -> None:
    # The kernel caps read-ahead to what INIT negotiated (128 KiB); raised afterwards it
    # sticks, and sequential reads arrive as 1 MiB requests, several in flight.
    await ops.initialized.wait()
    await trio.sleep(0.05)
    _raise_read_ahead(mountpoint, kb)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


def _raise_fd_limit() -> None:
    """Each cached file keeps an open descriptor while it may be read; a tree walk can
    hold thousands. Take the hard limit rather than fail with EMFILE at 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.debug("could not raise the open-file limit: %s", exc)


def _no_core_dumps() -> None:
    """The daemon holds the vCenter and guest passwords in memory for its whole life: a
    crash must not write them into a core file."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("could not disable core dumps: %s", exc)


async def serve(cfg: MountConfig, ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled. ``ready()`` once the mount is
    usable; any error before that propagates (the caller reports it)."""
    _no_core_dumps()
    _raise_fd_limit()
    if cfg.fleet is not None:
        from .fleet.serve import serve_fleet  # it builds on this module

        await serve_fleet(cfg, ready)
        return
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            VCenterClient(client_deadlines(cfg.client, cfg.fs.timeout))
        )
        vm = await client.find_vm(cfg.vm)
        await client.check_guest_ready(vm.vm)
        try:
            root = await client.stat(vm.vm, cfg.guest_root)  # also proves the guest login works
        except (NotFound, InvalidArgument) as exc:
            hint = "" if cfg.guest_root != "/" else " (a Windows guest needs --guest-root 'C:\\')"
            raise ConfigError(f"guest root {cfg.guest_root!r}: {exc}{hint}") from exc
        if root.type is not FileType.DIRECTORY:
            raise ConfigError(f"guest path {cfg.guest_root!r} is not a directory")
        paths = flavor_for(cfg.guest_root, root.family is FilesystemFamily.WINDOWS)
        guest = _Guest(client, vm.vm, paths)

        audit = None
        if cfg.audit_log:
            audit = AuditLog(
                cfg.audit_log,
                vcenter=client.vcenter_netloc,
                vm=vm.vm,
                vm_name=vm.name,
                case=cfg.case,
            )
            stack.callback(audit.close)
        ledger = Ledger(root=cfg.guest_root, paths=paths)
        ledger.saw(cfg.guest_root, root)
        ledger_transfer = transfer_hook(ledger)

        def on_transfer_end(ev: TransferEvent) -> None:
            ledger_transfer(ev)
            if audit is not None:
                audit.record(ev)

        nursery = await stack.enter_async_context(trio.open_nursery())
        content = ContentCache(
            cfg.cache_dir,  # None: a private temporary directory
            # --frozen: content once read must never change, so it is never evicted
            # (a second download could bring other bytes).
            (1 << 62) if cfg.frozen else cfg.cache_size,
            guest.fetch,
            nursery=nursery,
            keep=cfg.keep_cache,
            on_transfer_end=on_transfer_end,
            persist_as=_persist_as(cfg, client.vcenter_netloc, vm),
        )
        stack.push_async_callback(_shielded, content.aclose)
        if cfg.frozen:
            guest.kept_version = content.kept_version
        # The background tasks end before the cache closes: none may start a download.
        stack.callback(nursery.cancel_scope.cancel)
        meta = MetadataCache(
            RecordingBackend(guest, ledger),
            nursery=nursery,
            ttl=cfg.metadata_ttl,
            negative_ttl=cfg.fs.negative_ttl,
            frozen=cfg.frozen,
            paths=paths,
            # vim25 has no stat call: a stat is a listing call, so list the whole directory.
            stat_by_listing=client.transport_name in ("vi-json", "soap"),
        )
        guest.on_stat = meta.seed
        ops = Operations(meta, content, cfg.fs, root=cfg.guest_root, paths=paths, nursery=nursery)
        meta.seed(cfg.guest_root, root)
        started = time.time()

        def evidence() -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
            head = {
                "mountpoint": cfg.mountpoint,
                "vcenter": client.vcenter_netloc,
                "vm": vm.vm,
                "vm_name": vm.name,
                "instance_uuid": vm.instance_uuid,
                "guest_root": cfg.guest_root,
                "frozen": cfg.frozen,
                "case": cfg.case,
                "audit_chain": audit.chain_id if audit is not None else None,
                "dropped": ledger.dropped,
            }
            return head, ledger.records()

        def snapshot() -> dict[str, Any]:
            return {
                "mountpoint": cfg.mountpoint,
                "vcenter": client.vcenter_netloc,
                "transport": client.transport_name,
                "transport_reason": client.transport_reason,
                "vm": vm.vm,
                "vm_name": vm.name,
                "guest_root": cfg.guest_root,
                "pid": os.getpid(),
                "started": started,
                "frozen": cfg.frozen,
                **cache_status(content),
                "api": client.stats.snapshot(),
                "metadata": dict(meta.counters),
                "inodes": len(ops.inodes),
            }

        control_path = socket_path(cfg.mountpoint)  # cfg.mountpoint is a real path
        target = mount_target(cfg.pinned) if cfg.pinned is not None else cfg.mountpoint
        pyfuse3.init(ops, target, _mount_options(cfg))
        stack.callback(_unmount, cfg.mountpoint)
        if cfg.pinned is not None:
            check_mounted(cfg.pinned)  # the path logged and shown by status is the one mounted
        nursery.start_soon(_raise_read_ahead_after_init, ops, cfg.mountpoint, cfg.read_ahead_kb)
        log.info(
            "mounted %s (%s) %s on %s; vCenter API: %s (%s)",
            vm.name, vm.vm, cfg.guest_root, cfg.mountpoint,
            client.transport_name, client.transport_reason,
        )  # fmt: skip
        nursery.start_soon(_serve_control_quietly, control_path, snapshot, evidence)
        if cfg.progress:
            _start_progress(nursery, content.in_flight)
        ready()
        sd_notify("READY=1")
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope, cfg.grace)
        await fuse_main(cfg.max_tasks)
        # main() returned: unmounted from outside (fusermount3 -u); the stack cleans up


async def fuse_main(max_tasks: int) -> None:
    """Serve the kernel until the mount ends from outside. Linux 6.x may end an unmount
    (``fusermount3 -u``) with ECONNABORTED on the device rather than ENODEV, and an admin
    can abort the connection through /sys/fs/fuse/connections: either way the mount is
    over, which is an end to serving, not a failure of it."""
    try:
        await pyfuse3.main(max_tasks=max_tasks)
    except OSError as exc:
        if exc.errno != errno.ECONNABORTED:
            raise
        log.info("the kernel closed the FUSE connection: stopping")


def _persist_as(cfg: MountConfig, vcenter: str, vm: VmInfo) -> tuple[str, str] | None:
    """What a kept cache is keyed by: the vCenter and the VM's instance UUID (a name or
    a moid alone can be reused by another VM, whose files must never be served)."""
    if not (cfg.keep_cache and cfg.cache_dir):
        return None
    if vm.instance_uuid is None:
        log.warning(
            "%s did not give VM %s's instance UUID: files kept in %s are not reused"
            " (a kept cache is keyed by it, never by the VM's name or id alone)",
            vcenter, vm.vm, cfg.cache_dir,
        )  # fmt: skip
        return None
    return vcenter, vm.instance_uuid


async def _shielded(close: Callable[[], Awaitable[None]]) -> None:
    with trio.CancelScope(shield=True):
        await close()


def _unmount(mountpoint: str) -> None:
    sd_notify("STOPPING=1")
    pyfuse3.close(unmount=True)
    detach_if_dead(mountpoint)  # the device is closed by now: this cannot block on us
    log.info("unmounted %s", mountpoint)


def _start_progress(nursery: trio.Nursery, in_flight: Callable[[], list[dict[str, Any]]]) -> None:
    from rich.console import Console

    from .progress import rich_logging, show_progress

    console = Console(stderr=True)
    rich_logging(console, logging.getLogger().level)
    nursery.start_soon(show_progress, in_flight, console)


def cache_status(content: ContentCache) -> dict[str, Any]:
    """The status document's transfers and content-cache fields (single-VM and fleet)."""
    return {
        "transfers": content.in_flight(),
        "cache": {
            "dir": content.directory,
            "usage": content.usage,
            "max_bytes": content.max_bytes,
            "stats": content.stats,
        },
    }


async def _serve_control_quietly(
    path: str,
    snapshot: Callable[[], dict[str, Any]],
    evidence: Callable[[], tuple[dict[str, Any], Iterator[dict[str, Any]]]] | None = None,
) -> None:
    try:
        await serve_control(path, snapshot, evidence)
    except OSError as exc:  # status is a convenience: never let it stop the mount
        log.warning("no control socket (guestfs-mount status will not see this mount): %s", exc)


async def _stop_on_signal(scope: trio.CancelScope, grace: float) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()  # stop taking new requests
            break
    await trio.sleep(grace)  # let handlers in flight finish
    scope.cancel()


__all__ = ["MountConfig", "client_deadlines", "sd_notify", "serve"]

"""VCenterClient: what the upper layers call; the policy around the chosen transport.

The transport (:mod:`.rest`, :mod:`.vi_json`, :mod:`.soap`; picked by :mod:`.probe`)
knows a wire format. This facade adds what is the same for all of them: paging a whole
listing within its bounds, the transfer-URL trust rule (:mod:`.urls`), retrying a
download until its first byte, and the body download itself (:mod:`.transfer`). Every
failure is an exception from :mod:`guestfs_mount.errors` whose message names the
operation and guest path and never contains a password, session id or URL token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import httpx
import trio

from guestfs_mount.errors import (
    ListingStopped,
    NotAllowedInCurrentState,
    ProtocolError,
    UnsafeTransferUrl,
)
from guestfs_mount.model import (
    BodyWriter,
    DirEntry,
    FileType,
    GuestCredentials,
    GuestStat,
    TransferResult,
    VmInfo,
)

from . import guestauth, probe
from .rest import RestTransport
from .retry import is_retryable, retry_call
from .scheduler import Scheduler
from .session import ClientConfig, ClientStats, ErrorCounter, Http, guest_vm, show
from .sharedcap import SharedCap
from .transfer import BodyGet, ConnectionPool, fetch_body
from .transport import OpenedTransfer, Transport
from .urls import Server, check_transfer_url, parse_server, redact_url

log = logging.getLogger(__name__)

__all__ = ["ClientConfig", "ClientStats", "VCenterClient"]

T = TypeVar("T")
_REJECTION_RETRIES = 3


class VCenterClient:
    """``transport``: an httpx transport for the API calls (tests inject
    ``httpx.MockTransport``); transfer bodies always take :mod:`.transfer`'s path."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._api = config.api_choice
        self._server: Server = parse_server(config.server, allow_http=config.allow_http)
        self.stats = ClientStats()
        self.http = Http(
            config,
            self._server,
            transport=transport,
            clock=clock or trio.current_time,
            rng=rng or random.Random(),
            stats=self.stats,
            secrets=self._secrets,
        )
        self._body_pool = ConnectionPool()
        self._transport: Transport | None = None
        self._transport_reason = ""
        self._choose_lock: trio.Lock | None = None
        # Every guest operation of a VM passes its lane (one channel per VM in the guest).
        self.scheduler = Scheduler(config.guest_ops, clock=self.http.clock)
        # A fleet mount: each VM's own guest account, and one cap over all VMs' guest
        # calls and transfers (VMs served in turn, none holding more than its share).
        self._vm_guest: dict[str, GuestCredentials] = {}
        self._cap = SharedCap(config.max_guest_ops) if config.max_guest_ops else None
        self._inventory: RestTransport | None = None

    # --- properties / lifecycle -------------------------------------------------------

    @property
    def vcenter_host(self) -> str:
        """The vCenter host name as configured (lower case, no port)."""
        return self._server.host

    @property
    def vcenter_netloc(self) -> str:
        """``host:port`` of vCenter."""
        return self._server.netloc

    @property
    def transport_name(self) -> str | None:
        """ "rest", "preview", "vi-json" or "soap" once chosen (at the first call)."""
        return self._transport.name if self._transport is not None else None

    @property
    def transport_reason(self) -> str:
        """Why that transport: the ``--api`` choice, or what the ``auto`` probe found."""
        return self._transport_reason

    @property
    def transfer_api(self) -> str | None:
        """REST only: "released" or "preview" once known, None while undecided."""
        t = self._transport
        return t.form if isinstance(t, RestTransport) else None

    async def __aenter__(self) -> VCenterClient:
        self.http.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Log out (best effort, short deadline) and close the HTTP clients."""
        t, self._transport = self._transport, None
        try:
            if t is not None:
                with trio.move_on_after(min(5.0, self.config.call_timeout)):
                    await t.logout()
            if self._inventory is not None:
                with trio.move_on_after(min(5.0, self.config.call_timeout)):
                    await self._inventory.logout()
        finally:
            self._body_pool.close()
            await self.http.aclose()

    def _secrets(self) -> tuple[str | None, ...]:
        g = self.config.guest
        tokens = []
        t = self._transport
        for slot_owner in (t, getattr(t, "lookup", None)):
            slot = getattr(slot_owner, "slot", None)
            tokens.append(getattr(slot, "token", None))
        vms = [s for c in self._vm_guest.values() for s in (c.password, c.saml_token)]
        return (self.config.password, g.password, g.saml_token, *tokens, *vms)

    def set_guest_credentials(self, vm: str, creds: GuestCredentials) -> None:
        """Use ``creds`` for the guest operations of ``vm`` (a fleet mount)."""
        self._vm_guest[vm] = creds

    def _capped(self, vm: str) -> contextlib.AbstractAsyncContextManager[object]:
        return self._cap.slot(vm) if self._cap is not None else contextlib.nullcontext()

    async def inventory_transport(self) -> RestTransport:
        """The REST transport for inventory calls: the client's own when it has one
        (REST, or the look-up side of a vim25 transport), else one of its own."""
        t = await self.transport()
        for candidate in (t, getattr(t, "lookup", None)):
            if isinstance(candidate, RestTransport):
                return candidate
        if self._inventory is None:
            self._inventory = RestTransport(self.http)
        return self._inventory

    def _counting(self) -> ErrorCounter:
        return ErrorCounter(self.stats)

    async def transport(self) -> Transport:
        """The transport, chosen (and for ``auto`` probed) once, at the first call."""
        if self._transport is None:
            if self._choose_lock is None:
                self._choose_lock = trio.Lock()
            async with self._choose_lock:
                if self._transport is None:
                    t, why = await probe.choose(self.http, self._api)
                    # The mount's "mounted ..." line names it; here only for --debug.
                    log.debug("vCenter API: %s (%s)", t.name, why)
                    self._transport, self._transport_reason = t, why
        return self._transport

    async def _guest(
        self, vm: str, fn: Callable[[], Awaitable[T]], kind: str = "call"
    ) -> T:
        """Run one guest operation in ``vm``'s lane. A load rejection
        (``not_allowed_in_current_state``; busy/unavailable are retried by the session)
        halves the lane's limit and is retried a few times after a back-off: the same
        error also means "VM off", which must not wait out the whole retry budget."""
        lane = self.scheduler.lane(vm)
        creds = self._vm_guest.get(vm)
        attempt = 0
        while True:
            try:
                async with lane.slot(kind=kind), self._capped(vm):
                    scope = guest_vm.set(vm)  # its timeouts are this guest's (session.py)
                    token = guestauth.current.set(creds) if creds is not None else None
                    try:
                        return await fn()
                    finally:
                        if token is not None:
                            guestauth.current.reset(token)
                        guest_vm.reset(scope)
            except NotAllowedInCurrentState:
                if attempt >= _REJECTION_RETRIES:
                    raise
                self.stats.retries += 1
            await trio.sleep(self.http.backoff.delay(attempt))
            attempt += 1

    # --- the facade -------------------------------------------------------------------

    async def login(self) -> None:
        """Create the session(s) (retried on busy/unavailable/transport errors)."""
        with self._counting():
            await (await self.transport()).login()

    async def find_vm(self, name_or_id: str) -> VmInfo:
        with self._counting():
            return await (await self.transport()).find_vm(name_or_id)

    async def check_guest_ready(self, vm: str) -> None:
        with self._counting():
            t = await self.transport()
            await self._guest(vm, lambda: t.check_guest(vm), "check")

    async def list_dir(
        self, vm: str, path: str, more: Callable[[int], bool] | None = None
    ) -> list[DirEntry]:
        """Every entry of a directory, in as few pages as the server serves. Entries from
        a vim25 transport carry their ``stat``. ``more(entries so far)`` is asked before
        each page after the first; False stops the listing with ``ListingStopped``."""
        with self._counting():
            return await self._list_dir(await self.transport(), vm, path, more)

    async def _list_dir(
        self, t: Transport, vm: str, path: str, more: Callable[[int], bool] | None
    ) -> list[DirEntry]:
        cfg = self.config
        desc = f"list {show(path)} on VM {vm}"
        deadline = self.http.clock() + cfg.list_deadline
        entries: list[DirEntry] = []
        seen: set[str] = set()
        skipped: list[str] = []
        index = 0
        stalls = 0
        size = cfg.list_page_size
        while True:
            if self.http.clock() > deadline:
                raise ProtocolError(f"{desc}: listing did not finish in {cfg.list_deadline:.0f}s")
            fetch = functools.partial(t.list_page, vm, path, index, size)
            page = await self._guest(vm, fetch, "list")
            known = len(seen)
            for ent in page.entries:
                if ent.name in seen:
                    skipped.append(f"duplicate name {show(ent.name[:60])!r}")
                else:
                    seen.add(ent.name)
                    entries.append(ent)
            skipped.extend(page.skipped)
            index += page.raw_count
            if len(entries) > cfg.max_list_entries or index > 2 * cfg.max_list_entries:
                raise ProtocolError(f"{desc}: more than {cfg.max_list_entries} entries")
            if page.end:
                break
            if more is not None and not more(len(entries)):
                raise ListingStopped(f"{desc}: stopped after {len(entries)} entries")
            if page.remaining is not None:
                # vim25: ask for all that is left, up to a page the reply cap can carry.
                size = max(1, min(cfg.max_list_page, page.remaining))
            # A page without a new name is no progress, whatever it holds: a server that
            # answers the same page at every index would else run to max_list_entries.
            if len(seen) == known:
                stalls += 1
                if stalls > cfg.list_max_stalls:
                    raise ProtocolError(
                        f"{desc}: server keeps answering pages without entries at index {index}"
                    )
            else:
                stalls = 0
        if skipped:
            log.warning(
                "%s: skipped %d invalid entries (first: %s)", desc, len(skipped), show(skipped[0])
            )
        return entries

    async def stat(self, vm: str, path: str) -> GuestStat:
        with self._counting():
            t = await self.transport()
            return await self._guest(vm, lambda: t.stat(vm, path), "stat")

    # --- transfers --------------------------------------------------------------------

    async def open_transfer(self, vm: str, path: str) -> OpenedTransfer:
        """A checked single-use URL (trust policy applied, ``*`` substituted), with the
        file's attributes when the transport gives them."""
        with self._counting():
            return await self.http.retry(
                lambda: self._open_once(vm, path), f"create transfer of {show(path)} on VM {vm}"
            )

    async def create_transfer(self, vm: str, path: str) -> str:
        return (await self.open_transfer(vm, path)).url

    async def _open_once(self, vm: str, path: str) -> OpenedTransfer:
        t = await self.transport()
        opened = await self._guest(vm, lambda: t.open_transfer(vm, path), "open")
        url = check_transfer_url(
            opened.url,
            self._server,
            insecure=self.config.insecure,
            allow_http=self.config.allow_http,
            esx_hosts=self.config.esx_hosts,
            pinned_hosts=self.http.pins.keys(),
        )
        return OpenedTransfer(url=url, stat=opened.stat)

    async def download(
        self,
        vm: str,
        path: str,
        expected_size: int,
        writer: BodyWriter,
        on_start: Callable[[int, GuestStat | None], None] | None = None,
    ) -> TransferResult:
        """Fetch a whole guest file into ``writer`` (its ``write`` runs in the transfer's
        worker thread); retried only until the first byte.

        ``on_start(size, stat)`` runs on the event loop before the first byte: the body's
        real length (the stat returned with the URL, else the Content-Length; it differs
        from ``expected_size`` when the file changed since it was stat'ed) and that stat."""
        with self._counting():
            started = [False]
            t0 = time.perf_counter()

            async def attempt() -> tuple[BodyGet, OpenedTransfer]:
                opened = await self._open_once(vm, path)
                exact = opened.stat is not None and opened.stat.type is FileType.FILE
                size = opened.stat.size if opened.stat is not None and exact else expected_size
                known = [opened.stat]  # the file's stat, once a transport or a re-stat gave it

                async def confirm(n: int) -> bool:
                    # REST gives no stat with the URL: ask the guest whether the file
                    # now has this length (it changed) or the body is damaged.
                    fresh = await self.stat(vm, path)
                    if fresh.type is not FileType.FILE or fresh.size != n:
                        return False
                    known[0] = fresh
                    return True

                def start(n: int) -> None:
                    if on_start is not None:
                        on_start(n, known[0])

                body = await self._fetch(
                    opened.url, vm, path, size, writer, started, strict=exact, on_start=start,
                    confirm_length=confirm,
                )  # fmt: skip
                return body, dataclasses.replace(opened, stat=known[0])

            def retryable(e: BaseException) -> bool:
                return not started[0] and is_retryable(e)

            def on_retry(e: BaseException, delay: float) -> None:
                self.stats.retries += 1
                log.info("download of %s: %s; retrying in %.2fs", show(path), e, delay)

            # The body holds the VM's channel: a prefetch waits here for the user's work.
            async with self.scheduler.body(vm, expected_size):
                body, opened = await retry_call(
                    attempt, self.http.backoff, clock=self.http.clock, retryable=retryable,
                    on_retry=on_retry,
                )  # fmt: skip
            self.stats.downloads += 1
            return TransferResult(
                nbytes=body.nbytes,
                sha256=body.digest,
                seconds=time.perf_counter() - t0,
                md5=body.md5,
                stat=opened.stat,
            )

    async def _fetch(
        self,
        url: str,
        vm: str,
        path: str,
        expected: int,
        writer: BodyWriter,
        started: list[bool],
        *,
        strict: bool = True,
        on_start: Callable[[int], None] | None = None,
        confirm_length: Callable[[int], Awaitable[bool]] | None = None,
    ) -> BodyGet:
        cfg = self.config
        u = httpx.URL(url)
        if u.scheme not in ("https", "http"):
            raise UnsafeTransferUrl(f"transfer URL {redact_url(url)}: scheme refused")
        host = (u.host or "").lower()
        port = u.port or (443 if u.scheme == "https" else 80)
        # `*` with vCenter's own port: the vCenter listener (vCenter's CA); else ESX's CA.
        same = host == self._server.host and port == self._server.port
        where = f"{host}:{port}"
        body = BodyGet(
            scheme=u.scheme,
            host=host,
            port=port,
            target=u.raw_path.decode("ascii"),
            context=self.http.transfer_context(host, port, same) if u.scheme == "https" else None,
            connect_timeout=cfg.call_timeout,
            stall_timeout=cfg.transfer_stall_timeout,
            expected=expected,
            desc=f"download of {show(path)} from VM {vm}",
            where=where,
            pool=self._body_pool,
            strict_length=strict,
            on_start=on_start,
            confirm_length=confirm_length,
        )
        self.stats.calls["transfer.get"] += 1
        t0 = time.perf_counter()

        def on_data(n: int) -> None:
            started[0] = True
            self.stats.bytes_downloaded += n

        async with self._capped(vm):
            await fetch_body(body, writer, self.http.breaker(where), on_data)
        if cfg.debug:
            log.debug("GET %s 200 %.1fms", redact_url(url), (time.perf_counter() - t0) * 1e3)
        return body

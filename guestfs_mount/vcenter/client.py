"""VCenterClient: the only httpx user of guestfs-mount.

Talks to ``/api`` of vCenter (session, VM lookup, guest files list/get, transfer URL
creation) and GETs transfer URLs from ESXi (or vCenter for ``*`` hosts). Every failure is
translated into an exception from :mod:`guestfs_mount.errors` with a message that names the
operation and guest path and never contains a password, session id or URL token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import httpx
import trio

from guestfs_mount.errors import (
    ApiError,
    ConfigError,
    GuestAuthFailed,
    NotAllowedInCurrentState,
    NotFound,
    ProtocolError,
    RemoteError,
    RemoteTimeout,
    ServiceUnavailable,
    TlsError,
    TransferError,
    TransportError,
    Unauthenticated,
    UnsafeTransferUrl,
    iter_chain,
)
from guestfs_mount.model import (
    DirEntry,
    GuestCredentials,
    GuestStat,
    PowerState,
    TransferResult,
    VmInfo,
)

from . import parse, tls
from .bodyget import BodyGet, ConnectionPool
from .retry import Backoff, CircuitBreaker, is_retryable, retry_call
from .urls import Server, check_transfer_url, parse_server, redact, redact_url

log = logging.getLogger(__name__)

__all__ = ["ClientConfig", "ClientStats", "VCenterClient"]

CHUNK = 1 << 20  # sink receives chunks of at least this size (except the last)
_EMPTY: Mapping[str, str] = MappingProxyType({})


class _RedactFilter(logging.Filter):
    """httpx/httpcore log request URLs at INFO/DEBUG; transfer URLs carry ``token=``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        red = redact(msg)
        if red != msg:
            record.msg = red
            record.args = None
        return True


for _name in ("httpx", "httpcore"):
    _lg = logging.getLogger(_name)
    if not any(isinstance(f, _RedactFilter) for f in _lg.filters):
        _lg.addFilter(_RedactFilter())


@dataclass(frozen=True)
class ClientConfig:
    server: str
    user: str
    password: str = field(repr=False)
    guest: GuestCredentials
    ca_file: str | None = None
    esx_ca_file: str | None = None
    thumbprints: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    insecure: bool = False
    allow_http: bool = False
    esx_hosts: tuple[str, ...] = ()
    api: Literal["auto", "released", "preview"] = "auto"
    call_timeout: float = 30.0  # one HTTP exchange
    retry_budget: float = 20.0  # total seconds of retrying busy/unavailable/transport errors
    transfer_stall_timeout: float = 60.0
    max_list_entries: int = 1_000_000
    list_page_size: int = 1000
    max_connections: int = 64
    debug: bool = False
    # --- tuning knobs (defaults are fine; tests shrink them) ---
    list_deadline: float = 600.0  # one list_dir may not run longer
    list_max_stalls: int = 3  # READY pages without progress tolerated in a row
    backoff_start: float = 0.1
    backoff_cap: float = 2.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 5.0


@dataclass
class ClientStats:
    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    relogins: int = 0
    bytes_downloaded: int = 0
    downloads: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "errors": dict(self.errors),
            "retries": self.retries,
            "relogins": self.relogins,
            "bytes_downloaded": self.bytes_downloaded,
            "downloads": self.downloads,
        }


class _NoSuchOperation(ProtocolError):
    """The server does not know the endpoint (OPERATION_NOT_FOUND or a bare 404/405)."""


def _show(path: str) -> str:
    """A guest path printable anywhere (lone surrogates -> backslash escapes)."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _q(segment: str) -> str:
    return urllib.parse.quote(os.fsencode(segment), safe="")


def _transport_reason(exc: BaseException) -> str:
    """The most specific message in the cause chain (httpx under trio has none): an
    OSError's text if there is one (also inside exception groups), else the deepest
    non-empty message."""
    best = ""
    os_text = ""
    for e in iter_chain(exc):
        if isinstance(e, OSError) and (e.strerror or str(e)):
            os_text = e.strerror or str(e)  # the deepest one wins
        s = str(e).strip()
        if s:
            best = s
    return os_text or best or type(exc).__name__


class VCenterClient:
    def __init__(
        self,
        config: ClientConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        esx_transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._server: Server = parse_server(config.server, allow_http=config.allow_http)
        if config.api not in ("auto", "released", "preview"):
            raise ConfigError(f"unknown API form {config.api!r}")
        self._pins = tls.pins_by_key(config.thumbprints)
        self._transport = transport
        self._esx_transport = esx_transport
        self._clock: Callable[[], float] = clock or trio.current_time
        self._backoff = Backoff(
            start=config.backoff_start,
            cap=config.backoff_cap,
            budget=config.retry_budget,
            rng=rng or random.Random(),
        )
        self._breakers: dict[str, CircuitBreaker] = {}
        self._vc: httpx.AsyncClient | None = None
        # API calls are spread over several small pools: httpcore scans every pooled
        # connection (a select() each, O(n^2) bookkeeping) on every request, which made
        # one 64-connection pool cost ~2 ms of CPU per stat. Shards of 4 keep it cheap.
        self._vc_shards: list[httpx.AsyncClient] = []
        self._transfer_contexts: dict[Any, Any] = {}
        self._body_pool = ConnectionPool()
        self._in_flight: dict[int, int] = {}  # id(shard) -> requests in flight
        self._esx: httpx.AsyncClient | None = None
        self._session: str | None = None
        self._gen = 0
        self._login_lock: trio.Lock | None = None
        self._transfer_api: str | None = None if config.api == "auto" else config.api
        self.stats = ClientStats()
        self._warned_insecure = False

    # --- properties / lifecycle -----------------------------------------------------------

    @property
    def vcenter_host(self) -> str:
        """The vCenter host name as configured (lower case, no port)."""
        return self._server.host

    @property
    def vcenter_netloc(self) -> str:
        """``host:port`` of vCenter."""
        return self._server.netloc

    @property
    def transfer_api(self) -> str | None:
        """Either "released" or "preview" once known, None while undecided (api="auto")."""
        return self._transfer_api

    async def __aenter__(self) -> VCenterClient:
        self._clients()
        if self._transport is None and self._esx_transport is None:
            self._transfer_context("", 0, False)  # ready before the first open waits on it
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """DELETE the session (best effort, short deadline) and close the HTTP clients."""
        vc, esx = self._vc, self._esx
        shards, self._vc_shards = self._vc_shards, []
        try:
            if self._session is not None and vc is not None:
                with trio.move_on_after(min(5.0, self.config.call_timeout)):
                    try:
                        await vc.delete(
                            self._server.base_url + "/api/session",
                            headers={"vmware-api-session-id": self._session},
                        )
                    except httpx.HTTPError:
                        pass
        finally:
            self._session = None
            self._vc = self._esx = None
            self._body_pool.close()
            with trio.CancelScope(shield=True):
                if vc is not None:
                    await vc.aclose()
                for shard in shards:
                    if shard is not vc:
                        await shard.aclose()
                if esx is not None:
                    await esx.aclose()

    def _secrets(self) -> tuple[str | None, ...]:
        g = self.config.guest
        return (self.config.password, g.password, g.saml_token, self._session)

    def _scrub(self, text: str) -> str:
        return redact(text, self._secrets())

    def _lock(self) -> trio.Lock:
        if self._login_lock is None:
            self._login_lock = trio.Lock()
        return self._login_lock

    def _breaker(self, key: str) -> CircuitBreaker:
        b = self._breakers.get(key)
        if b is None:
            b = self._breakers[key] = CircuitBreaker(
                key,
                threshold=self.config.breaker_threshold,
                cooldown=self.config.breaker_cooldown,
                clock=self._clock,
            )
        return b

    # --- HTTP clients -----------------------------------------------------------------------

    def _context(self, cafile: str | None) -> Any:
        if self.config.insecure:
            if not self._warned_insecure:
                self._warned_insecure = True
                log.warning(
                    "TLS verification is disabled (--insecure): any certificate and any"
                    " transfer host is accepted"
                )
            return tls.insecure_context()
        return tls.ca_context(cafile)

    def _make_client(
        self,
        transport: httpx.AsyncBaseTransport | None,
        cafile: str | None,
        read_timeout: float,
        max_connections: int | None = None,
    ) -> httpx.AsyncClient:
        cfg = self.config
        timeout = httpx.Timeout(cfg.call_timeout, read=read_timeout)
        if transport is not None:
            return httpx.AsyncClient(
                transport=transport, follow_redirects=False, trust_env=False, timeout=timeout
            )
        conns = max_connections or cfg.max_connections
        limits = httpx.Limits(
            max_connections=conns,
            max_keepalive_connections=min(conns, 32),
            keepalive_expiry=30.0,
        )
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        for (host, port), sha in self._pins.items():
            h = f"[{host}]" if ":" in host else host
            key = f"all://{h}" + (f":{port}" if port else "")
            mounts[key] = httpx.AsyncHTTPTransport(
                verify=tls.pinned_context(sha), limits=limits, trust_env=False
            )
        return httpx.AsyncClient(
            verify=self._context(cafile),
            limits=limits,
            mounts=mounts,
            follow_redirects=False,
            trust_env=False,
            timeout=timeout,
        )

    def _clients(self) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        cfg = self.config
        if self._vc is None:
            per_shard = 4
            count = 1 if self._transport is not None else max(1, cfg.max_connections // per_shard)
            self._vc_shards = [
                self._make_client(self._transport, cfg.ca_file, cfg.call_timeout, per_shard)
                for _ in range(count)
            ]
            self._vc = self._vc_shards[0]
        if len(self._vc_shards) > 1:
            # The least busy shard, the first of equals: a lone caller keeps reusing one
            # warm connection (no TLS handshake), concurrent callers spread out.
            vc = min(self._vc_shards, key=lambda c: self._in_flight.get(id(c), 0))
        else:
            vc = self._vc
        if self._esx is None:
            self._esx = self._make_client(
                self._esx_transport or self._transport,
                cfg.esx_ca_file or cfg.ca_file,
                cfg.transfer_stall_timeout,
            )
        return vc, self._esx

    # --- one HTTP exchange ------------------------------------------------------------------

    def _tls_error(self, netloc: str, e: BaseException, ssl_err: Exception) -> TlsError:
        reason = self._scrub(tls.ssl_reason(ssl_err))  # type: ignore[arg-type]
        return TlsError(
            f"TLS certificate of {netloc} not trusted: {reason}"
            " (use --ca-file or --thumbprint)"
        )

    def _translate_transport(self, e: BaseException, netloc: str, desc: str) -> RemoteError:
        ssl_err = tls.find_ssl_error(e)
        if ssl_err is not None:
            return self._tls_error(netloc, e, ssl_err)
        if isinstance(e, (trio.TooSlowError, httpx.TimeoutException)):
            return RemoteTimeout(f"{desc}: no answer from {netloc} in time ({type(e).__name__})")
        return TransportError(
            f"{desc}: cannot talk to {netloc}: {self._scrub(_transport_reason(e))}"
        )

    async def _send(
        self,
        client: httpx.AsyncClient,
        request: httpx.Request,
        *,
        name: str,
        desc: str,
        stream: bool = False,
    ) -> httpx.Response:
        """Send under the breaker and ``fail_after(call_timeout)``; translate failures."""
        url = request.url
        netloc = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        breaker = self._breaker(netloc)
        probe = breaker.before_call()
        self.stats.calls[name] += 1
        t0 = time.perf_counter()
        try:
            self._in_flight[id(client)] = self._in_flight.get(id(client), 0) + 1
            try:
                with trio.fail_after(self.config.call_timeout):
                    resp = await client.send(request, stream=stream)
            finally:
                self._in_flight[id(client)] -= 1
        except (trio.TooSlowError, httpx.TransportError) as e:
            err = self._translate_transport(e, netloc, desc)
            if isinstance(err, TlsError):
                breaker.release(probe)
            elif isinstance(err, RemoteTimeout):
                # A whole call_timeout without an answer: the server is down or hung.
                # Open at once, so queued requests fail fast instead of each waiting
                # (the kernel serializes lookups in one directory).
                breaker.failure(probe, weight=breaker.threshold)
            else:
                breaker.failure(probe)
            raise err from e
        except httpx.HTTPError as e:
            breaker.release(probe)
            raise ProtocolError(f"{desc}: {type(e).__name__}: {self._scrub(str(e))}") from e
        except BaseException:
            breaker.release(probe)
            raise
        breaker.success(probe)
        if self.config.debug:
            shown = redact_url(str(url)) if name == "transfer.get" else url.raw_path.decode()
            log.debug(
                "%s %s %d %.1fms",
                request.method,
                shown,
                resp.status_code,
                (time.perf_counter() - t0) * 1000,
            )
        return resp

    # --- session ----------------------------------------------------------------------------

    async def login(self) -> None:
        """Create a session (retried on busy/unavailable/transport errors)."""
        with self._counting():
            await self._retry(self._login_once, "login")

    async def _login_once(self) -> None:
        vc, _ = self._clients()
        cfg = self.config
        cred = base64.b64encode(f"{cfg.user}:{cfg.password}".encode()).decode("ascii")
        req = vc.build_request(
            "POST",
            self._server.base_url + "/api/session",
            headers={"Authorization": f"Basic {cred}", "Accept": "application/json"},
        )
        desc = f"vCenter login as {cfg.user}"
        resp = await self._send(vc, req, name="session.create", desc=desc)
        if resp.status_code not in (200, 201):
            err = self._api_error(resp, desc)
            if isinstance(err, Unauthenticated):
                err = Unauthenticated(
                    f"vCenter login as {cfg.user} failed: {self._server_text(err)}",
                    status=err.status,
                    messages=err.messages,
                )
            raise err
        token = parse.parse_session_token(parse.decode_json(resp.content, desc))
        self._session = token
        self._gen += 1

    async def _relogin(self, gen: int) -> None:
        async with self._lock():
            if self._gen == gen:
                log.info("vCenter session expired; logging in again")
                await self._login_once()
                self.stats.relogins += 1

    async def _session_alive(self, vc: httpx.AsyncClient, gen: int) -> bool:
        if gen != self._gen or self._session is None:
            return False  # someone logged in again meanwhile: retry with the new session
        req = vc.build_request(
            "GET",
            self._server.base_url + "/api/session",
            headers={"Accept": "application/json", "vmware-api-session-id": self._session},
        )
        resp = await self._send(vc, req, name="session.get", desc="check vCenter session")
        return resp.status_code == 200

    # --- API calls --------------------------------------------------------------------------

    @staticmethod
    def _server_text(err: ApiError) -> str:
        return "; ".join(err.messages) or err.type_name

    def _api_error(
        self, resp: httpx.Response, desc: str, guest_path: str | None = None
    ) -> RemoteError:
        status = resp.status_code
        if 300 <= status < 400:
            return ProtocolError(f"{desc}: unexpected redirect (HTTP {status}); not followed")
        v = parse.parse_error(resp.content)
        if v is None:
            if status in (404, 405):
                return _NoSuchOperation(f"{desc}: HTTP {status} without an API error body")
            if status in (429, 502, 503, 504):
                return ServiceUnavailable(
                    f"{desc}: HTTP {status} without an API error body", status=status
                )
            if 200 <= status < 300:
                return ProtocolError(f"{desc}: unexpected HTTP status {status}")
            return ProtocolError(f"{desc}: HTTP {status} without an API error body")
        if v.error_type == "OPERATION_NOT_FOUND":
            return _NoSuchOperation(f"{desc}: the server does not know this operation")
        text = self._scrub("; ".join(v.messages) or "no message")
        return v.exception(
            f"{desc} failed: {v.error_type}: {text}", status=status, path=guest_path
        )

    async def _retry(self, fn: Callable[[], Awaitable[Any]], what: str) -> Any:
        def on_retry(e: BaseException, delay: float) -> None:
            self.stats.retries += 1
            log.info("%s: %s; retrying in %.2fs", what, e, delay)

        return await retry_call(fn, self._backoff, clock=self._clock, on_retry=on_retry)

    async def _api(
        self,
        name: str,
        method: str,
        path: str,
        *,
        desc: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        guest: bool = False,
        guest_path: str | None = None,
        ok: tuple[int, ...] = (200,),
        retry: bool = True,
    ) -> Any:
        async def once() -> Any:
            return await self._api_once(
                name, method, path, desc=desc, params=params, body=body,
                guest=guest, guest_path=guest_path, ok=ok,
            )  # fmt: skip

        if retry:
            return await self._retry(once, desc)
        return await once()

    async def _api_once(
        self,
        name: str,
        method: str,
        path: str,
        *,
        desc: str,
        params: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        guest: bool,
        guest_path: str | None,
        ok: tuple[int, ...],
    ) -> Any:
        vc, _ = self._clients()
        if self._session is None:
            async with self._lock():
                if self._session is None:
                    await self._login_once()
        content = None
        headers = {"Accept": "application/json"}
        if body is not None:
            content = json.dumps(body, ensure_ascii=True).encode("ascii")
            headers["Content-Type"] = "application/json"
        url = httpx.URL(self._server.base_url + path)
        if params:
            url = url.copy_merge_params(params)
        relogged = False
        while True:
            gen = self._gen
            assert self._session is not None
            req = vc.build_request(
                method, url, content=content,
                headers={**headers, "vmware-api-session-id": self._session},
            )  # fmt: skip
            resp = await self._send(vc, req, name=name, desc=desc)
            if resp.status_code in ok:
                if not resp.content:
                    return None
                return parse.decode_json(resp.content, desc)
            err = self._api_error(resp, desc, guest_path)
            if isinstance(err, Unauthenticated):
                # vCenter answers UNAUTHENTICATED both for an expired session and for
                # refused guest credentials. Right after a login, or while the session
                # still answers GET /api/session, it is the guest account.
                if guest and (relogged or await self._session_alive(vc, gen)):
                    user = self.config.guest.user_name or "(default user)"
                    raise GuestAuthFailed(
                        f"guest login as {user} refused by {desc.split(' on ', 1)[-1]}:"
                        f" {self._server_text(err)}",
                        status=err.status,
                        messages=err.messages,
                        path=guest_path,
                    ) from err
                if not relogged:
                    await self._relogin(gen)
                    relogged = True
                    continue
            raise err

    # --- VMs --------------------------------------------------------------------------------

    def _counting(self) -> _ErrorCounter:
        return _ErrorCounter(self.stats)

    async def find_vm(self, name_or_id: str) -> VmInfo:
        with self._counting():
            found: list[VmInfo] = []
            looks_like_id = name_or_id.startswith("vm-") and name_or_id[3:].isdigit()
            if looks_like_id:
                data = await self._api(
                    "vm.list", "GET", "/api/vcenter/vm", params={"vms": name_or_id},
                    desc=f"look up VM {name_or_id}",
                )  # fmt: skip
                found = [v for v in parse.parse_vm_list(data) if v.vm == name_or_id]
            if not found:
                data = await self._api(
                    "vm.list", "GET", "/api/vcenter/vm", params={"names": name_or_id},
                    desc=f"look up VM {name_or_id}",
                )  # fmt: skip
                found = [v for v in parse.parse_vm_list(data) if v.name == name_or_id]
            if not found:
                raise NotFound(
                    f"no VM named {name_or_id!r} (or with that id) on vCenter {self.vcenter_host}"
                )
            if len(found) > 1:
                ids = ", ".join(sorted(v.vm for v in found))
                raise ConfigError(
                    f"{len(found)} VMs are named {name_or_id!r}: {ids}; give the VM id instead"
                )
            return found[0]

    async def check_guest_ready(self, vm: str) -> None:
        with self._counting():
            base = f"/api/vcenter/vm/{_q(vm)}"
            data = await self._api(
                "vm.power", "GET", base + "/power", desc=f"power state of VM {vm}"
            )
            state = parse.parse_power_state(data)
            if state is not PowerState.POWERED_ON:
                word = "powered off" if state is PowerState.POWERED_OFF else "suspended"
                raise NotAllowedInCurrentState(f"VM {vm} is {word}")
            try:
                data = await self._api(
                    "vm.guest.operations", "GET", base + "/guest/operations",
                    desc=f"guest operations state of VM {vm}",
                )  # fmt: skip
                ready = parse.parse_guest_operations(data)
            except _NoSuchOperation:
                data = await self._api(
                    "vm.tools", "GET", base + "/tools", desc=f"VMware Tools state of VM {vm}"
                )
                ready = parse.parse_tools_running(data)
            if not ready:
                raise ServiceUnavailable(
                    f"VMware Tools is not running in VM {vm} (guest operations not ready)"
                )

    # --- files ------------------------------------------------------------------------------

    def _creds(self) -> dict[str, object]:
        return self.config.guest.to_json()

    async def list_dir(self, vm: str, path: str) -> list[DirEntry]:
        with self._counting():
            return await self._list_dir(vm, path)

    async def _list_dir(self, vm: str, path: str) -> list[DirEntry]:
        cfg = self.config
        desc = f"list {_show(path)} on VM {vm}"
        url = f"/api/vcenter/vm/{_q(vm)}/guest/filesystem/files?action=list"
        deadline = self._clock() + cfg.list_deadline
        entries: list[DirEntry] = []
        seen: set[str] = set()
        skipped: list[str] = []
        index = 0
        stalls = 0
        while True:
            if self._clock() > deadline:
                raise ProtocolError(f"{desc}: listing did not finish in {cfg.list_deadline:.0f}s")
            body = {
                "credentials": self._creds(),
                "path": path,
                "iteration": {"size": cfg.list_page_size, "index": index},
            }
            data = await self._api(
                "files.list", "POST", url, desc=desc, body=body, guest=True, guest_path=path
            )
            try:
                parsed = parse.parse_list_page(data)
            except ProtocolError as e:
                raise ProtocolError(f"{desc}: {e}") from e
            for ent in parsed.page.entries:
                if ent.name in seen:
                    skipped.append(f"duplicate name {_show(ent.name[:60])!r}")
                else:
                    seen.add(ent.name)
                    entries.append(ent)
            skipped.extend(parsed.skipped)
            index += parsed.raw_count
            if len(entries) > cfg.max_list_entries or index > 2 * cfg.max_list_entries:
                raise ProtocolError(f"{desc}: more than {cfg.max_list_entries} entries")
            if parsed.page.end_of_data:
                break
            if parsed.raw_count == 0:
                stalls += 1
                if stalls > cfg.list_max_stalls:
                    raise ProtocolError(
                        f"{desc}: server keeps answering READY without entries at index {index}"
                    )
            else:
                stalls = 0
        if skipped:
            log.warning(
                "%s: skipped %d invalid entries (first: %s)",
                desc,
                len(skipped),
                _show(skipped[0]),
            )
        return entries

    async def stat(self, vm: str, path: str) -> GuestStat:
        with self._counting():
            desc = f"stat {_show(path)} on VM {vm}"
            url = f"/api/vcenter/vm/{_q(vm)}/guest/filesystem/files/{_q(path)}?action=get"
            data = await self._api(
                "files.get", "POST", url, desc=desc, body={"credentials": self._creds()},
                guest=True, guest_path=path,
            )  # fmt: skip
            try:
                return parse.parse_stat(data)
            except ProtocolError as e:
                raise ProtocolError(f"{desc}: {e}") from e

    # --- transfers --------------------------------------------------------------------------

    async def create_transfer(self, vm: str, path: str) -> str:
        with self._counting():
            url: str = await self._retry(
                lambda: self._create_transfer_once(vm, path),
                f"create transfer of {_show(path)} on VM {vm}",
            )
            return url

    async def _create_transfer_once(self, vm: str, path: str) -> str:
        desc = f"create transfer of {_show(path)} on VM {vm}"
        base = f"/api/vcenter/vm/{_q(vm)}/guest/filesystem"
        raw: Any
        if self._transfer_api != "preview":
            try:
                raw = await self._api(
                    "transfer.create", "POST", base + "?action=create", desc=desc,
                    body={"credentials": self._creds(), "spec": {"path": path}},
                    guest=True, guest_path=path, ok=(200, 201), retry=False,
                )  # fmt: skip
                self._transfer_api = "released"
            except _NoSuchOperation:
                if self.config.api != "auto" or self._transfer_api == "released":
                    raise
                log.info("vCenter has no released transfer API; using the preview form")
                self._transfer_api = "preview"
        if self._transfer_api == "preview":
            raw = await self._api(
                "transfer.get", "GET", base, desc=desc,
                body={"path": path, "credentials": self._creds()},
                guest=True, guest_path=path, ok=(200, 201), retry=False,
            )  # fmt: skip
        try:
            url = parse.parse_transfer_url(raw)
        except ProtocolError as e:
            raise ProtocolError(f"{desc}: {e}") from e
        return check_transfer_url(
            url,
            self._server,
            insecure=self.config.insecure,
            allow_http=self.config.allow_http,
            esx_hosts=self.config.esx_hosts,
            pinned_hosts=self._pins.keys(),
        )

    async def download(
        self,
        vm: str,
        path: str,
        expected_size: int,
        sink: Callable[[bytes], Awaitable[None]],
    ) -> TransferResult:
        """Fetch a whole guest file into ``sink``; retried only until the first byte."""
        with self._counting():
            started = [False]
            t0 = time.perf_counter()

            async def attempt() -> tuple[int, str, str]:
                url = await self._create_transfer_once(vm, path)
                return await self._fetch(url, vm, path, expected_size, sink, started)

            def retryable(e: BaseException) -> bool:
                return not started[0] and is_retryable(e)

            def on_retry(e: BaseException, delay: float) -> None:
                self.stats.retries += 1
                log.info("download of %s: %s; retrying in %.2fs", _show(path), e, delay)

            n, digest, md5 = await retry_call(
                attempt, self._backoff, clock=self._clock, retryable=retryable, on_retry=on_retry
            )
            self.stats.downloads += 1
            return TransferResult(
                nbytes=n, sha256=digest, seconds=time.perf_counter() - t0, md5=md5
            )

    def _transfer_context(self, host: str, port: int, same: bool) -> Any:
        # Built once (pins: once per host): loading a CA bundle per file showed in profiles.
        sha = self._pins.get((host, port)) or self._pins.get((host, None))
        cfg = self.config
        key: Any = ("pin", sha) if sha is not None and not cfg.insecure else ("ca", same)
        ctx = self._transfer_contexts.get(key)
        if ctx is None:
            if key[0] == "pin":
                ctx = tls.pinned_context(sha)  # type: ignore[arg-type]
            else:
                ctx = self._context(cfg.ca_file if same else (cfg.esx_ca_file or cfg.ca_file))
            self._transfer_contexts[key] = ctx
        return ctx

    async def _fetch_threaded(
        self,
        u: httpx.URL,
        port: int,
        same: bool,
        expected: int,
        sink: Callable[[bytes], Awaitable[None]],
        started: list[bool],
        desc: str,
    ) -> tuple[int, str, str]:
        cfg = self.config
        host = (u.host or "").lower()
        where = f"{host}:{port}"
        target = u.raw_path.decode("ascii")
        body = BodyGet(
            scheme=u.scheme,
            host=host,
            port=port,
            target=target,
            context=self._transfer_context(host, port, same) if u.scheme == "https" else None,
            connect_timeout=cfg.call_timeout,
            stall_timeout=cfg.transfer_stall_timeout,
            expected=expected,
            desc=desc,
            where=where,
            pool=self._body_pool,
        )
        self.stats.calls["transfer.get"] += 1
        t0 = time.perf_counter()
        send, recv = trio.open_memory_channel[bytes](4)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, body, send, "transfer.get", self._breaker(where))
                async with recv:
                    async for data in recv:
                        started[0] = True
                        self.stats.bytes_downloaded += len(data)
                        await sink(data)
        except BaseException as e:
            # Callers expect this layer's own exceptions, not a nursery's group of one.
            leaf = _sole(e)
            if leaf is e:
                raise
            raise leaf from leaf.__cause__
        if self.config.debug:
            log.debug("GET %s 200 %.1fms", redact_url(str(u)), (time.perf_counter() - t0) * 1e3)
        return body.nbytes, body.digest, body.md5

    async def _fetch(
        self,
        url: str,
        vm: str,
        path: str,
        expected: int,
        sink: Callable[[bytes], Awaitable[None]],
        started: list[bool],
    ) -> tuple[int, str, str]:
        cfg = self.config
        vc, esx = self._clients()
        u = httpx.URL(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        # `*` with vCenter's own port: the vCenter listener (vCenter's CA); else ESX's CA.
        same = (u.host or "").lower() == self._server.host and port == self._server.port
        client = vc if same else esx
        desc = f"download of {_show(path)} from VM {vm}"
        if self._transport is None and self._esx_transport is None:
            return await self._fetch_threaded(u, port, same, expected, sink, started, desc)
        req = client.build_request("GET", u, headers={"Accept-Encoding": "identity"})
        resp = await self._send(client, req, name="transfer.get", desc=desc, stream=True)
        where = f"{u.host}:{u.port}" if u.port else str(u.host)
        try:
            status = resp.status_code
            if 300 <= status < 400:
                raise UnsafeTransferUrl(f"{desc}: {where} answered with a redirect; refused")
            if status != 200:
                raise TransferError(f"{desc}: {where} answered HTTP {status}")
            cl = resp.headers.get("content-length")
            if cl is not None and (not cl.strip().isdigit() or int(cl) != expected):
                raise TransferError(
                    f"{desc}: Content-Length {cl[:30]!r} differs from the expected"
                    f" size {expected}"
                )
            enc = resp.headers.get("content-encoding", "identity").strip().lower()
            if enc not in ("", "identity"):
                raise TransferError(f"{desc}: unexpected Content-Encoding {enc[:30]!r}")
            h = hashlib.sha256()
            h5 = hashlib.md5(usedforsecurity=False)
            n = 0
            buf: list[bytes] = []
            buflen = 0
            it = resp.aiter_raw()
            stall = cfg.transfer_stall_timeout
            while True:
                with trio.move_on_after(stall) as cs:
                    try:
                        chunk = await it.__anext__()
                    except StopAsyncIteration:
                        break
                    except httpx.HTTPError as e:
                        raise TransferError(
                            f"{desc}: connection broke after {n} of {expected} bytes:"
                            f" {self._scrub(_transport_reason(e))}"
                        ) from e
                if cs.cancelled_caught:
                    raise TransferError(
                        f"{desc}: no data for {stall:.0f}s after {n} of {expected} bytes"
                    ) from trio.TooSlowError()
                n += len(chunk)
                if n > expected:
                    raise TransferError(f"{desc}: more than the expected {expected} bytes")
                h.update(chunk)
                h5.update(chunk)
                buf.append(chunk)
                buflen += len(chunk)
                if buflen >= CHUNK:
                    data = buf[0] if len(buf) == 1 else b"".join(buf)
                    buf.clear()
                    buflen = 0
                    started[0] = True
                    self.stats.bytes_downloaded += len(data)
                    await sink(data)
            if n != expected:
                raise TransferError(f"{desc}: got {n} of {expected} bytes (transfer cut short)")
            if buf:
                data = b"".join(buf)
                started[0] = True
                self.stats.bytes_downloaded += len(data)
                await sink(data)
            return n, h.hexdigest(), h5.hexdigest()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await resp.aclose()


def _sole(e: BaseException) -> BaseException:
    subs = getattr(e, "exceptions", None)
    while isinstance(subs, tuple) and len(subs) == 1:
        e = subs[0]
        subs = getattr(e, "exceptions", None)
    return e


async def _pump(
    body: BodyGet, send: trio.MemorySendChannel[bytes], name: str, breaker: CircuitBreaker
) -> None:
    probe = breaker.before_call()
    try:
        async with send:
            await trio.to_thread.run_sync(body.run, send, abandon_on_cancel=True)
    except (TransportError, TlsError) as e:
        (breaker.release if isinstance(e, TlsError) else breaker.failure)(probe)
        raise
    except BaseException:
        breaker.release(probe)
        raise
    finally:
        body.abort()  # a cancelled wait must not leave the thread reading
    breaker.success(probe)


class _ErrorCounter:
    """Counts RemoteError/ConfigError subclasses raised by a public method in stats.errors."""

    def __init__(self, stats: ClientStats) -> None:
        self.stats = stats

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, (RemoteError, ConfigError)):
            name = "ProtocolError" if isinstance(exc, _NoSuchOperation) else type(exc).__name__
            self.stats.errors[name] += 1

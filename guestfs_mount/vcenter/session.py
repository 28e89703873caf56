"""HTTP plumbing shared by every transport: pools, TLS, breaker, caps, error translation.

One :class:`Http` per client. It owns the httpx clients (API calls spread over small
shards), the TLS contexts (CA bundles, pins, the transfer hosts' contexts built once), a
circuit breaker per ``host:port`` (and one per VM for its guest calls), the retry budget,
and :meth:`Http.send`, which every API call of every transport goes through: it refuses
content encodings, caps the reply body, and translates transport failures into
:mod:`guestfs_mount.errors` without secrets.
:class:`SessionSlot` is the login/relogin bookkeeping each transport keeps its token in.
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import httpx
import trio

from guestfs_mount.errors import (
    ConfigError,
    ProtocolError,
    RemoteError,
    RemoteTimeout,
    TlsError,
    TransportError,
    iter_chain,
)
from guestfs_mount.model import GuestCredentials

from . import tls
from .retry import Backoff, CircuitBreaker, retry_call
from .urls import Server, redact, split_host_port

log = logging.getLogger("guestfs_mount.vcenter.client")

__all__ = [
    "MAX_REPLY",
    "ClientConfig",
    "ClientStats",
    "ErrorCounter",
    "Http",
    "Reply",
    "SessionSlot",
    "TransportName",
    "guest_vm",
    "show",
]

# The VM whose guest a call serves (set by the client around each guest operation). A
# guest call that times out says that guest hangs, not that vCenter does: it opens that
# VM's breaker only, so one hung guest of a fleet never fails the others' calls fast.
guest_vm: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "guestfs_guest_vm", default=None
)

MAX_REPLY = 8 << 20  # bytes of one API reply; a listing page of 5,000 entries is ~2 MiB
T = TypeVar("T")
TransportName = str  # "rest" | "preview" | "vi-json" | "soap"
API_CHOICES = ("auto", "rest", "preview", "vi-json", "soap")
_ALIASES = {"released": "rest"}  # the name of --api rest before the vim25 transports
_EMPTY: Mapping[str, str] = {}


# httpcore's DEBUG lines dump response headers as ``(b'name', b'value')`` pairs: the
# VI/JSON session id and the SOAP session cookie arrive that way.
_SESSION_HEADER = re.compile(
    r"""\(b?['"](?:vmware-api-session-id|set-cookie|cookie)['"],\s*b?(['"]).*?\1\)""",
    re.IGNORECASE,
)


class _RedactFilter(logging.Filter):
    """httpx/httpcore log request URLs at INFO/DEBUG; transfer URLs carry ``token=``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        red = _SESSION_HEADER.sub("(<session header>, <redacted>)", redact(msg))
        if red != msg:
            record.msg = red
            record.args = None
        return True


# A logger's filters see only its own records, not its children's: name each one.
for _name in (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
):
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
    api: str = "auto"  # one of API_CHOICES ("released" is read as "rest")
    call_timeout: float = 30.0  # one HTTP exchange
    retry_budget: float = 20.0  # total seconds of retrying busy/unavailable/transport errors
    transfer_stall_timeout: float = 60.0
    max_list_entries: int = 1_000_000
    list_page_size: int = 1000
    max_list_page: int = 5000  # vim25 pages ask for the remaining count up to this
    max_reply: int = MAX_REPLY
    max_connections: int = 64
    # Most guest operations in flight per VM (--guest-ops): 1 + control delay / service
    # time keeps a one-at-a-time guest busy (~8 at 80 ms over ~12 ms, more as the delay
    # varies); the lane adapts below it, and background work gets 3/4 of its limit, so
    # the ceiling sits above what the lane needs.
    guest_ops: int = 16
    # Most guest operations and transfers in flight over all VMs (a fleet mount's
    # --max-guest-ops); None: no cap beyond each VM's lane.
    max_guest_ops: int | None = None
    debug: bool = False
    # --- tuning knobs (defaults are fine; tests shrink them) ---
    list_deadline: float = 600.0  # one list_dir may not run longer
    list_max_stalls: int = 3  # pages without progress tolerated in a row
    backoff_start: float = 0.1
    backoff_cap: float = 2.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 5.0

    def __post_init__(self) -> None:
        # A bad --esx-host is a usage error at start-up, not an EIO at the first open.
        for pattern in self.esx_hosts:
            split_host_port(pattern, "--esx-host")

    @property
    def api_choice(self) -> str:
        api = _ALIASES.get(self.api, self.api)
        if api not in API_CHOICES:
            raise ConfigError(f"unknown API {self.api!r} (choose from {', '.join(API_CHOICES)})")
        return api


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


class ErrorCounter:
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
            name = "ProtocolError" if isinstance(exc, NoSuchOperation) else type(exc).__name__
            self.stats.errors[name] += 1


class NoSuchOperation(ProtocolError):
    """The server does not know the endpoint (OPERATION_NOT_FOUND or a bare 404/405)."""


def show(path: str) -> str:
    """A guest path printable anywhere (lone surrogates -> backslash escapes)."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def transport_reason(exc: BaseException) -> str:
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


@dataclass(frozen=True)
class Reply:
    """One API answer, its body read in full (within the cap)."""

    status: int
    headers: httpx.Headers
    content: bytes


class _CallBreakers:
    """The breakers one API call answers to: its server's, and for a guest call that
    VM's (see :data:`guest_vm`). Raises CircuitOpen if either is open."""

    def __init__(self, host: CircuitBreaker, vm: CircuitBreaker | None) -> None:
        self.host, self.vm = host, vm
        self._probe = host.before_call()
        try:
            self._vm_probe = vm.before_call() if vm is not None else False
        except BaseException:
            host.release(self._probe)
            raise

    def success(self) -> None:
        self.host.success(self._probe)
        if self.vm is not None:
            self.vm.success(self._vm_probe)

    def failure(self) -> None:
        """A transport failure (refused, reset): the server's, not the guest's."""
        self.host.failure(self._probe)
        if self.vm is not None:
            self.vm.release(self._vm_probe)

    def release(self) -> None:
        self.host.release(self._probe)
        if self.vm is not None:
            self.vm.release(self._vm_probe)

    def timeout(self) -> None:
        """A whole call_timeout without an answer: the server (for a guest call, that
        guest) is down or hung. Open at once, so queued requests fail fast instead of
        each waiting (the kernel serializes lookups in one directory)."""
        if self.vm is None:
            self.host.failure(self._probe, weight=self.host.threshold)
            return
        self.host.release(self._probe)
        self.vm.failure(self._vm_probe, weight=self.vm.threshold)


class SessionSlot:
    """A transport's session token with its generation: concurrent callers that all see
    an expired session log in again once, not once each."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.gen = 0
        self._lock: trio.Lock | None = None

    def lock(self) -> trio.Lock:
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    def set(self, token: str) -> None:
        self.token = token
        self.gen += 1

    async def ensure(self, login: Callable[[], Awaitable[None]]) -> None:
        if self.token is None:
            async with self.lock():
                if self.token is None:
                    await login()

    async def renew(
        self, gen: int, login: Callable[[], Awaitable[None]], stats: ClientStats, what: str
    ) -> None:
        async with self.lock():
            if self.gen == gen:
                log.info("%s session expired; logging in again", what)
                await login()
                stats.relogins += 1


class Http:
    """The HTTP side of one client (see the module docstring)."""

    def __init__(
        self,
        config: ClientConfig,
        server: Server,
        *,
        transport: httpx.AsyncBaseTransport | None,
        clock: Callable[[], float],
        rng: random.Random,
        stats: ClientStats,
        secrets: Callable[[], tuple[str | None, ...]],
    ) -> None:
        self.config = config
        self.server = server
        self.stats = stats
        self.pins = tls.pins_by_key(config.thumbprints)
        self._transport = transport
        self.clock = clock
        self._secrets = secrets
        self.backoff = Backoff(
            start=config.backoff_start,
            cap=config.backoff_cap,
            budget=config.retry_budget,
            rng=rng,
        )
        self._breakers: dict[str, CircuitBreaker] = {}
        # API calls are spread over several small pools: httpcore scans every pooled
        # connection (a select() each, O(n^2) bookkeeping) on every request, which made
        # one 64-connection pool cost ~2 ms of CPU per stat. Shards of 4 keep it cheap.
        self._shards: list[httpx.AsyncClient] = []
        self._in_flight: dict[int, int] = {}  # id(shard) -> requests in flight
        self._transfer_contexts: dict[tuple[str, str | bool], ssl.SSLContext] = {}
        self._warned_insecure = False

    # --- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        if not self._shards:
            per_shard = 4
            count = 1 if self._transport is not None else max(1, self.config.max_connections // 4)
            self._shards = [self._make_client(per_shard) for _ in range(count)]

    async def aclose(self) -> None:
        shards, self._shards = self._shards, []
        with trio.CancelScope(shield=True):
            for shard in shards:
                await shard.aclose()

    def scrub(self, text: str) -> str:
        return redact(text, self._secrets())

    def breaker(self, key: str) -> CircuitBreaker:
        b = self._breakers.get(key)
        if b is None:
            b = self._breakers[key] = CircuitBreaker(
                key,
                threshold=self.config.breaker_threshold,
                cooldown=self.config.breaker_cooldown,
                clock=self.clock,
            )
        return b

    async def retry(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        def on_retry(e: BaseException, delay: float) -> None:
            self.stats.retries += 1
            log.info("%s: %s; retrying in %.2fs", what, e, delay)

        return await retry_call(fn, self.backoff, clock=self.clock, on_retry=on_retry)

    # --- TLS --------------------------------------------------------------------------

    def _context(self, cafile: str | None) -> ssl.SSLContext:
        if self.config.insecure:
            if not self._warned_insecure:
                self._warned_insecure = True
                log.warning(
                    "TLS verification is disabled (--insecure): any certificate and any"
                    " transfer host is accepted"
                )
            return tls.insecure_context()
        return tls.ca_context(cafile)

    def transfer_context(self, host: str, port: int, same: bool) -> ssl.SSLContext:
        """The context for a transfer GET: the pin of ``host:port`` if any, else vCenter's
        CA (``same``: the URL is on vCenter's own listener) or the ESXi CA. Built once
        (pins: once per host): loading a CA bundle per file showed in profiles."""
        cfg = self.config
        sha = self.pins.get((host, port)) or self.pins.get((host, None))
        key: tuple[str, str | bool] = (
            ("pin", sha) if sha is not None and not cfg.insecure else ("ca", same)
        )
        ctx = self._transfer_contexts.get(key)
        if ctx is None:
            if sha is not None and key[0] == "pin":
                ctx = tls.pinned_context(sha)
            else:
                ctx = self._context(cfg.ca_file if same else (cfg.esx_ca_file or cfg.ca_file))
            self._transfer_contexts[key] = ctx
        return ctx

    # --- clients ----------------------------------------------------------------------

    def _make_client(self, max_connections: int) -> httpx.AsyncClient:
        cfg = self.config
        timeout = httpx.Timeout(cfg.call_timeout)
        if self._transport is not None:
            return httpx.AsyncClient(
                transport=self._transport, follow_redirects=False, trust_env=False,
                timeout=timeout,
            )  # fmt: skip
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        )
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        for (host, port), sha in self.pins.items():
            h = f"[{host}]" if ":" in host else host
            key = f"all://{h}" + (f":{port}" if port else "")
            mounts[key] = httpx.AsyncHTTPTransport(
                verify=tls.pinned_context(sha), limits=limits, trust_env=False
            )
        return httpx.AsyncClient(
            verify=self._context(cfg.ca_file),
            limits=limits,
            mounts=mounts,
            follow_redirects=False,
            trust_env=False,
            timeout=timeout,
        )

    def client(self) -> httpx.AsyncClient:
        self.open()
        if len(self._shards) == 1:
            return self._shards[0]
        # The least busy shard, the first of equals: a lone caller keeps reusing one
        # warm connection (no TLS handshake), concurrent callers spread out.
        return min(self._shards, key=lambda c: self._in_flight.get(id(c), 0))

    # --- one exchange -----------------------------------------------------------------

    def _translate(self, e: BaseException, netloc: str, desc: str) -> RemoteError:
        ssl_err = tls.find_ssl_error(e)
        if ssl_err is not None:
            reason = self.scrub(tls.ssl_reason(ssl_err))
            return TlsError(
                f"TLS certificate of {netloc} not trusted: {reason} (use --ca-file or --thumbprint)"
            )
        if isinstance(e, (trio.TooSlowError, httpx.TimeoutException)):
            return RemoteTimeout(f"{desc}: no answer from {netloc} in time ({type(e).__name__})")
        return TransportError(f"{desc}: cannot talk to {netloc}: {self.scrub(transport_reason(e))}")

    async def send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        name: str,
        desc: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> Reply:
        """One API exchange under the breaker and ``fail_after(call_timeout)``.

        The reply must come unencoded (we ask for ``identity``: a gzip bomb is refused,
        not inflated) and within ``max_reply`` bytes; anything else is a ProtocolError.
        """
        client = self.client()
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        request = client.build_request(method, url, headers=hdrs, content=content)
        u = request.url
        netloc = f"{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}"
        vm = guest_vm.get()
        breakers = _CallBreakers(
            self.breaker(netloc),
            self.breaker(f"{netloc} (guest of VM {vm})") if vm is not None else None,
        )
        self.stats.calls[name] += 1
        t0 = time.perf_counter()
        cap = self.config.max_reply
        try:
            self._in_flight[id(client)] = self._in_flight.get(id(client), 0) + 1
            try:
                with trio.fail_after(self.config.call_timeout):
                    resp = await client.send(request, stream=True)
                    try:
                        enc = resp.headers.get("content-encoding", "identity").strip().lower()
                        if enc not in ("", "identity"):
                            raise ProtocolError(
                                f"{desc}: reply has Content-Encoding {enc[:30]!r}; refused"
                            )
                        cl = resp.headers.get("content-length", "").strip()
                        if cl.isdigit() and int(cl) > cap:
                            raise ProtocolError(
                                f"{desc}: reply of {int(cl)} bytes is larger than {cap}; refused"
                            )
                        parts: list[bytes] = []
                        size = 0
                        async for chunk in resp.aiter_raw():
                            size += len(chunk)
                            if size > cap:
                                raise ProtocolError(
                                    f"{desc}: reply is larger than {cap} bytes; refused"
                                )
                            parts.append(chunk)
                    finally:
                        await resp.aclose()
            finally:
                self._in_flight[id(client)] -= 1
        except (trio.TooSlowError, httpx.TransportError) as e:
            err = self._translate(e, netloc, desc)
            if isinstance(err, TlsError):
                breakers.release()
            elif isinstance(err, RemoteTimeout):
                breakers.timeout()
            else:
                breakers.failure()
            raise err from e
        except httpx.HTTPError as e:
            breakers.release()
            raise ProtocolError(f"{desc}: {type(e).__name__}: {self.scrub(str(e))}") from e
        except ProtocolError:
            breakers.success()  # the server answered; what it said is the problem
            raise
        except BaseException:
            breakers.release()
            raise
        breakers.success()
        if self.config.debug:
            log.debug(
                "%s %s %d %.1fms",
                method,
                u.raw_path.decode("ascii", "replace"),
                resp.status_code,
                (time.perf_counter() - t0) * 1000,
            )
        return Reply(resp.status_code, resp.headers, b"".join(parts))

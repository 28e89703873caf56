"""What a guest operation costs: the ``ideal`` and ``realistic`` cost models.

A real VM runs its guest operations one at a time (see real-guest-ops.md): every call
pays a control-plane delay (client -> vCenter -> host -> VMX, in parallel across calls)
and then waits for the VM's one *guest lane*, where the guest authenticates the user
again and does the work. Transfer bodies cross the same lane in ~62 KiB packets.

:class:`GuestCost` is that model. Every guest operation of every transport goes through
it, as one line around the handler's work::

    async with state.cost.guest_op(vm, "files.list", "rest") as op:
        account = state.guest_login(creds)      # a GuestAuthError holds the lane
        entries = await trio.to_thread.run_sync(state.scan_dir, vm, account, path)
        op.listed(scanned=len(entries), returned=len(page))

and every body chunk through ``await state.cost.packet(vm, nbytes)``. The ``ideal``
model (the default) has no delay, an unlimited lane and no rejections: the simulator's
behaviour before the model existed. Both models count per VM.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any

import trio

from .vapi import VapiError

MODELS = ("ideal", "realistic")
PACKET_SIZE = 0xF800  # govmomi toolbox/hgfs: LargePacketMax, ~62 KiB
RECENT = 256  # lane uses kept in the per-VM log of /_sim/stats

# the kinds whose work is one stat of one file
STAT_KINDS = frozenset({"files.get", "transfer.create", "transfer.preview"})


class CostError(ValueError):
    """A malformed cost setting (CLI, config file or ``POST /_sim/cost``)."""


class GuestAuthError(VapiError):
    """The guest refused the credentials. Raised inside a guest_op, it holds the lane
    for ``bad_password_delay`` (PAM's failure delay) before the call fails."""


@dataclass
class CostSettings:
    """Every knob of the model; ``model`` picks the preset the others start from."""

    model: str = "ideal"
    control_delay: float = 0.0  # s per API call, paid in parallel
    control_jitter: float = 0.5  # +- fraction of control_delay, uniform
    guest_concurrency: int = 0  # lane servers per VM; 0 = unlimited
    auth_posix: float = 0.0  # s per lane use, POSIX guest (PAM)
    auth_windows: float = 0.0  # s per lane use, Windows guest
    scan_entry: float = 0.0  # s per entry of the whole directory, per listing page
    return_entry: float = 0.0  # s per entry returned in a listing page
    stat_time: float = 0.0  # s per stat (files.get, transfer create)
    packet_time: float = 0.0  # s per transfer-body packet
    packet_size: int = PACKET_SIZE  # bytes per packet
    queue_threshold: int = 0  # waiting calls beyond this may be rejected; 0 = never
    reject_step: float = 0.25  # rejection probability per waiting call beyond it
    bad_password_delay: float = 0.0  # s the lane is held by a refused login
    keep_alive: bool = True  # ESXi listener keeps connections after a body

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Every figure of "realistic" is an estimate (nobody published them): see docs/simulator.md.
PRESETS: dict[str, dict[str, Any]] = {
    "ideal": {},
    "realistic": {
        "control_delay": 0.080,
        "control_jitter": 0.5,
        "guest_concurrency": 1,
        "auth_posix": 0.010,
        "auth_windows": 0.100,
        "scan_entry": 0.000_02,
        "return_entry": 0.000_1,
        "stat_time": 0.002,
        "packet_time": 0.002,
        "queue_threshold": 8,
        "reject_step": 0.25,
        "bad_password_delay": 2.0,
        "keep_alive": False,
    },
}

_FLOAT_KNOBS = (
    "control_delay",
    "control_jitter",
    "auth_posix",
    "auth_windows",
    "scan_entry",
    "return_entry",
    "stat_time",
    "packet_time",
    "reject_step",
    "bad_password_delay",
)
_INT_KNOBS = ("guest_concurrency", "queue_threshold")
KNOBS = ("model", *_FLOAT_KNOBS, *_INT_KNOBS, "packet_size", "keep_alive")


def settings_from(body: dict[str, Any], base: CostSettings | None = None) -> CostSettings:
    """``base`` (or the ideal defaults) changed by ``body``; ``model`` first resets every
    knob to that model's preset, then the other keys apply. Validates everything."""
    unknown = set(body) - set(KNOBS)
    if unknown:
        raise CostError(f"unknown cost setting(s): {sorted(unknown)}")
    out = CostSettings(**(base or CostSettings()).to_json())
    if "model" in body:
        model = body["model"]
        if model not in MODELS:
            raise CostError(f"model must be one of {list(MODELS)}")
        out = CostSettings(model=model, **PRESETS[model])
    for key, value in body.items():
        if key == "model":
            continue
        if key == "keep_alive":
            if not isinstance(value, bool):
                raise CostError("keep_alive must be a boolean")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CostError(f"{key} must be a number")
        elif key in _INT_KNOBS or key == "packet_size":
            if value != int(value) or value < 0:
                raise CostError(f"{key} must be a non-negative integer")
            value = int(value)
            if key == "packet_size" and value < 512:
                raise CostError("packet_size must be at least 512")
        elif value < 0 or not math.isfinite(value):
            raise CostError(f"{key} must be a non-negative number")
        else:
            value = float(value)
        setattr(out, key, value)
    if out.control_jitter > 1:
        raise CostError("control_jitter must be between 0 and 1")
    return out


@dataclass
class VmCounters:
    """What /_sim/stats reports for one VM."""

    calls: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    packets: int = 0
    packet_bytes: int = 0
    busy: float = 0.0  # lane busy seconds (sum over servers)
    max_queue: int = 0  # most calls seen waiting for the lane
    queue_s: float = 0.0  # integral of the calls waiting for the lane over time (call-seconds)
    max_serving: int = 0  # most lane uses seen in service at once
    rejections: int = 0
    auth_failures: int = 0
    arrived: int = 0  # sequence numbers of lane uses, in arrival / service order
    served: int = 0
    recent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )

    def to_json(self) -> dict[str, Any]:
        by_transport: dict[str, dict[str, int]] = {}
        by_kind: collections.Counter[str] = collections.Counter()
        for (transport, kind), n in sorted(self.calls.items()):
            by_transport.setdefault(transport, {})[kind] = n
            by_kind[kind] += n
        return {
            "calls": dict(by_kind),
            "calls_by_transport": by_transport,
            "packets": self.packets,
            "packet_bytes": self.packet_bytes,
            "lane_busy_s": round(self.busy, 6),
            "max_queue": self.max_queue,
            "lane_queue_s": round(self.queue_s, 6),
            "max_serving": self.max_serving,
            "rejections": self.rejections,
            "auth_failures": self.auth_failures,
            "recent": list(self.recent),
        }


class Lane:
    """One VM's guest channel: a FIFO with ``servers`` servers (trio's CapacityLimiter
    wakes its waiters in arrival order).

    It also integrates its queue over time: ``queued`` calls are waiting for a server
    (the ones in service are not counted, as in ``max_queue``), and every change of that
    number first adds ``queued x (now - since)`` to the VM's ``queue_s``, so the mean
    queue over any window is the integral's growth divided by the window's length."""

    def __init__(self, servers: int) -> None:
        self.limiter = trio.CapacityLimiter(servers if servers > 0 else math.inf)
        self.serving = 0
        self.queued = 0
        self.since = 0.0

    def resize(self, servers: int) -> None:
        self.limiter.total_tokens = servers if servers > 0 else math.inf

    def accrue(self, counters: VmCounters, now: float) -> None:
        """Add the queue since the last change (or reset) to ``counters``."""
        counters.queue_s += self.queued * (now - self.since)
        self.since = now

    @property
    def waiting(self) -> int:
        return int(self.limiter.statistics().tasks_waiting)


class GuestCost:
    """The cost model and its per-VM lanes and counters (one per simulator)."""

    def __init__(
        self,
        settings: CostSettings | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.settings = settings or CostSettings()
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = clock
        self.lanes: dict[str, Lane] = {}
        self.counters: dict[str, VmCounters] = {}

    # ---- settings ------------------------------------------------------------------
    def update(self, body: dict[str, Any]) -> None:
        """Apply a ``POST /_sim/cost`` body (``seed`` re-seeds the RNG)."""
        body = dict(body)
        if "seed" in body:
            seed = body.pop("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise CostError("seed must be an integer or null")
            new = settings_from(body, self.settings)
            self.seed = seed
            self.rng = random.Random(seed)
        else:
            new = settings_from(body, self.settings)
        self.settings = new
        for lane in self.lanes.values():
            lane.resize(new.guest_concurrency)

    def to_json(self) -> dict[str, Any]:
        return {**self.settings.to_json(), "seed": self.seed}

    def body_chunk(self, default: int) -> int:
        """Bytes per read of a transfer body: one packet when packets cost lane time."""
        s = self.settings
        if s.guest_concurrency > 0 or s.packet_time > 0 or s.auth_posix > 0 or s.auth_windows > 0:
            return s.packet_size
        return default

    # ---- per VM ------------------------------------------------------------------------
    def lane(self, vm_id: str) -> Lane:
        lane = self.lanes.get(vm_id)
        if lane is None:
            lane = self.lanes[vm_id] = Lane(self.settings.guest_concurrency)
        return lane

    def vm_counters(self, vm_id: str) -> VmCounters:
        c = self.counters.get(vm_id)
        if c is None:
            c = self.counters[vm_id] = VmCounters()
        return c

    def stats_json(self) -> dict[str, Any]:
        now = self._now()
        if now is not None:  # the queue integral up to this moment, not the last change
            for vm, lane in self.lanes.items():
                if vm in self.counters or lane.queued:  # a VM idle since a reset stays out
                    lane.accrue(self.vm_counters(vm), now)
        return {vm: c.to_json() for vm, c in sorted(self.counters.items())}

    def reset_stats(self) -> None:
        self.counters = {}
        now = self._now()
        if now is not None:  # calls still waiting count from the reset on
            for lane in self.lanes.values():
                lane.since = now

    def _now(self) -> float | None:
        """The clock, or None outside a trio run (then no lane has a waiting call)."""
        try:
            return self.clock()
        except RuntimeError:
            return None

    def auth_time(self, family: str) -> float:
        s = self.settings
        return s.auth_windows if family == "WINDOWS" else s.auth_posix

    # ---- the lane API ----------------------------------------------------------------
    def guest_op(self, vm: Any, kind: str, transport: str = "rest") -> GuestOp:
        """An async context manager around one guest operation on ``vm`` (a state.Vm).

        Entering it counts the call, pays the control-plane delay, may reject it with
        NOT_ALLOWED_IN_CURRENT_STATE when the lane's queue is too deep, and waits for
        the lane. Leaving it holds the lane for the service time (authentication plus
        the work charged), then releases it. The body runs while the lane is held."""
        return GuestOp(self, vm.vm, vm.family, kind, transport)

    async def packet(self, vm: Any, nbytes: int, transport: str = "esx") -> None:
        """One chunk of ``nbytes`` of a transfer body of ``vm`` (a state.Vm) crossing the
        lane: ``ceil(nbytes / packet_size)`` packets, each authenticated again. Packets
        are never rejected (the host re-issues them internally)."""
        s = self.settings
        n = max(1, math.ceil(nbytes / s.packet_size))
        c = self.vm_counters(vm.vm)
        c.packets += n
        c.packet_bytes += nbytes
        use = _LaneUse(self, vm.vm, "transfer.packet", transport)
        await use.enter(reject=False)
        await use.leave(n * (self.auth_time(vm.family) + s.packet_time))


class _LaneUse:
    """One pass through a VM's lane: arrive (maybe rejected), wait, hold, release."""

    def __init__(self, cost: GuestCost, vm_id: str, kind: str, transport: str) -> None:
        self.cost = cost
        self.vm_id = vm_id
        self.kind = kind
        self.transport = transport
        self.lane = cost.lane(vm_id)
        self.counters = cost.vm_counters(vm_id)
        self.token: object | None = None
        self.arrived = self.served = 0
        self.start = 0.0

    async def enter(self, reject: bool) -> None:
        s, c, lane = self.cost.settings, self.counters, self.lane
        # calls waiting for the lane, this one included when it has to wait too
        depth = lane.waiting + (1 if lane.limiter.available_tokens < 1 else 0)
        if reject and s.queue_threshold > 0 and depth > s.queue_threshold:
            p = min(1.0, (depth - s.queue_threshold) * s.reject_step)
            if self.cost.rng.random() < p:
                c.rejections += 1
                raise VapiError(
                    "NOT_ALLOWED_IN_CURRENT_STATE",
                    f"The operation is not allowed in the current state of virtual machine "
                    f"'{self.vm_id}': too many guest operations are in progress.",
                    msg_id="com.vmware.api.vcenter.vm.guest.operations.busy",
                    args=[self.vm_id],
                )
        c.max_queue = max(c.max_queue, depth)
        c.arrived += 1
        self.arrived = c.arrived
        token = object()
        # only a call that finds no free server queues (the same count as ``depth``)
        queues = lane.limiter.available_tokens < 1
        if queues:
            lane.accrue(c, self.cost.clock())
            lane.queued += 1
        try:
            await lane.limiter.acquire_on_behalf_of(token)
        finally:
            if queues:  # served, or its client went away while it waited
                lane.accrue(self.cost.vm_counters(self.vm_id), self.cost.clock())
                lane.queued -= 1
        self.token = token
        lane.serving += 1
        c.max_serving = max(c.max_serving, lane.serving)
        c.served += 1
        self.served = c.served
        self.start = self.cost.clock()

    async def leave(self, hold: float) -> None:
        """Hold the lane for ``hold`` seconds, then release it. Shielded: a client that
        goes away does not stop the guest working on its request."""
        c, lane = self.counters, self.lane
        try:
            if hold > 0:
                with trio.CancelScope(shield=True):
                    await trio.sleep(hold)
        finally:
            lane.serving -= 1
            lane.limiter.release_on_behalf_of(self.token)
            c.busy += self.cost.clock() - self.start
            c.recent.append(
                {
                    "kind": self.kind,
                    "transport": self.transport,
                    "arrived": self.arrived,
                    "served": self.served,
                }
            )


class GuestOp:
    """One guest operation (see GuestCost.guest_op)."""

    def __init__(self, cost: GuestCost, vm_id: str, family: str, kind: str, transport: str):
        self.cost = cost
        self.vm_id = vm_id
        self.family = family
        self.kind = kind
        self.transport = transport
        self.work = cost.settings.stat_time if kind in STAT_KINDS else 0.0
        self._use: _LaneUse | None = None

    def listed(self, scanned: int, returned: int) -> None:
        """Charge one listing page: the guest re-reads the whole directory (``scanned``
        entries) for every page and formats ``returned`` of them."""
        s = self.cost.settings
        self.work += scanned * s.scan_entry + returned * s.return_entry

    async def __aenter__(self) -> GuestOp:
        cost, s = self.cost, self.cost.settings
        cost.vm_counters(self.vm_id).calls[(self.transport, self.kind)] += 1
        if s.control_delay > 0:
            j = s.control_jitter
            await trio.sleep(s.control_delay * (1 + cost.rng.uniform(-j, j)))
        use = _LaneUse(cost, self.vm_id, self.kind, self.transport)
        await use.enter(reject=True)
        self._use = use
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._use is not None
        s = self.cost.settings
        auth_failed = isinstance(exc, GuestAuthError)
        if auth_failed:
            self._use.counters.auth_failures += 1
        extra = s.bad_password_delay if auth_failed else self.work
        await self._use.leave(self.cost.auth_time(self.family) + extra)

"""Per-VM scheduling of guest operations: one adaptive lane per VM, two priorities.

A real VM runs its guest operations one at a time (``../shared/docs/real-guest-ops.md``):
the control-plane delay is paid in parallel, the guest lane serially, so about
``1 + delay / service`` calls in flight keep the lane busy and more only lengthen its
queue. Each VM gets a :class:`Lane` whose in-flight limit adapts in the spirit of TCP
Vegas: once per *epoch* (a limit's worth of answers of one kind of call, at least
``_EPOCH`` of them) it estimates how many calls wait in the guest from the epoch's mean
round trip against an unloaded reference, grows while fewer than ``_ALPHA`` wait
(x1.5 per epoch until the guest first shows a queue, then +1), shrinks when more than
``_BETA`` wait or round trips doubled, and halves when the guest rejects.

Foreground calls (a syscall waits) are always served before background ones
(stat-ahead, list-ahead, prefetch: :data:`priority` set to ``BACKGROUND`` by
read-ahead's tasks); background calls take at most ``bg_fraction`` of the slots, so a
foreground call waits for at most the one operation ahead of it. A waiting background
call is promoted to foreground when a user request joins the fetch it is for (the
metadata cache's shared flights promote the :data:`urgency` of the task's fetch).

A transfer body occupies the VM's channel too (every ~62 KiB packet passes the guest
lane), for far longer than a call, so bodies do not hold a slot: a user's long ``cat``
must not stop an ``ls -l`` of the same VM. They take a *body token* instead
(:meth:`Lane.body`): a foreground body never waits for one; a background body
(prefetch) waits until no foreground call, nor any background call other than a
body's create (stat-ahead, list-ahead), waits and no foreground body runs on the VM;
at most background's share of the limit in number, and ``bg_body_bytes`` in bytes (at
least one), run at once.
"""

from __future__ import annotations

import contextvars
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    nullcontext,
)
from dataclasses import dataclass, field

import trio

from guestfs_mount.errors import NotAllowedInCurrentState, ResourceBusy, ServiceUnavailable
from guestfs_mount.urgency import Priority, priority, urgency

__all__ = ["Lane", "LaneStats", "Priority", "Scheduler", "is_rejection", "priority"]


# The control-plane delay varies (80 ms +- 50 % in the simulator's realistic model, and
# the client's own CPU adds to it), by far more than one guest operation's service
# time: a single round trip says little. A mean over many does: the lowest mean of
# _REF_CALLS consecutive round trips seen is the "nothing queued" reference (taken at
# the start, while the limit is still low). It creeps up slowly, so
# that it follows a lasting change of the path but not a lasting queue (the 64-call
# window of single round trips it replaces forgot the unloaded base within a second of
# full load, and the limit then grew into a queue 4 deep).
_REF_CALLS = 16  # round trips the reference is a mean of
_EPOCH = 4  # answers at least per epoch (a limit's worth once it is above)
_REF_CREEP = 1.002  # the reference may rise 0.2 % per epoch (doubles in ~350 epochs)
_ALPHA = 1.0  # calls waiting in the guest below which the limit grows ...
_BETA = 3.0  # ... and above which it shrinks (between: the lane busy, a short queue)
# A listing page's cost grows with its directory's size: a slow one says nothing about
# queueing, so it may only raise the limit (rejections and fixed-cost calls lower it).
_VARIABLE_KINDS = frozenset({"list"})

# The lane whose transfer body the current task is in (its create runs inside it).
_in_body: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "guestfs_in_body", default=None
)

_REJECTIONS = (NotAllowedInCurrentState, ResourceBusy, ServiceUnavailable)


def is_rejection(exc: BaseException) -> bool:
    """The guest (or vCenter) refused for load, not for the request itself."""
    return isinstance(exc, _REJECTIONS)


@dataclass
class _Epoch:
    """Round trips of one kind of call: the current epoch's sums and the reference."""

    ref: float = math.inf  # lowest mean of _REF_CALLS round trips (creeping up)
    settled: bool = False  # ref is such a mean (before: the lowest epoch mean)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_REF_CALLS))
    n: int = 0
    rtt_sum: float = 0.0
    load_sum: float = 0.0  # calls in flight when each answer came, summed


@dataclass
class LaneStats:
    calls: int = 0
    background_calls: int = 0
    rejections: int = 0
    max_in_flight: int = 0
    max_waiting: int = 0
    bodies: int = 0
    background_bodies: int = 0
    background_body_waits: int = 0  # background bodies that had to wait for the channel
    max_background_body_bytes: int = 0  # bytes of background bodies running at once


class Lane:
    """The in-flight limit and the two queues of one VM."""

    def __init__(
        self,
        max_limit: int,
        *,
        start: float = 2.0,
        bg_fraction: float = 0.75,
        bg_body_bytes: int = 4 << 20,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.max_limit = max(1, max_limit)
        self.limit = min(float(self.max_limit), max(1.0, start))
        self.bg_fraction = bg_fraction
        self.in_flight = 0
        self.bg_in_flight = 0
        # Round trips are compared within their kind: kinds differ by far more than
        # queueing does (a credential check returned in 11 ms where a stat takes 90 ms
        # on the same lane, and one all-kinds minimum read every stat as queued,
        # driving the limit to 1: every call then ran one at a time).
        self._epochs: dict[str, _Epoch] = {}
        self._slow_start = True  # until the guest first shows a queue
        self.stats = LaneStats()
        self._clock = clock
        self._waiting: dict[Priority, deque[trio.Event]] = {p: deque() for p in Priority}
        self.bg_body_bytes = bg_body_bytes
        self.fg_bodies = 0
        self.bg_bodies = 0
        self.bg_body_in_flight = 0  # bytes
        self._body_waiting: deque[tuple[trio.Event, int]] = deque()
        self._body_calls = 0  # slots held by the creates of running bodies
        # Waiting calls that are not a body's create: a reader's walk waits on them
        # (stat-ahead, list-ahead), sooner than on a prefetch.
        self._meta_waiting: set[trio.Event] = set()

    # -- admission -------------------------------------------------------------------

    def _bg_cap(self) -> int:
        return max(1, math.floor(self.limit * self.bg_fraction))

    def _admissible(self, prio: Priority) -> bool:
        if self.in_flight >= math.floor(self.limit):
            return False
        if prio is Priority.FOREGROUND:
            return True
        return not self._waiting[Priority.FOREGROUND] and self.bg_in_flight < self._bg_cap()

    def _wake(self) -> None:
        for prio in Priority:  # foreground first
            q = self._waiting[prio]
            while q and self._admissible(prio):
                ev = q.popleft()
                self._meta_waiting.discard(ev)
                self._take(prio)
                ev.set()
        self._wake_bodies()  # after the calls: a foreground waiter blocks them

    def _take(self, prio: Priority) -> None:
        self.in_flight += 1
        if prio is Priority.BACKGROUND:
            self.bg_in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)

    def _give(self, prio: Priority) -> None:
        self.in_flight -= 1
        if prio is Priority.BACKGROUND:
            self.bg_in_flight -= 1
        self._wake()

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @asynccontextmanager
    async def slot(
        self, prio: Priority | None = None, kind: str = "call"
    ) -> AsyncIterator[None]:
        """Hold one in-flight slot for the body; the body's duration is its round trip
        (compared with earlier ones of the same ``kind``), a rejection inside it lowers
        the limit."""
        prio = prio or priority.get()
        urgent = urgency.get()
        if urgent is not None and urgent.urgent:
            prio = Priority.FOREGROUND  # a user request has joined the fetch it is for
        if self._admissible(prio) and not self._waiting[prio]:
            self._take(prio)
        else:
            ev = trio.Event()
            self._waiting[prio].append(ev)
            if _in_body.get() is not self:
                self._meta_waiting.add(ev)
            self.stats.max_waiting = max(self.stats.max_waiting, self.waiting)

            def promote() -> None:
                # A user request joined the fetch while this call waits: it queues
                # behind the foreground calls waiting, ahead of every background one,
                # and is admitted (and held) as foreground, outside background's share.
                nonlocal prio
                if ev.is_set() or prio is Priority.FOREGROUND:
                    return  # admitted already: its slot and what it counts stay
                self._waiting[Priority.BACKGROUND].remove(ev)
                prio = Priority.FOREGROUND
                self._waiting[prio].append(ev)
                self._wake()

            listening: AbstractContextManager[None] = (
                urgent.listen(promote) if urgent is not None else nullcontext()
            )
            try:
                with listening:
                    await ev.wait()
            except BaseException:
                if ev.is_set():
                    self._give(prio)  # admitted just as we were cancelled
                else:
                    self._waiting[prio].remove(ev)
                    self._meta_waiting.discard(ev)
                    self._wake()
                raise
        self.stats.calls += 1
        if prio is Priority.BACKGROUND:
            self.stats.background_calls += 1
        in_body = _in_body.get() is self
        self._body_calls += in_body
        t0 = self._clock()
        try:
            yield
        except Exception as e:
            if is_rejection(e):
                self.rejected()
            raise
        else:
            self.observe(self._clock() - t0, kind)
        finally:
            self._body_calls -= in_body
            self._give(prio)

    # -- transfer bodies ------------------------------------------------------------

    def _body_admissible(self, size: int) -> bool:
        if self.fg_bodies or self._waiting[Priority.FOREGROUND]:
            return False  # the user's own work has the channel
        if self._meta_waiting:
            # Background calls other than creates wait: over REST, `ls -l` is stat-ahead
            # with the user's getattr joining it, so its calls are background, and a
            # prefetch beside it made it 1.6x slower.
            return False
        if self.bg_bodies == 0:
            return True
        # Each body keeps a packet waiting in the guest while it streams, and holds no
        # slot: in number too they take at most background's share of the limit (16
        # small prefetches at once queued 9 deep in the guest, and were rejected).
        if self.bg_bodies >= self._bg_cap():
            return False
        return self.bg_body_in_flight + size <= self.bg_body_bytes

    def _wake_bodies(self) -> None:
        while self._body_waiting and self._body_admissible(self._body_waiting[0][1]):
            ev, size = self._body_waiting.popleft()
            self._take_body(size)
            ev.set()

    def _take_body(self, size: int) -> None:
        self.bg_bodies += 1
        self.bg_body_in_flight += size
        self.stats.max_background_body_bytes = max(
            self.stats.max_background_body_bytes, self.bg_body_in_flight
        )

    @asynccontextmanager
    async def body(self, size: int, prio: Priority | None = None) -> AsyncIterator[None]:
        """Hold the VM's channel for a transfer body of ``size`` bytes (its transfer
        create included). Foreground: at once. Background: after the user's work."""
        prio = prio or priority.get()
        self.stats.bodies += 1
        if prio is Priority.FOREGROUND:
            self.fg_bodies += 1
            token = _in_body.set(self)
            try:
                yield
            finally:
                _in_body.reset(token)
                self.fg_bodies -= 1
                self._wake()
            return
        self.stats.background_bodies += 1
        size = max(0, size)
        if not self._body_waiting and self._body_admissible(size):
            self._take_body(size)
        else:
            self.stats.background_body_waits += 1
            ev = trio.Event()
            self._body_waiting.append((ev, size))
            try:
                await ev.wait()
            except BaseException:
                if not ev.is_set():
                    self._body_waiting.remove((ev, size))
                    self._wake_bodies()
                else:
                    self._give_body(size)
                raise
        token = _in_body.set(self)
        try:
            yield
        finally:
            _in_body.reset(token)
            self._give_body(size)

    def _give_body(self, size: int) -> None:
        self.bg_bodies -= 1
        self.bg_body_in_flight -= size
        self._wake()

    # -- adaptation (Vegas-like AIMD) --------------------------------------------------

    def load(self) -> int:
        """What this client has in the VM's guest channel: the calls in flight and the
        bodies streaming (each keeps about one packet there; a body's create is one
        of the calls)."""
        return self.in_flight + self.fg_bodies + self.bg_bodies - self._body_calls

    def ref_rtt(self, kind: str = "call") -> float:
        """The unloaded reference round trip of ``kind`` (inf until known)."""
        e = self._epochs.get(kind)
        return e.ref if e else math.inf

    def observe(self, rtt: float, kind: str = "call") -> None:
        """A call of ``kind`` finished after ``rtt`` seconds."""
        e = self._epochs.setdefault(kind, _Epoch())
        e.n += 1
        e.rtt_sum += rtt
        e.load_sum += self.load()  # this call included: its slot is given back after
        e.recent.append(rtt)
        if e.n < max(_EPOCH, math.floor(self.limit)):
            return
        mean, load = e.rtt_sum / e.n, e.load_sum / e.n
        e.n, e.rtt_sum, e.load_sum = 0, 0.0, 0.0
        if len(e.recent) < _REF_CALLS:
            # Too few for a reference: the lowest epoch mean stands in (the first
            # epochs run at a low limit), replaced once there are enough.
            e.ref = min(e.ref, mean)
        else:
            recent = sum(e.recent) / len(e.recent)
            e.ref = min(e.ref * _REF_CREEP, recent) if e.settled else recent
            e.settled = True  # a lucky few no longer pin it low
        ref = e.ref
        # Vegas: with ``load`` calls in flight and round trips ``mean`` against ``ref``
        # unloaded, about load * (1 - ref / mean) of them wait in the guest.
        queued = load * (1.0 - ref / mean) if mean > 0 else 0.0
        rose = queued > _BETA or mean > 2.0 * ref  # a serial caller's queue shows so
        fixed_cost = kind not in _VARIABLE_KINDS
        if rose and fixed_cost:
            self._slow_start = False
            self.limit = max(1.0, self.limit - 1.0)
        elif queued < _ALPHA and not rose:
            # x1.5 per epoch, not x2: doubling from 8 overshot into a queue 7 deep
            step = self.limit / 2 if self._slow_start else 1.0
            self.limit = min(float(self.max_limit), self.limit + step)
        elif fixed_cost:
            self._slow_start = False  # the lane is full: no more growing fast
        self._wake()

    def rejected(self) -> None:
        """The guest refused for load: multiplicative decrease."""
        self.stats.rejections += 1
        self._slow_start = False
        self.limit = max(1.0, self.limit / 2)


class Scheduler:
    """One :class:`Lane` per VM id."""

    def __init__(
        self,
        max_limit: int,
        *,
        bg_fraction: float = 0.75,
        bg_body_bytes: int = 4 << 20,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.max_limit = max_limit
        self.bg_fraction = bg_fraction
        self.bg_body_bytes = bg_body_bytes
        self._clock = clock
        self._lanes: dict[str, Lane] = {}

    def lane(self, vm: str) -> Lane:
        lane = self._lanes.get(vm)
        if lane is None:
            lane = self._lanes[vm] = Lane(
                self.max_limit,
                bg_fraction=self.bg_fraction,
                bg_body_bytes=self.bg_body_bytes,
                clock=self._clock,
            )
        return lane

    def slot(self, vm: str, prio: Priority | None = None) -> AbstractAsyncContextManager[None]:
        return self.lane(vm).slot(prio)

    def body(
        self, vm: str, size: int, prio: Priority | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self.lane(vm).body(size, prio)

    def stats(self) -> dict[str, LaneStats]:
        """Per VM id: what its lane admitted (for benchmarks and status)."""
        return {vm: lane.stats for vm, lane in self._lanes.items()}

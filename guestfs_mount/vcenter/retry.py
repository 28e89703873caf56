"""Retry with exponential backoff + full jitter inside a time budget, and a circuit breaker.

Time comes from ``trio.current_time()`` (so ``trio.testing.MockClock`` drives it) unless a
``clock`` callable is given.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from guestfs_mount.errors import CircuitOpen, RemoteError

T = TypeVar("T")
Clock = Callable[[], float]

__all__ = ["Backoff", "BreakerState", "CircuitBreaker", "is_retryable", "retry_call"]


def _now() -> float:
    return trio.current_time()


@dataclass
class Backoff:
    """Full-jitter exponential backoff: attempt n sleeps uniform(0, min(cap, start * 2**n))."""

    start: float = 0.1
    cap: float = 2.0
    budget: float = 20.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0.0, min(self.cap, self.start * (2 ** min(attempt, 60))))


def is_retryable(exc: BaseException) -> bool:
    """ResourceBusy, ServiceUnavailable, TransportError/RemoteTimeout (not TLS, not CircuitOpen)."""
    return isinstance(exc, RemoteError) and exc.retryable


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    clock: Clock = _now,
    retryable: Callable[[BaseException], bool] = is_retryable,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, raises a non-retryable error, or ``backoff.budget``
    seconds from the first attempt have passed (then the last error is raised). The last
    sleep is shortened to end at the budget, so one more attempt is made there."""
    deadline = clock() + backoff.budget
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as e:
            if not retryable(e):
                raise
            left = deadline - clock()
            if left <= 0:
                raise
            # A long random delay must not forfeit the time that is left: shorten it.
            d = min(backoff.delay(attempt), left)
            if on_retry is not None:
                on_retry(e, d)
            attempt += 1
        await trio.sleep(d)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``cooldown`` seconds lets one
    probe through (half-open); the probe's success closes it, its failure re-opens it."""

    def __init__(
        self, name: str, threshold: int = 5, cooldown: float = 5.0, clock: Clock = _now
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def before_call(self) -> bool:
        """Raise CircuitOpen or return whether this call is the half-open probe."""
        st = self.state
        if st is BreakerState.CLOSED:
            return False
        if st is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        assert self._opened_at is not None
        left = max(0.0, self.cooldown - (self._clock() - self._opened_at))
        raise CircuitOpen(
            f"{self.name} is not answering ({self._failures} consecutive transport failures);"
            f" failing fast for {left:.1f}s more"
        )

    def success(self, probe: bool = False) -> None:
        self._failures = 0
        self._opened_at = None
        if probe:
            self._probe_in_flight = False

    def failure(self, probe: bool = False, weight: int = 1) -> None:
        self._failures += weight
        if probe:
            self._probe_in_flight = False
            self._opened_at = self._clock()
        elif self._failures >= self.threshold and self._opened_at is None:
            self._opened_at = self._clock()

    def release(self, probe: bool) -> None:
        """The call ended without telling anything about the server (e.g. cancelled)."""
        if probe:
            self._probe_in_flight = False

"""retry.py: backoff within a budget and the circuit breaker, with a fake clock."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from guestfs_mount.errors import CircuitOpen, NotFound, ResourceBusy, TlsError, TransportError
from guestfs_mount.vcenter.retry import Backoff, BreakerState, CircuitBreaker, retry_call


def test_backoff_full_jitter_capped() -> None:
    b = Backoff(start=0.1, cap=2.0, rng=random.Random(1))
    for n in range(30):
        d = b.delay(n)
        assert 0 <= d <= min(2.0, 0.1 * 2**n)


async def test_retry_budget(autojump_clock: trio.testing.MockClock) -> None:
    calls = []

    async def fail() -> None:
        calls.append(trio.current_time())
        raise TransportError("down")

    t0 = trio.current_time()
    with pytest.raises(TransportError):
        await retry_call(fail, Backoff(budget=5.0, rng=random.Random(0)))
    assert trio.current_time() - t0 <= 5.0
    assert len(calls) > 3


@pytest.mark.parametrize("exc", [NotFound("x"), TlsError("x"), CircuitOpen("x"), ValueError()])
async def test_not_retried(exc: Exception) -> None:
    n = [0]

    async def fail() -> None:
        n[0] += 1
        raise exc

    with pytest.raises(type(exc)):
        await retry_call(fail, Backoff(budget=5.0))
    assert n[0] == 1


async def test_retry_then_success(autojump_clock: trio.testing.MockClock) -> None:
    n = [0]

    async def flaky() -> int:
        n[0] += 1
        if n[0] < 4:
            raise ResourceBusy("busy")
        return 7

    assert await retry_call(flaky, Backoff(budget=20.0)) == 7


def test_breaker_states() -> None:
    now = [0.0]
    b = CircuitBreaker("vc", threshold=3, cooldown=5.0, clock=lambda: now[0])
    for _ in range(2):
        assert b.before_call() is False
        b.failure()
    assert b.state is BreakerState.CLOSED
    b.success()
    for _ in range(3):
        b.before_call()
        b.failure()
    assert b.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen, match="failing fast"):
        b.before_call()
    now[0] = 5.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.before_call() is True  # the probe
    with pytest.raises(CircuitOpen):
        b.before_call()  # only one probe at a time
    b.failure(probe=True)
    assert b.state is BreakerState.OPEN
    now[0] = 10.0
    probe = b.before_call()
    b.release(probe)  # cancelled probe: another may go
    probe = b.before_call()
    assert probe
    b.success(probe)
    assert b.state is BreakerState.CLOSED
    assert b.before_call() is False

"""Injected faults: what the admin API (``/_sim/faults``) and the start options can set.

Counted faults (``busy_next``, ``abort_after`` ...) are consumed one per matching call
or transfer GET; flags and latencies stay until reset.

A VM can have faults of its own (``/_sim/vms/{vm}/faults``): the guest-call ones of
:data:`VM_KEYS`, applied to that VM's guest operations only, on top of the global ones,
so a test can stall one VM of a fleet while the others answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass
class ByteFault:
    """A body fault applied to the next ``count`` transfer GETs."""

    bytes: int = 0
    count: int = 0

    def to_json(self) -> dict[str, int] | None:
        return {"bytes": self.bytes, "count": self.count} if self.count > 0 else None


class FaultError(ValueError):
    """A malformed ``/_sim/faults`` request."""


def _number(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FaultError(f"{name} must be a non-negative number")
    return float(value)


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultError(f"{name} must be a non-negative integer")
    return value


def _byte_fault(value: Any, name: str, *, need_bytes: bool = True) -> ByteFault:
    if value is None:
        return ByteFault()
    if not isinstance(value, dict):
        raise FaultError(f"{name} must be an object {{'bytes': N, 'count': k}} or null")
    unknown = set(value) - {"bytes", "count"}
    if unknown:
        raise FaultError(f"{name}: unknown keys {sorted(unknown)}")
    nbytes = _int(value.get("bytes", 0), f"{name}.bytes")
    if need_bytes and "bytes" not in value:
        raise FaultError(f"{name}.bytes is required")
    return ByteFault(nbytes, _int(value.get("count", 1), f"{name}.count"))


@dataclass
class Faults:
    api_latency: float = 0.0
    transfer_latency: float = 0.0
    bandwidth: float | None = None
    busy_next: int = 0
    unavailable_next: int = 0
    abort_after: ByteFault = field(default_factory=ByteFault)
    truncate: ByteFault = field(default_factory=ByteFault)
    pad: ByteFault = field(default_factory=ByteFault)
    corrupt: ByteFault = field(default_factory=ByteFault)
    stall_body_after: ByteFault = field(default_factory=ByteFault)
    stall_api: bool = False
    omit_content_length: bool = False
    # set (and replaced) when stall_api is cleared / when stall_body_after is cleared
    api_unstall: trio.Event = field(default_factory=trio.Event)
    body_unstall: trio.Event = field(default_factory=trio.Event)
    held: int = 0  # calls in hold_api now: a test sees its callers are stalled

    KEYS = (
        "api_latency",
        "transfer_latency",
        "bandwidth",
        "busy_next",
        "unavailable_next",
        "abort_after",
        "truncate",
        "pad",
        "corrupt",
        "stall_api",
        "stall_body_after",
        "omit_content_length",
    )

    async def hold_api(self) -> None:
        """Wait out ``stall_api`` and ``api_latency`` before answering a call."""
        self.held += 1
        try:
            while self.stall_api:
                await self.api_unstall.wait()
            if self.api_latency > 0:
                await trio.sleep(self.api_latency)
        finally:
            self.held -= 1

    def to_json(self, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The settings (only ``keys``, with the ``held`` count, if given)."""
        if keys is not None:
            full = self.to_json()
            return {**{k: full[k] for k in keys}, "held": self.held}
        return {
            "api_latency": self.api_latency,
            "transfer_latency": self.transfer_latency,
            "bandwidth": self.bandwidth,
            "busy_next": self.busy_next,
            "unavailable_next": self.unavailable_next,
            "abort_after": self.abort_after.to_json(),
            "truncate": self.truncate.to_json(),
            "pad": self.pad.to_json(),
            "corrupt": self.corrupt.to_json(),
            "stall_api": self.stall_api,
            "stall_body_after": self.stall_body_after.to_json(),
            "omit_content_length": self.omit_content_length,
        }

    def update(self, body: dict[str, Any], keys: tuple[str, ...] | None = None) -> None:
        """Apply a ``POST /_sim/faults`` body (only ``keys``, if given); validates
        everything before changing anything."""
        unknown = set(body) - set(keys or self.KEYS)
        if unknown:
            raise FaultError(f"unknown fault(s): {sorted(unknown)}")
        new: dict[str, Any] = {}
        for key, value in body.items():
            if key in ("api_latency", "transfer_latency"):
                new[key] = _number(value, key)
            elif key == "bandwidth":
                bw = _number(value, key, allow_none=True)
                if bw is not None and bw <= 0:
                    raise FaultError("bandwidth must be positive or null")
                new[key] = bw
            elif key in ("busy_next", "unavailable_next"):
                new[key] = _int(value, key)
            elif key in ("stall_api", "omit_content_length"):
                if not isinstance(value, bool):
                    raise FaultError(f"{key} must be a boolean")
                new[key] = value
            else:
                new[key] = _byte_fault(value, key, need_bytes=key != "corrupt")
        for key, value in new.items():
            setattr(self, key, value)
        if not self.stall_api:
            self._wake_api()
        if "stall_body_after" in new:
            self._wake_bodies()

    def reset(self) -> None:
        fresh = Faults()
        for key in self.KEYS:
            setattr(self, key, getattr(fresh, key))
        self._wake_api()
        self._wake_bodies()

    def _wake_api(self) -> None:
        self.api_unstall.set()
        self.api_unstall = trio.Event()

    def _wake_bodies(self) -> None:
        self.body_unstall.set()
        self.body_unstall = trio.Event()

    @staticmethod
    def take(fault: ByteFault) -> int | None:
        """Consume one use of a counted body fault; its byte figure, or None if unset."""
        if fault.count <= 0:
            return None
        fault.count -= 1
        return fault.bytes

    def take_guest_fault(self) -> str | None:
        """RESOURCE_BUSY / SERVICE_UNAVAILABLE for the next guest call, if armed."""
        if self.busy_next > 0:
            self.busy_next -= 1
            return "RESOURCE_BUSY"
        if self.unavailable_next > 0:
            self.unavailable_next -= 1
            return "SERVICE_UNAVAILABLE"
        return None


# What a VM's own faults may set: its guest operations' latency, stall and errors.
VM_KEYS = ("api_latency", "stall_api", "busy_next", "unavailable_next")

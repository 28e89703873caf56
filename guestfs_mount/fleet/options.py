"""What a fleet mount (``--all-vms``) was asked for; plain data, built by ``settings``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..credentials import FleetCredential


@dataclass(frozen=True)
class FleetOptions:
    vm_globs: tuple[str, ...] = ()  # --vms: VM name globs (any of them); empty: every VM
    folder: str | None = None  # --folder: only this VM folder and the folders below it
    powered_on: bool = True  # --vm-filter powered-on (default) | all
    inventory_ttl: float = 60.0  # how long one inventory listing is shown
    # How long a VM that failed for a reason that may pass (powered off, Tools down,
    # a timeout) is answered from memory before it is tried again. A refused guest
    # login is remembered for the life of the mount: no login storm.
    retry_after: float = 30.0
    credentials: tuple[FleetCredential, ...] = field(default=(), repr=False)

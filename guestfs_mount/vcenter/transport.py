"""The one interface every transport (rest, preview, vi-json, soap) implements.

The client (:mod:`.client`) runs the policy around it - paging a whole listing,
deduplication, the transfer-URL trust rule, retries of transfers, the download - so a
transport only knows its wire format: which request to send and how to read the answer
into the model types and the error tree of :mod:`guestfs_mount.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from guestfs_mount.model import DirEntry, GuestStat, VmInfo

__all__ = ["OpenedTransfer", "Page", "Transport"]


@dataclass(frozen=True, slots=True)
class Page:
    """One listing page after validation.

    ``raw_count`` counts every entry the server sent (the next index advances by it,
    ``.`` and ``..`` included); ``skipped`` names the refused ones; ``remaining`` is what
    the server says is left (vim25), None when it does not say (REST).
    """

    entries: tuple[DirEntry, ...]
    raw_count: int
    skipped: tuple[str, ...]
    end: bool
    remaining: int | None = None


@dataclass(frozen=True, slots=True)
class OpenedTransfer:
    """A single-use download URL (not yet checked against the trust policy) and, when
    the transport reports it with the URL (vim25 does), the file's attributes."""

    url: str
    stat: GuestStat | None = None


class Transport(Protocol):
    @property
    def name(self) -> str:
        """ "rest", "preview", "vi-json" or "soap"."""
        ...

    async def login(self) -> None: ...

    async def logout(self) -> None: ...

    async def find_vm(self, name_or_id: str) -> VmInfo: ...

    async def check_guest(self, vm: str) -> None:
        """Raise unless guest operations on ``vm`` can run now (powered on, Tools up;
        transports that can check the guest credentials in the same call do)."""
        ...

    async def list_page(self, vm: str, path: str, index: int, size: int) -> Page: ...

    async def stat(self, vm: str, path: str) -> GuestStat: ...

    async def open_transfer(self, vm: str, path: str) -> OpenedTransfer: ...

"""The fleet's cap over all VMs' guest calls and transfer bodies (``--max-guest-ops``).

One FIFO semaphore serves the VMs in turn; on its own it would let the calls of a VM
whose guest stopped answering hold every slot, and then no other VM could make a call
until they time out. So a VM holds at most half the slots (rounded up): whatever one VM
does, the others keep at least the rest. Background calls (read-ahead in many VMs at
once) hold at most all but an eighth of the slots: the user's own calls find room.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext

import trio

from .scheduler import Priority, priority

__all__ = ["SharedCap"]


class SharedCap:
    def __init__(self, total: int) -> None:
        self.total = total
        self.share = max(1, (total + 1) // 2)
        self._all = trio.Semaphore(total)
        self._vms: dict[str, trio.Semaphore] = {}  # only VMs with a call in flight or waiting
        self.reserve = max(1, total // 8) if total > 1 else 0  # for foreground calls only
        self._background = trio.Semaphore(total - self.reserve) if self.reserve else None

    @asynccontextmanager
    async def slot(self, vm: str) -> AsyncIterator[None]:
        own = self._vms.get(vm)
        if own is None:
            own = self._vms[vm] = trio.Semaphore(self.share)
        bg: AbstractAsyncContextManager[object] = nullcontext()
        if self._background is not None and priority.get() is Priority.BACKGROUND:
            bg = self._background
        try:
            async with bg, own, self._all:
                yield
        finally:
            if own.value == self.share and not own.statistics().tasks_waiting:
                self._vms.pop(vm, None)  # idle: an untouched VM costs nothing

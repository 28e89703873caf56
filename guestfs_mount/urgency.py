"""Who waits for a guest call: the two priorities and a flight's urgency.

Neutral ground between the metadata cache (which knows when a user request joins a
call already on its way) and the vCenter layer's lanes (which order the calls): both
import this module, neither imports the other.

:data:`priority` is the priority of the current task's calls; read-ahead sets it to
``BACKGROUND`` around what it starts, and trio tasks inherit it. :data:`urgency` is the
:class:`Urgency` of the shared fetch (a ``meta`` flight) the current task runs: a
background fetch that a user request joins is promoted, and the lane then admits its
waiting call as foreground.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Priority", "Urgency", "priority", "urgency"]


class Priority(enum.Enum):
    FOREGROUND = "foreground"
    BACKGROUND = "background"


# Foreground is the default: only read-ahead's own tasks mark themselves background.
priority: contextvars.ContextVar[Priority] = contextvars.ContextVar(
    "guestfs_priority", default=Priority.FOREGROUND
)


class Urgency:
    """Whether a user now waits for one shared fetch. Mutable, so that the tasks the
    fetch runs in (they inherit the context variable's value, this object) see a
    promotion that comes after they started; only ever goes from not urgent to urgent."""

    __slots__ = ("_listeners", "urgent")

    def __init__(self) -> None:
        self.urgent = False
        self._listeners: list[Callable[[], None]] = []

    def promote(self) -> None:
        """A user waits now: tell whoever listens (a lane's waiting call, a fetch this
        one waits for). Synchronous: it only moves queue entries."""
        if self.urgent:
            return
        self.urgent = True
        for listener in list(self._listeners):
            listener()

    @contextmanager
    def listen(self, listener: Callable[[], None]) -> Iterator[None]:
        """Call ``listener`` on promotion while inside."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)


# The urgency of the fetch the current task runs for (None: it runs for nobody else).
urgency: contextvars.ContextVar[Urgency | None] = contextvars.ContextVar(
    "guestfs_urgency", default=None
)

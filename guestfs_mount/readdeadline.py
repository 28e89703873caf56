"""One deadline for the FUSE read requests of one read(2) (issue 10 item 3).

The kernel turns one read(2) of a FUSE file into several read requests: a read-ahead
batch sent at once (128 KiB each), more read-ahead sent while those wait, and, when a
read-ahead request failed, a retry of the first page followed by one request per page
for the rest of the failed range. Each request bounded by ``--timeout`` alone let one
read(2) last many times it (52 s at ``--timeout 3`` for 1 MiB trickling at 20 KB/s:
256 page requests of 0.2 s each, after the first batch had timed out).

FUSE does not say which read(2) a request serves, so a *chain* stands for it: on one
open file, a request continues the chain when it falls within or right after the
chain's range and either another request of the chain is still waiting or the last one
ended less than ``GAP`` ago. All requests of a chain share the deadline of its first.
Once that deadline has passed, a request of the chain still gets what is already on
disk (``GRACE``), and the first one that finds nothing ends the chain: the kernel then
returns the read(2) short (or ETIMEDOUT if nothing was copied), and the next request
starts a chain of its own. A lone page request that times out ends the chain too (the
kernel does not retry those). Any other failure ends it as well.

The price: a read(2) that a reader issues at once after the previous one, while the
stream stays slower than the reader, continues that read(2)'s chain, so it may return
short, or ETIMEDOUT, sooner than ``--timeout`` after it began (never later).
"""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass

GAP = 0.2  # s: the kernel's next request of the same read(2) comes within microseconds
GRACE = 0.05  # s: enough to read bytes already in the cache file, not to wait for more
PAGE = mmap.PAGESIZE


class Outcome(enum.Enum):
    OK = "ok"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(slots=True)
class Request:
    deadline: float
    size: int
    expired: bool  # joined a chain whose deadline had passed: GRACE only
    chain: int  # which chain: one that ended while this waited no longer counts it
    seq: int  # the chain's request count when this one began
    alone: bool  # no other request of the chain was waiting when it began


class ReadChain:
    """The read deadlines of one open file (one per FUSE file handle)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._open = False
        self._deadline = 0.0
        self._lo = self._hi = 0
        self._pending = 0
        self._ended = 0.0
        self._seq = 0
        self._id = 0

    def begin(self, off: int, size: int, now: float) -> Request:
        follows = self._pending > 0 or now - self._ended <= GAP
        if not (self._open and follows and self._lo <= off <= self._hi):
            self._open, self._deadline = True, now + self.timeout
            self._lo, self._hi, self._pending, self._seq = off, off + size, 0, 0
            self._id += 1
        self._hi = max(self._hi, off + size)
        alone = self._pending == 0
        self._pending += 1
        self._seq += 1
        if self._deadline > now:
            return Request(self._deadline, size, False, self._id, self._seq, alone)
        return Request(now + min(GRACE, self.timeout), size, True, self._id, self._seq, alone)

    def end(self, req: Request, outcome: Outcome, now: float) -> None:
        if req.chain != self._id:
            return  # another reader of this open file (a fork, mmap) started a new chain
        self._pending -= 1
        self._ended = now
        if outcome is Outcome.OK:
            return
        if outcome is Outcome.ERROR or req.expired:
            self._open = False
            return
        # Timed out at the chain's deadline. A read-ahead request (several at once, or
        # larger than a page) is retried by the kernel within the same read(2): the
        # retry must find the deadline passed. A lone page request is not retried.
        lone = req.alone and self._seq == req.seq and self._pending == 0 and req.size <= PAGE
        if lone:
            self._open = False

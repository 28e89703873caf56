"""The audit log: one JSON line per content transfer, written as it ends, then fsync'd.

Append-only (``O_APPEND``), so several mounts may share one file and a crash loses at
most the line being written. Meant as a chain-of-custody record: what was read, from
which VM, when, and the SHA-256 of the exact bytes delivered. The lines of one mount form
a hash chain (``evidence/chain.py``) opened by a header line with the case metadata.

The fsync runs on a thread of its own (an fsync took ~3 ms here: per transfer on the event
loop, that would stall every FUSE request); lines written meanwhile share the next one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone

from . import __version__
from .cache.content import TransferEvent
from .evidence.chain import END, HEADER, TRANSFER, ChainWriter
from .evidence.ledger import path_b64
from .safefile import open_append

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class AuditLog:
    def __init__(
        self, path: str, *, vcenter: str, vm: str, vm_name: str, case: dict[str, str] | None = None
    ) -> None:
        # Never through a planted symlink, nor into another user's file (ConfigError).
        self._fd = open_append(path, "audit log")
        self._static = {"vcenter": vcenter, "vm": vm, "vm_name": vm_name}
        self._chain = ChainWriter()
        self.chain_id = self._chain.chain_id
        self._count = 0
        self._dirty = threading.Event()
        self._closing = False
        self._syncer = threading.Thread(target=self._sync, name="guestfs-audit-fsync", daemon=True)
        self._syncer.start()
        header = {"time": _iso(time.time()), "program": f"guestfs-mount {__version__}"}
        self._write(HEADER, {**header, **self._static, **(case or {})})

    def record(self, ev: TransferEvent, extra: Mapping[str, object] | None = None) -> None:
        """One transfer line; ``extra`` overrides the mount's fields (a fleet mount
        names the VM of each transfer)."""
        line: dict[str, object] = {
            "time": _iso(ev.started + ev.seconds),
            "path": ev.key.path,
            "size": ev.key.size,
            "mtime": _iso(ev.key.mtime_ns / 1e9),
            "bytes": ev.nbytes,
            "sha256": ev.sha256 if ev.error is None else None,
            "md5": ev.md5 if ev.error is None else None,
            "started": _iso(ev.started),
            "seconds": round(ev.seconds, 6),
            "result": "ok" if ev.error is None else "error",
            # Fetched ahead of a sequential directory read, not by an open (--no-prefetch).
            "prefetch": ev.prefetch,
        }
        exact = path_b64(ev.key.path)
        if exact is not None:
            line["path_b64"] = exact
        if ev.cached_from is not None:
            # No transfer: a kept copy of an earlier mount, its SHA-256 checked again.
            line["result"] = "cached"
            line["transfer_time"] = _iso(ev.cached_from)
        if ev.seen is not None:
            # The file changed between the stat the kernel was shown and the transfer:
            # what was fetched (size/mtime above) and what had been seen.
            line["stat_seen"] = {"size": ev.seen.size, "mtime": _iso(ev.seen.mtime_ns / 1e9)}
            line["stat_fetched"] = {"size": ev.key.size, "mtime": _iso(ev.key.mtime_ns / 1e9)}
        if ev.error is not None:
            line["error"] = f"{type(ev.error).__name__}: {ev.error}"
        self._count += 1
        self._write(TRANSFER, {**self._static, **(extra or {}), **line})

    def _write(self, kind: str, fields: dict[str, object]) -> None:
        data = self._chain.line(kind, fields)
        try:
            # One write() of a whole line on an O_APPEND fd: lines never interleave.
            os.write(self._fd, data)
        except OSError as exc:
            log.error("audit log write failed: %s", exc)
        self._dirty.set()

    def _sync(self) -> None:
        while not self._closing:
            self._dirty.wait()
            self._dirty.clear()
            try:
                os.fsync(self._fd)
            except OSError as exc:
                log.error("audit log fsync failed: %s", exc)

    def close(self) -> None:
        self._write(END, {"time": _iso(time.time()), "transfers": self._count, **self._static})
        self._closing = True
        self._dirty.set()
        self._syncer.join()
        try:
            os.fsync(self._fd)  # the end line, and anything the thread's last fsync missed
        finally:
            os.close(self._fd)

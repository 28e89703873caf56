"""The audit log: one JSON line per content transfer, written and flushed as it ends.

Append-only (``O_APPEND``), so several mounts may share one file and a crash loses at
most the line being written. Meant as a chain-of-custody record: what was read, from
which VM, when, and the SHA-256 of the exact bytes delivered.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone

from .cache.content import TransferEvent

log = logging.getLogger(__name__)


def _iso(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class AuditLog:
    def __init__(self, path: str, *, vcenter: str, vm: str, vm_name: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._static = {"vcenter": vcenter, "vm": vm, "vm_name": vm_name}

    def record(self, ev: TransferEvent) -> None:
        line: dict[str, object] = {
            "time": _iso(ev.started + ev.seconds),
            **self._static,
            "path": ev.key.path,
            "size": ev.key.size,
            "mtime": _iso(ev.key.mtime_ns / 1e9),
            "bytes": ev.nbytes,
            "sha256": ev.sha256 if ev.error is None else None,
            "started": _iso(ev.started),
            "seconds": round(ev.seconds, 6),
            "result": "ok" if ev.error is None else "error",
            # Fetched ahead of a sequential directory read, not by an open (--no-prefetch).
            "prefetch": ev.prefetch,
        }
        if ev.seen is not None:
            # The file changed between the stat the kernel was shown and the transfer:
            # what was fetched (size/mtime above) and what had been seen.
            line["stat_seen"] = {"size": ev.seen.size, "mtime": _iso(ev.seen.mtime_ns / 1e9)}
            line["stat_fetched"] = {"size": ev.key.size, "mtime": _iso(ev.key.mtime_ns / 1e9)}
        if ev.error is not None:
            line["error"] = f"{type(ev.error).__name__}: {ev.error}"
        data = (json.dumps(line, ensure_ascii=True) + "\n").encode()
        try:
            # One write() of a whole line on an O_APPEND fd: lines never interleave.
            os.write(self._fd, data)
        except OSError as exc:
            log.error("audit log write failed: %s", exc)

    def close(self) -> None:
        os.close(self._fd)

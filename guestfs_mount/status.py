"""``guestfs-mount status [--json] [MOUNTPOINT]``: what the running mounts are doing."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .control import ask, socket_path, sockets


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc.get('mountpoint')}: {doc.get('vm_name')} ({doc.get('vm')}) on "
        f"{doc.get('vcenter')}, guest {doc.get('guest_root')}, pid {doc.get('pid')}",
    ]
    cache = doc.get("cache", {})
    lines.append(
        f"  cache: {_size(cache.get('usage', 0))} of {_size(cache.get('max_bytes', 0))}"
        f"  {cache.get('stats', {})}"
    )
    api = doc.get("api", {})
    calls = api.get("calls", {})
    errors = api.get("errors", {})
    lines.append(f"  api calls: {sum(calls.values()) if calls else 0} {calls}")
    if errors:
        lines.append(f"  api errors: {errors}")
    transfers = doc.get("transfers", [])
    if not transfers:
        lines.append("  transfers: none in flight")
    for t in transfers:
        total = t.get("total") or 0
        done = t.get("done") or 0
        pct = 100.0 * done / total if total else 100.0
        rate = t.get("bytes_per_second") or 0
        eta = t.get("eta_seconds")
        eta_s = f"{eta:.0f}s" if isinstance(eta, (int, float)) else "?"
        lines.append(
            f"  transfer {t.get('path')!r}: {_size(done)} / {_size(total)} ({pct:.0f}%)"
            f" {_size(rate)}/s eta {eta_s} readers {t.get('readers')}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="guestfs-mount status",
                                description="Show the running guestfs-mount mounts.")
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--json", action="store_true", help="print the raw JSON documents")
    args = p.parse_args(argv)
    paths = [socket_path(os.path.realpath(args.mountpoint))] if args.mountpoint else list(sockets())
    docs = []
    for path in paths:
        try:
            docs.append(ask(path))
        except (OSError, ValueError) as exc:
            if args.mountpoint:
                print(f"guestfs-mount: no running mount at {args.mountpoint} ({exc})",
                      file=sys.stderr)
                return 1
            # A socket left by a daemon that was killed: nobody answers it any more.
            if isinstance(exc, ConnectionRefusedError):
                try:
                    os.unlink(path)
                except OSError:
                    pass
    if args.json:
        print(json.dumps(docs, indent=2))
    elif not docs:
        print("no guestfs-mount mounts running")
    else:
        print("\n".join(render(d) for d in docs))
    return 0

"""``guestfs-mount status [--json] [MOUNTPOINT]``: what the running mounts are doing.

Each mount answers on its control socket with a JSON document (see :mod:`.control`);
``--json`` prints those documents whole, otherwise they are rendered for a person:
aligned, in human units, only what matters. Every string printed, the error message
too, has its control characters escaped (names come from the guest and the vCenter, and
a document from a hostile socket may hold anything); a value of the wrong type shows as
``?`` or 0, never as a crash. The runtime directory and the process behind each socket
must be ours (see :mod:`.control`), or status refuses them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .control import UntrustedRuntime, ask, socket_path, sockets, trusted_runtime_dir
from .logsetup import one_line
from .units import duration, size


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):  # JSON integers are unbounded; floats would overflow
        return value if abs(value) < 1 << 63 else None
    return value if math.isfinite(value) else None


def _int(doc: Mapping[str, Any], key: str) -> int:
    value = _number(doc.get(key))
    return int(value) if value is not None else 0


def _text(value: Any) -> str:
    return one_line(str(value))


def _dict(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _cache_line(cache: Mapping[str, Any]) -> str:
    stats = _dict(cache, "stats")
    parts = [f"{size(_int(cache, 'usage'))} of {size(_int(cache, 'max_bytes'))}"]
    parts.append(
        f"{_plural(_int(stats, 'downloads'), 'download')} ({size(_int(stats, 'bytes_downloaded'))})"
    )
    hits = _int(stats, "hits")
    if hits:
        parts.append(f"{hits} served from cache")
    for key, word in (("failures", "failed"), ("evictions", "evicted")):
        if _int(stats, key):
            parts.append(f"{_int(stats, key)} {word}")
    return ", ".join(parts)


def _api_line(api: Mapping[str, Any]) -> str:
    calls = _dict(api, "calls")
    errors = _dict(api, "errors")
    n_errors = sum(v for v in errors.values() if isinstance(v, int))
    parts = [_plural(sum(v for v in calls.values() if isinstance(v, int)), "call")]
    if n_errors:
        worst = sorted(errors.items(), key=lambda kv: -kv[1] if isinstance(kv[1], int) else 0)
        shown = ", ".join(f"{_text(k)} {_text(v)}" for k, v in worst[:3])
        parts.append(f"{_plural(n_errors, 'error')} ({shown})")
    else:
        parts.append("no errors")
    if _int(api, "retries"):
        parts.append(_plural(_int(api, "retries"), "retry", "retries"))
    if _int(api, "relogins"):
        parts.append(_plural(_int(api, "relogins"), "re-login"))
    return ", ".join(parts)


def _transport_line(doc: Mapping[str, Any]) -> str:
    name, why = doc.get("transport"), doc.get("transport_reason")
    line = one_line(str(name)) if isinstance(name, str) and name else "?"
    if isinstance(why, str) and why:
        line += f" ({one_line(why)})"
    return line


def _metadata_line(meta: Mapping[str, Any]) -> str:
    stats, lists = _int(meta, "stat_calls"), _int(meta, "list_calls")
    hits = _int(meta, "stat_hits") + _int(meta, "list_hits")
    asked = stats + lists + hits
    line = f"{_plural(stats, 'stat')} and {_plural(lists, 'listing')} fetched"
    if asked:
        line += f", {100 * hits / asked:.0f}% answered from cache"
    return line


def _transfer_rows(transfers: Sequence[Any]) -> list[str]:
    rows = []
    for t in transfers:
        if not isinstance(t, Mapping):
            continue
        total, done = _int(t, "total"), _int(t, "done")
        eta = _number(t.get("eta_seconds"))
        readers = _plural(_int(t, "readers"), "reader")
        rows.append(
            (
                one_line(str(t.get("path", "?"))),
                f"{size(done)} / {size(total)}",
                f"{100 * done / total:.0f}%" if total else "-",
                f"{size(_int(t, 'bytes_per_second'))}/s",
                f"eta {duration(eta)}" if eta is not None else "eta ?",
                readers + (" (prefetch)" if t.get("prefetch") else ""),
            )
        )
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = (False, True, True, True, False, False)
    cells = [
        [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)]
        for row in rows
    ]
    return ["  ".join(row).rstrip() for row in cells]


def _fleet_fields(fleet: Mapping[str, Any]) -> tuple[str, list[str]]:
    """A fleet mount (``--all-vms``): one summary line, and a row per VM that was used
    (untouched VMs are only counted: a vCenter can hold thousands)."""
    vms = [v for v in fleet.get("vms", []) if isinstance(v, Mapping)]
    states: dict[str, int] = {}
    for v in vms:
        state = str(v.get("state", "?"))
        states[state] = states.get(state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    line = f"{_plural(len(vms), 'VM')} ({summary or 'none'})"
    if fleet.get("inventory_frozen") is True:
        unshown = fleet.get("inventory_unshown")
        more = unshown if isinstance(unshown, int) and not isinstance(unshown, bool) else 0
        line += "; inventory frozen" + (f" ({_plural(more, 'new VM')} not shown)" if more else "")
    if fleet.get("inventory_error"):
        line += f"; last inventory listing failed: {one_line(str(fleet['inventory_error']))}"
    rows = []
    for v in vms:
        if v.get("state") == "untouched":
            continue
        who = f"{one_line(str(v.get('dir', '?')))} ({one_line(str(v.get('vm', '?')))})"
        if v.get("state") == "ready":
            roots = ", ".join(one_line(str(r)) for r in v.get("roots") or [])
            user = one_line(str(v.get("guest_user") or "?"))
            rows.append(f"{who}: ready, {roots} as {user}")
        else:
            err = one_line(str(v.get("error") or "?"))
            rows.append(f"{who}: {one_line(str(v.get('errno') or 'failed'))}: {err}")
    return line, rows


def render(doc: Mapping[str, Any], now: float | None = None) -> str:
    """One mount's status document, for a person."""
    now = time.time() if now is None else now
    started = _number(doc.get("started"))
    daemon = f"pid {_text(doc.get('pid', '?'))}"
    if started is not None:
        daemon += f", up {duration(now - started)}"
    if doc.get("frozen"):
        daemon += ", frozen (evidence view)"
    fields = [
        ("vm", f"{one_line(str(doc.get('vm_name', '?')))} ({one_line(str(doc.get('vm', '?')))})"
               f" on {one_line(str(doc.get('vcenter', '?')))}"),
        ("guest root", one_line(str(doc.get("guest_root", "?")))),
        ("daemon", daemon),
        ("transport", _transport_line(doc)),
        ("cache", _cache_line(_dict(doc, "cache"))),
        ("api", _api_line(_dict(doc, "api"))),
        ("metadata", _metadata_line(_dict(doc, "metadata"))),
    ]  # fmt: skip
    fleet = doc.get("fleet")
    vm_rows: list[str] = []
    if isinstance(fleet, Mapping):
        line, vm_rows = _fleet_fields(fleet)
        fields[:2] = [("vms", f"{line} on {one_line(str(doc.get('vcenter', '?')))}")]
    transfers = doc.get("transfers")
    rows = _transfer_rows(transfers if isinstance(transfers, list) else [])
    fields.append(("transfers", f"{len(rows)} in flight" if rows else "none in flight"))
    width = max(len(name) for name, _ in fields)
    lines = [one_line(str(doc.get("mountpoint", "?")))]
    for name, value in fields:
        lines.append(f"  {name.ljust(width)}  {value}")
        if name == "vms":
            lines += [f"    {row}" for row in vm_rows]
    lines += [f"    {row}" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="guestfs-mount status", description="Show the running guestfs-mount mounts."
    )
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--json", action="store_true", help="print the whole status documents as JSON")
    args = p.parse_args(argv)
    try:
        trusted_runtime_dir()
        paths = (
            [socket_path(os.path.realpath(args.mountpoint))] if args.mountpoint else list(sockets())
        )
    except (UntrustedRuntime, OSError) as exc:
        print(f"guestfs-mount: error: refused: {_text(exc)}", file=sys.stderr)
        return 1
    docs = []
    for path in paths:
        try:
            docs.append(ask(path))
        except UntrustedRuntime as exc:
            print(f"guestfs-mount: error: refused: {_text(exc)}", file=sys.stderr)
            if args.mountpoint:
                return 1
        except (OSError, ValueError) as exc:
            if args.mountpoint:
                print(
                    f"guestfs-mount: no running mount at {_text(args.mountpoint)} ({_text(exc)})",
                    file=sys.stderr,
                )
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
        print("\n\n".join(render(d) for d in docs))
    return 0

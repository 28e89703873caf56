"""Live progress of long transfers, for ``--foreground`` on a terminal.

Drawn by a trio task from the content cache's ``in_flight()`` snapshot twice a second;
rich only renders (no refresh thread), so nothing touches the cache from another thread.
Short transfers (under a second, or under 4 MiB) are not shown: they would only flicker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio
from rich.console import Console, JustifyMethod
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from .logsetup import one_line, use_handler
from .units import size

MIN_BYTES = 4 << 20
MIN_SECONDS = 1.0


def _table(rows: list[dict[str, Any]]) -> Table:
    t = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("guest file", "left"), ("done", "right"), ("%", "right"),
        ("speed", "right"), ("eta", "right"), ("readers", "right"),
    )  # fmt: skip
    for col, just in columns:
        t.add_column(col, justify=just)
    for r in rows:
        total = int(r.get("total") or 0)
        done = int(r.get("done") or 0)
        eta = r.get("eta_seconds")
        cells = (
            one_line(str(r.get("path"))),
            f"{size(done)} / {size(total)}",
            f"{100 * done / total:.0f}" if total else "-",
            f"{size(float(r.get('bytes_per_second') or 0))}/s",
            f"{eta:.0f}s" if isinstance(eta, (int, float)) else "?",
            str(r.get("readers", "")),
        )
        # Guest strings are data: a str cell would be parsed as rich markup, and a
        # path such as "[/]x" would raise MarkupError and stop the daemon.
        t.add_row(*(Text(c) for c in cells))
    return t


def _worth_showing(r: dict[str, Any], now: float) -> bool:
    started = r.get("started")
    age = now - started if isinstance(started, (int, float)) else 0.0
    return int(r.get("total") or 0) >= MIN_BYTES or age >= MIN_SECONDS


def rich_logging(console: Console, level: int) -> None:
    """Route log records through rich so they scroll above the live display."""
    handler = RichHandler(console=console, show_path=False, markup=False)
    use_handler(handler, "%(message)s", level)


async def show_progress(in_flight: Callable[[], list[dict[str, Any]]], console: Console) -> None:
    with Live(console=console, auto_refresh=False, transient=True) as live:
        while True:
            now = time.time()
            rows = [r for r in in_flight() if _worth_showing(r, now)]
            live.update(_table(rows) if rows else "", refresh=True)
            await trio.sleep(0.5)

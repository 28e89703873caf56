import io
import time

import trio
from rich.console import Console

from guestfs_mount.progress import show_progress


async def test_live_display_shows_long_transfers_only():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    now = time.time()
    rows = [
        {"path": "/var/log/big.log", "done": 512 << 20, "total": 1 << 30,
         "bytes_per_second": 100 << 20, "eta_seconds": 5.0, "readers": 2, "started": now - 5},
        {"path": "/etc/hosts", "done": 10, "total": 20, "bytes_per_second": 1,
         "eta_seconds": 1, "readers": 1, "started": now},
        {"path": "/evil\n\x1b[2Jname", "done": 0, "total": 64 << 20, "bytes_per_second": 0,
         "eta_seconds": None, "readers": 1, "started": now - 3},
    ]
    with trio.move_on_after(0.2):
        await show_progress(lambda: rows, console)
    text = out.getvalue()
    assert "/var/log/big.log" in text and "512.0 MiB / 1.0 GiB" in text and "50" in text
    assert "/etc/hosts" not in text  # small and young: not worth a line
    assert "\x1b[2J" not in text and "\\x1b[2Jname" in text  # guest names cannot drive the terminal

"""The daemon in --foreground on a terminal (issue 10 item 2): rich draws the progress of
transfers and logs above it, and every guest name it shows is data. A name that looks
like rich markup must not stop the daemon; a name holding ESC sequences must not reach
the terminal raw. Run on a real pty, as a user would see it."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import mount_argv, mount_env, unmount, wait_for_mount

pytestmark = pytest.mark.fuse

MiB = 1 << 20
# "[" then "]crash.bin": "[/]crash.bin" is a rich closing tag with nothing to close.
MARKUP_DIR, MARKUP_FILE = "[", "]crash.bin"
# A window title, a cursor move and a colour, each followed by text only the guest wrote.
ESC_NAME = "\x1b]0;GUEST-TITLE\x07\x1b[1;1HGUEST-HOME\x1b[31mGUEST-RED\x9b2J.bin"
# Read while transfers fail, so that the name is in a log line too.
ESC_FAILING = "failing-" + ESC_NAME
RAW = [b"\x1b]0;GUEST-TITLE", b"\x1b[1;1HGUEST-HOME", b"\x1b[31mGUEST-RED", b"\xc2\x9b2J"]


@pytest.fixture
def guest(tmp_path: Any) -> Iterator[tuple[Any, dict[str, bytes]]]:
    root = tmp_path / "guest"
    (root / MARKUP_DIR).mkdir(parents=True)
    data = {
        f"{MARKUP_DIR}/{MARKUP_FILE}": os.urandom(2 * MiB),
        ESC_NAME: os.urandom(2 * MiB),
    }
    (root / ESC_FAILING).write_bytes(os.urandom(MiB))
    for rel, body in data.items():
        (root / rel).write_bytes(body)
    with run_simulator("--root", str(root)) as sim:
        yield sim, data


class Terminal:
    """A pty the daemon writes to; everything it wrote, read by a thread."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        # Wide enough that rich does not cut the names it shows.
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the last writer closed the slave
                return
            if not chunk:
                return
            self.out += chunk

    def close(self) -> bytes:
        self._reader.join(timeout=10)
        os.close(self.master)
        return bytes(self.out)


def test_guest_names_on_a_terminal_neither_crash_nor_escape(guest: Any, tmp_path: Any) -> None:
    sim, data = guest
    mnt = str(tmp_path / "m")
    os.makedirs(mnt)
    term = Terminal()
    proc = subprocess.Popen(
        mount_argv(sim, mnt, "--foreground", "--timeout", "30"),
        stdin=subprocess.DEVNULL, stdout=term.slave, stderr=term.slave, env=mount_env(sim),
    )  # fmt: skip
    os.close(term.slave)
    try:
        wait_for_mount(mnt, proc, 30)
        # Slow enough that each transfer is on the progress display for a few refreshes.
        sim.faults(bandwidth=1 * MiB)
        for rel, body in data.items():
            with open(os.path.join(mnt, rel), "rb") as f:
                assert f.read() == body, rel  # not ENOTCONN: the daemon is still serving
        # A failed transfer logs its guest path: the ESC name in a log line too.
        sim.reset_faults()
        sim.faults(abort_after={"bytes": 1000, "count": 8})
        with pytest.raises(OSError), open(os.path.join(mnt, ESC_FAILING), "rb") as f:
            f.read()
        sim.reset_faults()
        assert proc.poll() is None
    finally:
        sim.reset_faults()
        unmount(mnt)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = term.close()
    assert proc.returncode == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert "MarkupError" not in text and "Traceback" not in text, text
    # The progress display and the log did show both names, escaped.
    assert "]crash.bin" in text, text
    assert "GUEST-RED" in text, text
    for raw in RAW:
        assert raw not in out, (raw, text)

"""logsetup: every handler escapes guest names; nothing is dropped for a non-UTF-8 name."""

from __future__ import annotations

import argparse
import logging
import os
import stat

from guestfs_mount import logsetup
from guestfs_mount.logsetup import one_line, setup_logging


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"debug": False, "log_file": None, **kw})


def test_non_utf8_path_reaches_the_log_file(tmp_path):
    """Issue 10 item 16: the line was dropped (UnicodeEncodeError in the handler)."""
    path = tmp_path / "x.log"
    setup_logging(_args(log_file=str(path)), daemon=False)
    name = os.fsdecode(b"/evil-\xff\x1b[2J.bin")
    logging.getLogger("guestfs_mount").warning("read %s: %s", name, "EIO")
    for h in logging.getLogger().handlers:
        h.flush()
    text = path.read_text()
    assert "read /evil-\\xff\\x1b[2J.bin: EIO" in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_no_syslog_falls_back_to_stderr_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(logsetup, "SYSLOG_ADDRESS", "/nonexistent/log")
    setup_logging(_args(), daemon=True)
    logging.getLogger("guestfs_mount").warning("after")
    err = capsys.readouterr().err
    assert "no syslog at /nonexistent/log" in err and "after" in err


def test_one_line_escapes_c0_c1_and_surrogates():
    assert one_line("a\nb\x9bc\udcffd") == "a\\x0ab\\x9bc\\xffd"

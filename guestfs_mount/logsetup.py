"""Logging: a file, syslog (the daemon) or stderr (the foreground), one line per record.

Guest names are hostile: control characters in log messages are shown as ``\\xNN`` so
that no guest file name can forge a log line or drive the terminal.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from logging.handlers import SysLogHandler

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """Guest names are hostile: control characters in them must not forge log lines
    or terminal escapes. Shown as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def setup_logging(args: argparse.Namespace, daemon: bool) -> None:
    level = logging.DEBUG if args.debug else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
        handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif daemon:
        try:
            handler = SysLogHandler(address="/dev/log")
            handler.setFormatter(_OneLineFormatter("guestfs-mount[%(process)d]: %(message)s"))
        except OSError:
            handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLineFormatter("guestfs-mount: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    if not args.debug:
        for noisy in ("httpx", "httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

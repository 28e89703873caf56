"""Logging: a file, syslog (the daemon) or stderr (the foreground), one line per record.

Guest names are hostile: control characters in log messages are shown as ``\\xNN`` so
that no guest file name can forge a log line or drive the terminal, and a name that is
not UTF-8 (a lone surrogate from ``os.fsdecode``) is shown as the ``\\xNN`` of its raw
bytes, so that no handler fails to encode it and drops the line. Every handler, rich's
too (:func:`use_handler`), formats through the same escaping.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from logging.handlers import SysLogHandler

from .safefile import open_append

# C0, DEL and C1 (a terminal may take U+009B as CSI), and lone surrogates.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
SYSLOG_ADDRESS = "/dev/log"


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape: the raw byte
        return f"\\x{code - 0xDC00:02x}"
    if code > 0xFF:
        return f"\\u{code:04x}"
    return f"\\x{code:02x}"


def one_line(text: str) -> str:
    """Guest names are hostile: control characters in them must not forge log lines
    or terminal escapes, and undecodable bytes must not make a handler drop the line.
    Shown as \\xNN (a raw byte of a non-UTF-8 name too), other surrogates as \\uNNNN."""
    return _CONTROL.sub(lambda m: _escape(m.group()), text)


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        # A traceback keeps its lines, but not a surrogate no handler could encode.
        return _SURROGATE.sub(lambda m: _escape(m.group()), super().format(record))


def use_handler(handler: logging.Handler, fmt: str, level: int | None = None) -> None:
    """Make ``handler`` the only one of the root logger, formatting through the escaping."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if h is not handler:
            h.close()
    handler.setFormatter(OneLineFormatter(fmt))
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level)


def syslog_available(address: str | None = None) -> bool:
    """True when a syslog daemon listens on ``address`` (default /dev/log)."""
    address = address or SYSLOG_ADDRESS
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(address)
            except OSError:
                continue
            return True
    return False


def _syslog_handler() -> SysLogHandler | None:
    if not syslog_available():
        return None
    try:
        return SysLogHandler(address=SYSLOG_ADDRESS)
    except OSError:
        return None


def log_file_stream(path: str) -> logging.StreamHandler:  # type: ignore[type-arg]
    """A handler appending to ``path``, opened by :func:`safefile.open_append`
    (ConfigError if refused)."""
    fd = open_append(path, "log file")
    stream = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
    return logging.StreamHandler(stream)


def setup_logging(args: argparse.Namespace, daemon: bool) -> None:
    """Log to ``--log-file``, else syslog for the daemon, else stderr. Without a syslog
    daemon, the daemon logs to stderr and says so (a forked one has also said so on the
    terminal before detaching, see :mod:`.daemon`). ConfigError if the log file is
    refused."""
    level = logging.DEBUG if args.debug else logging.INFO
    handler: logging.Handler | None = None
    fallback = False
    if args.log_file:
        handler = log_file_stream(args.log_file)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    elif daemon:
        handler = _syslog_handler()
        fmt = "guestfs-mount[%(process)d]: %(message)s"
        fallback = handler is None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "guestfs-mount: %(levelname)s: %(message)s"
    use_handler(handler, fmt, level)
    if fallback:
        logging.getLogger("guestfs_mount").warning(
            "no syslog at %s: logging to stderr (use --log-file FILE to keep the log)",
            SYSLOG_ADDRESS,
        )
    if not args.debug:
        for noisy in ("httpx", "httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

"""Running the mount: in the foreground, or forked into the background.

The daemon forks after the secrets were read (so a prompt works) and the parent returns
only when the mount is ready, or prints the one-line reason it is not and exits with
the child's status: 2 for a ConfigError (the user's input or set-up, even when found
only once connected, such as a guest root that does not exist), 1 for anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from .control import lock_mountpoint
from .errors import ConfigError, GuestfsError, first_error
from .logsetup import SYSLOG_ADDRESS, one_line, setup_logging, syslog_available
from .mount import MountConfig, serve

log = logging.getLogger("guestfs_mount")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def run(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Serve ``cfg`` until unmounted; the exit status. ``ready_fd``: the daemon's pipe to
    its parent, told ``ok`` or ``error MESSAGE`` (None: report on stderr)."""
    said = False

    def ready() -> None:
        nonlocal said
        said = True
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        # Taken here, in the process that serves (the forked child, not its parent).
        lock_mountpoint(cfg.mountpoint)
        trio.run(serve, cfg, ready)
    except Exception as exc:
        reason = first_error(exc)
        if not isinstance(reason, (GuestfsError, OSError, RuntimeError)):
            log.exception("internal error")
        msg = one_line(str(reason) or type(reason).__name__)
        if said:
            log.error("stopped: %s", msg)
            return EXIT_ERROR
        if ready_fd is not None:
            os.write(ready_fd, ("error " + msg + "\n").encode(errors="replace"))
            os.close(ready_fd)
        else:
            print(f"guestfs-mount: error: {msg}", file=sys.stderr)
        return EXIT_USAGE if isinstance(reason, ConfigError) else EXIT_ERROR
    return EXIT_OK


def daemonize(cfg: MountConfig, args: argparse.Namespace) -> int:
    """Fork; the parent's exit status once the child mounted (0) or failed."""
    no_syslog = not args.log_file and not syslog_available()
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        answer = b"".join(chunks).decode(errors="replace").strip()
        if answer == "ok":
            if no_syslog:  # detached, its stderr is /dev/null: say it where someone reads
                log.warning(
                    "no syslog at %s: the daemon's log is lost; use --log-file FILE",
                    SYSLOG_ADDRESS,
                )
            return EXIT_OK
        # The child exits right after its answer: its status says what kind of error.
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if answer.startswith("error "):
            print(f"guestfs-mount: error: {one_line(answer[6:])}", file=sys.stderr)
        else:
            print(
                f"guestfs-mount: error: the daemon exited before mounting "
                f"(status {status}); run with --foreground to see why",
                file=sys.stderr,
            )
        return code if code > 0 else EXIT_ERROR
    # child: new session, no terminal, stdio to /dev/null
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    try:
        setup_logging(args, daemon=True)
    except ConfigError as exc:  # the log file was replaced since the parent checked it
        os.write(w, ("error " + one_line(str(exc)) + "\n").encode(errors="replace"))
        os._exit(EXIT_USAGE)
    code = run(cfg, w)
    os._exit(code)

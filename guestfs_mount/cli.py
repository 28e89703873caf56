"""Command line of guestfs-mount.

::

    guestfs-mount [OPTIONS] SERVER VM MOUNTPOINT
    guestfs-mount [OPTIONS] --profile NAME MOUNTPOINT
    guestfs-mount PROFILE MOUNTPOINT -o OPT[=VAL],...      (fstab, via mount.fuse3)
    guestfs-mount status [--json] [MOUNTPOINT]
    guestfs-mount evidence MOUNTPOINT [PATH...] --format FORMAT   (see docs/forensics.md)

The parts: :mod:`.options` (the parser), :mod:`.settings` (defaults, config file,
profile and command line merged), :mod:`.credentials` (secrets), :mod:`.mountpoint`
(checks), :mod:`.logsetup`, :mod:`.daemon` (foreground or forked, exit status).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .daemon import EXIT_USAGE, daemonize, run
from .errors import ConfigError
from .evidence.command import main as evidence_main
from .logsetup import one_line, setup_logging
from .settings import build_config, resolve_args
from .status import main as status_main

log = logging.getLogger("guestfs_mount")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return status_main(argv[1:])
    if argv and argv[0] == "evidence":
        return evidence_main(argv[1:])
    try:
        args, warnings = resolve_args(argv)
        setup_logging(args, daemon=False)
        for warning in warnings:
            log.warning("%s", warning)
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"guestfs-mount: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    if args.foreground:
        return run(cfg)
    return daemonize(cfg, args)


if __name__ == "__main__":
    sys.exit(main())

"""The command line's parser: every long option, its help text and its value type.

The parser has no defaults (``argparse.SUPPRESS``), so what was given can be told apart
from what was left out; the defaults and the layering live in :mod:`.settings`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable

from . import __version__
from .config import SYSTEM_CONFIG, default_path
from .errors import ConfigError
from .evidence.command import add_case_options
from .vcenter.tls import normalize_thumbprint

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


MAX_SIZE = 1 << 60
MAX_ID = (1 << 32) - 2  # uid_t/gid_t; (uid_t)-1 means "unchanged" to chown(2)
MAX_SECONDS = 7 * 24 * 3600.0


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if not 0 < value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} out of range (1 byte to 1 EiB)")
    return value


def _id(text: str) -> int:
    """A uid or gid: a whole number from 0 to 4294967294."""
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uid/gid: {text!r}") from None
    if not 0 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"uid/gid {text!r} out of range (0 to {MAX_ID})")
    return value


def _seconds(minimum: float, *, inclusive: bool) -> Callable[[str], float]:
    """A finite duration in seconds, above ``minimum`` (or equal, if ``inclusive``)."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a valid float (seconds): {text!r}") from None
        low_ok = value >= minimum if inclusive else value > minimum
        # NaN fails every comparison, so it lands here too.
        if not (low_ok and value <= MAX_SECONDS):
            raise argparse.ArgumentTypeError(
                f"{text!r} seconds out of range ({bound} and at most {MAX_SECONDS:.0f})"
            )
        return value

    parse.__name__ = "seconds"
    return parse


def _text(text: str) -> str:
    """A name (user, host pattern): not empty, no control characters."""
    if not text or any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise argparse.ArgumentTypeError("must be non-empty, without control characters")
    return text


def _path(text: str) -> str:
    """A local or guest path: not empty, no NUL (the OS could not take it)."""
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError("must be a non-empty path without NUL")
    return text


def _thumbprint(text: str) -> tuple[str, str]:
    usage = "expected HOST[:PORT]=SHA256 (64 hex digits)"
    host, sep, digest = text.partition("=")
    if not sep or not host:
        raise argparse.ArgumentTypeError(usage)
    try:
        return host, normalize_thumbprint(digest)
    except ConfigError:
        raise argparse.ArgumentTypeError(usage) from None


def _tilde(path: str) -> str:
    home = os.path.expanduser("~").rstrip("/")
    return "~" + path[len(home) :] if home and path.startswith(home + "/") else path


USAGE = """\
guestfs-mount [OPTIONS] SERVER VM MOUNTPOINT
       guestfs-mount [OPTIONS] --all-vms SERVER MOUNTPOINT
       guestfs-mount [OPTIONS] --profile NAME MOUNTPOINT
       guestfs-mount [OPTIONS] PROFILE MOUNTPOINT [-o OPT[=VAL],...]
       guestfs-mount status [--json] [MOUNTPOINT]
       guestfs-mount evidence MOUNTPOINT [PATH...] --format FORMAT [-o FILE] [--walk] [--fetch]
       guestfs-mount evidence --verify-log FILE"""

DESCRIPTION = """\
Mount a running VMware VM's guest filesystem read-only, through the vCenter REST API
(VMware Tools guest operations). No agent in the guest, no datastore access; the VM
keeps running.

  SERVER      vCenter: host, host:port, https://host[:port], or a [servers] name
              from the config file
  VM          VM name or id (vm-42)
  MOUNTPOINT  an existing empty directory
  PROFILE     a [profiles] name from the config file (the fstab form)"""

EPILOG = f"""\
secrets:
  vCenter password: --password-file, the server's password_file, $GUESTFS_PASSWORD,
  or a prompt on a terminal. Guest: --guest-password-file / --saml-token-file, the
  profile's, $GUESTFS_GUEST_PASSWORD, or a prompt. Never on the command line, never
  in the config file. Users: --user / --guest-user, the config, $GUESTFS_USER /
  $GUESTFS_GUEST_USER.

config file:
  --config FILE, else {_tilde(default_path())}
  ($XDG_CONFIG_HOME respected), else {SYSTEM_CONFIG}.
  Command-line options override the profile, which overrides its server.

examples:
  guestfs-mount --ca-file vmca.pem vc.example.com web01 /mnt/web01
  guestfs-mount --profile prod-web01 /mnt/web01
  guestfs-mount --profile prod-web01 --frozen --audit-log web01.jsonl /mnt/web01
  guestfs-mount --profile win01 --guest-root 'C:\\' /mnt/win01
  mount /mnt/web01          # with the fstab line
                            #   prod-web01 /mnt/web01 fuse.guestfs-mount _netdev,allow_other 0 0
  guestfs-mount status      # what the running mounts are doing
  fusermount3 -u /mnt/web01 # unmount (or: kill -TERM the daemon)

See docs/usage.md for every option, fstab and systemd set-ups, and troubleshooting."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestfs-mount",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    p.add_argument("positionals", nargs="*", default=[], help=argparse.SUPPRESS)

    g = p.add_argument_group("config file and profiles")
    g.add_argument(
        "--config",
        metavar="FILE",
        type=_path,
        help="config file with servers and profiles (default: see 'config file' below)",
    )
    g.add_argument(
        "--profile", metavar="NAME", type=_text, help="mount the VM of this [profiles] entry"
    )
    g.add_argument(
        "-o",
        dest="mount_options",
        metavar="OPT[=VAL],...",
        action="append",
        help="long options in mount(8) form: allow_other,frozen,metadata_ttl=120 "
        "(generic ones such as _netdev, noauto, nofail, ro are ignored)",
    )

    a = p.add_argument_group("vCenter and guest accounts")
    a.add_argument(
        "--user", type=_text, help="vCenter user (default: the server's, else $GUESTFS_USER)"
    )
    a.add_argument(
        "--password-file",
        metavar="FILE",
        type=_path,
        help="file holding the vCenter password (default: $GUESTFS_PASSWORD, or prompt)",
    )
    a.add_argument(
        "--guest-user",
        metavar="USER",
        type=_text,
        help="guest account (default: the profile's, else $GUESTFS_GUEST_USER)",
    )
    a.add_argument(
        "--guest-password-file",
        metavar="FILE",
        type=_path,
        help="file holding the guest password (default: $GUESTFS_GUEST_PASSWORD, or prompt)",
    )
    a.add_argument(
        "--saml-token-file",
        metavar="FILE",
        type=_path,
        help="authenticate in the guest with this SAML bearer token instead",
    )

    t = p.add_argument_group("TLS and trust")
    t.add_argument(
        "--ca-file", metavar="PEM", type=_path, help="CA bundle for vCenter (default: system)"
    )
    t.add_argument(
        "--esx-ca-file",
        metavar="PEM",
        type=_path,
        help="CA bundle for ESXi transfer hosts (default: --ca-file)",
    )
    t.add_argument(
        "--thumbprint",
        metavar="HOST=SHA256",
        action="append",
        type=_thumbprint,
        help="pin a host's certificate by SHA-256 fingerprint (repeatable)",
    )
    t.add_argument(
        "--esx-host",
        metavar="PATTERN[:PORT]",
        type=_text,
        action="append",
        help="trust transfer URLs on hosts matching this glob, at port 443 or PORT (repeatable)",
    )
    t.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates or transfer hosts (dangerous)",
    )
    t.add_argument(
        "--api",
        choices=("auto", "rest", "preview", "vi-json", "soap", "released"),
        help="vSphere API: vi-json (vCenter 8.0U1+), soap (any vCenter or ESXi host),"
        " rest (/api, 7.0U2+), preview (/api, 7.0U1), auto (default: probe, in that order)",
    )

    v = p.add_argument_group("what the mount shows")
    v.add_argument(
        "--guest-root",
        metavar="PATH",
        type=_path,
        help="guest directory shown at the mount point (default: /; Windows: 'C:\\')",
    )
    v.add_argument("--uid", type=_id, help="show every file as owned by this uid")
    v.add_argument("--gid", type=_id, help="show every file as owned by this gid")
    v.add_argument(
        "--raw-symlinks",
        action="store_true",
        help="show symlink targets unchanged (default: absolute ones stay inside the mount)",
    )
    v.add_argument(
        "--allow-other",
        action="store_true",
        help="let other local users in (the guest's mode bits then apply)",
    )
    v.add_argument(
        "--allow-unsafe-mountpoint",
        action="store_true",
        help="mount on a symlink, or in a directory another user can change (refused by default: "
        "they could swap the mount point before it is mounted)",
    )
    v.add_argument(
        "--metadata-ttl",
        type=_seconds(0.0, inclusive=True),
        metavar="SECONDS",
        help="how long listings and attributes are reused (default: 60)",
    )
    v.add_argument(
        "--frozen",
        action="store_true",
        help="evidence view: nothing fetched once ever changes during the mount",
    )

    c = p.add_argument_group("cache and performance")
    c.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=_path,
        help="where file contents are cached (default: a private temporary directory)",
    )
    c.add_argument(
        "--cache-size",
        type=parse_size,
        metavar="SIZE",
        help="disk the content cache may use (default: 25%% of free space, at most 8G)",
    )
    c.add_argument("--keep-cache", action="store_true", help="keep cached files at unmount")
    c.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not download small files ahead of a sequential directory read",
    )
    c.add_argument(
        "--guest-ops",
        type=int,
        metavar="MAX",
        help="most guest operations in flight per VM; the VM runs them one at a time, so"
        " more only queue in the guest (default: 16, the limit adapts below it)",
    )
    c.add_argument(
        "--timeout",
        type=_seconds(0.0, inclusive=False),
        metavar="SECONDS",
        help="longest any file operation may block (default: 60)",
    )

    o = p.add_argument_group("running")
    o.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (for systemd and debugging)",
    )
    o.add_argument("--debug", action="store_true", help="log every API call and FUSE request")
    o.add_argument(
        "--log-file", metavar="FILE", type=_path, help="log here (daemon default: syslog)"
    )
    o.add_argument(
        "--audit-log",
        metavar="FILE",
        type=_path,
        help="append a JSON line per file transfer (time, path, SHA-256, ...)",
    )
    o.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )
    _add_fleet_options(p)
    add_case_options(p)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} out of range (1 to 100000)")
    return value


def _add_fleet_options(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("the whole vCenter (--all-vms)")
    f.add_argument(
        "--all-vms",
        action="store_true",
        help="mount every VM of SERVER: one directory per VM (give SERVER MOUNTPOINT only)",
    )
    f.add_argument(
        "--vms",
        metavar="GLOB",
        type=_text,
        action="append",
        help="only VMs whose name matches this glob (repeatable: any of them)",
    )
    f.add_argument(
        "--folder",
        metavar="PATH",
        type=_text,
        help="only VMs in this VM folder (prod/web) and the folders below it",
    )
    f.add_argument(
        "--vm-filter",
        choices=("powered-on", "all"),
        help="powered-on (default): hide VMs that cannot answer; all: show them too",
    )
    f.add_argument(
        "--inventory-ttl",
        type=_seconds(0.0, inclusive=False),
        metavar="SECONDS",
        help="how long one listing of the VMs is shown before vCenter is asked again"
        " (default: 60)",
    )
    f.add_argument(
        "--max-guest-ops",
        type=_positive_int,
        metavar="N",
        help="most guest operations and transfers in flight over all VMs (default: 64)",
    )

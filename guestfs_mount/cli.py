"""Command line of guestfs-mount.

::

    guestfs-mount [OPTIONS] SERVER VM MOUNTPOINT
    guestfs-mount [OPTIONS] --profile NAME MOUNTPOINT
    guestfs-mount PROFILE MOUNTPOINT -o OPT[=VAL],...      (fstab, via mount.fuse3)
    guestfs-mount status [--json] [MOUNTPOINT]

Settings come in layers, each overriding the one before: built-in defaults, the
``[servers]`` table of the config file, the profile (and its ``options``), then the
command line (long options and ``-o``). The environment (``GUESTFS_USER``,
``GUESTFS_PASSWORD``, ...) is used for what no layer gave.

Secrets come from files, the environment or a prompt on a terminal; never from the
command line (other users can read it in /proc) nor the config file. The daemon forks
after reading them and the parent returns only when the mount is ready, or prints the
one-line reason it is not and exits non-zero.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from . import __version__
from .config import (
    SYSTEM_CONFIG,
    Config,
    Profile,
    ServerConfig,
    default_path,
    find_config,
    load_config,
    normalize_thumbprint,
    resolve_path,
)
from .errors import ConfigError, GuestfsError
from .evidence.command import CASE_DEFAULTS, add_case_options, case_metadata
from .fs import FsOptions
from .model import CredentialType, GuestCredentials
from .mount import MountConfig
from .vcenter.client import ClientConfig

log = logging.getLogger("guestfs_mount")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _thumbprint(text: str) -> tuple[str, str]:
    host, sep, digest = text.partition("=")
    norm = normalize_thumbprint(digest)
    if not sep or not host or norm is None:
        raise argparse.ArgumentTypeError("expected HOST[:PORT]=SHA256 (64 hex digits)")
    return host, norm


# Values used when neither the config file nor the command line sets an option. The
# parser itself has no defaults (argparse.SUPPRESS), so "given" can be told apart from
# "left at its default" when the layers are merged.
DEFAULTS: dict[str, Any] = {
    "config": None,
    "profile": None,
    "user": None,
    "password_file": None,
    "guest_user": None,
    "guest_password_file": None,
    "saml_token_file": None,
    "ca_file": None,
    "esx_ca_file": None,
    "thumbprint": [],
    "esx_host": [],
    "insecure": False,
    "api": "auto",
    "guest_root": "/",
    "uid": None,
    "gid": None,
    "raw_symlinks": False,
    "allow_other": False,
    "metadata_ttl": 60.0,
    "frozen": False,
    "cache_dir": None,
    "cache_size": None,
    "keep_cache": False,
    "no_prefetch": False,
    "timeout": 60.0,
    "foreground": False,
    "debug": False,
    "log_file": None,
    "audit_log": None,
    **CASE_DEFAULTS,
}
# Options whose value is a local path: "~" is expanded, and relative paths are made
# absolute (the daemon runs in /), against the config file's folder when set there.
_PATH_OPTIONS = frozenset(
    {
        "config",
        "password_file",
        "guest_password_file",
        "saml_token_file",
        "ca_file",
        "esx_ca_file",
        "cache_dir",
        "log_file",
        "audit_log",
    }
)
_LIST_OPTIONS = frozenset({"thumbprint", "esx_host"})
# Long options that make no sense in a profile's options or in -o.
_NOT_SETTINGS = frozenset({"help", "version", "profile"})


def _tilde(path: str) -> str:
    home = os.path.expanduser("~").rstrip("/")
    return "~" + path[len(home) :] if home and path.startswith(home + "/") else path


USAGE = """\
guestfs-mount [OPTIONS] SERVER VM MOUNTPOINT
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
        help="config file with servers and profiles (default: see 'config file' below)",
    )
    g.add_argument("--profile", metavar="NAME", help="mount the VM of this [profiles] entry")
    g.add_argument(
        "-o",
        dest="mount_options",
        metavar="OPT[=VAL],...",
        action="append",
        help="long options in mount(8) form: allow_other,frozen,metadata_ttl=120 "
        "(generic ones such as _netdev, noauto, nofail, ro are ignored)",
    )

    a = p.add_argument_group("vCenter and guest accounts")
    a.add_argument("--user", help="vCenter user (default: the server's, else $GUESTFS_USER)")
    a.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the vCenter password (default: $GUESTFS_PASSWORD, or prompt)",
    )
    a.add_argument(
        "--guest-user",
        metavar="USER",
        help="guest account (default: the profile's, else $GUESTFS_GUEST_USER)",
    )
    a.add_argument(
        "--guest-password-file",
        metavar="FILE",
        help="file holding the guest password (default: $GUESTFS_GUEST_PASSWORD, or prompt)",
    )
    a.add_argument(
        "--saml-token-file",
        metavar="FILE",
        help="authenticate in the guest with this SAML bearer token instead",
    )

    t = p.add_argument_group("TLS and trust")
    t.add_argument("--ca-file", metavar="PEM", help="CA bundle for vCenter (default: system)")
    t.add_argument(
        "--esx-ca-file",
        metavar="PEM",
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
        metavar="PATTERN",
        action="append",
        help="trust transfer URLs on hosts matching this glob (repeatable)",
    )
    t.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates or transfer hosts (dangerous)",
    )
    t.add_argument(
        "--api",
        choices=("auto", "released", "preview"),
        help="transfer API form: released (7.0U2+), preview (7.0U1), auto (default)",
    )

    v = p.add_argument_group("what the mount shows")
    v.add_argument(
        "--guest-root",
        metavar="PATH",
        help="guest directory shown at the mount point (default: /; Windows: 'C:\\')",
    )
    v.add_argument("--uid", type=int, help="show every file as owned by this uid")
    v.add_argument("--gid", type=int, help="show every file as owned by this gid")
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
        "--metadata-ttl",
        type=float,
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
        "--timeout",
        type=float,
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
    o.add_argument("--log-file", metavar="FILE", help="log here (daemon default: syslog)")
    o.add_argument(
        "--audit-log",
        metavar="FILE",
        help="append a JSON line per file transfer (time, path, SHA-256, ...)",
    )
    o.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )
    add_case_options(p)
    return p


# -- option values from the config file and from -o --------------------------------------

# Generic mount(8) options that mount, mount.fuse3 or systemd act on (or that this
# always-read-only, nodev, nosuid mount already implies): accepted and ignored.
_GENERIC_MOUNT_OPTIONS = frozenset(
    {
        "defaults", "ro", "_netdev", "auto", "noauto", "user", "nouser", "users", "owner",
        "group", "nofail", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime",
        "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "diratime",
        "nodiratime", "lazytime", "nolazytime", "async", "sync", "dirsync", "silent",
        "loud", "default_permissions",
    }
)  # fmt: skip
_IGNORED_PREFIXES = ("x-", "comment=")
_TRUE = {"", "1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}
# Names that would carry a secret; refused without echoing the value.
_SECRET_NAMES = frozenset({"password", "guest_password", "saml_token", "token", "secret"})


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``metadata_ttl`` -> its action, for every long option."""
    table: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                table[flag[2:].replace("-", "_")] = action
    return table


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """One option value (from TOML or -o) as the parser would have stored it."""
    if action.nargs == 0:  # a switch
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: is a switch: use true or false")
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and action.dest not in _LIST_OPTIONS:
        raise ConfigError(f"{where}: takes one value, not a list")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ConfigError(f"{where}: must be a string or a number")
        text = str(item)
        try:
            converted = action.type(text) if callable(action.type) else text
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except (TypeError, ValueError):
            kind = getattr(action.type, "__name__", "value")
            raise ConfigError(f"{where}: not a valid {kind}: {text!r}") from None
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ConfigError(f"{where}: must be one of {choices}")
        out.append(converted)
    return out if action.dest in _LIST_OPTIONS else out[0]


def _setting(table: Mapping[str, argparse.Action], key: str, where: str) -> argparse.Action:
    name = key.replace("-", "_")
    if name in _SECRET_NAMES:
        raise ConfigError(f"{where}: secrets are never accepted here; use a *_file option")
    action = table.get(name)
    if action is None or action.dest in _NOT_SETTINGS or action.dest == "mount_options":
        raise ConfigError(f"{where}: unknown option")
    return action


def profile_settings(
    parser: argparse.ArgumentParser, cfg: Config, profile: Profile
) -> dict[str, Any]:
    """The profile's ``options`` table as parser destinations and values."""
    table = _long_options(parser)
    base = os.path.dirname(cfg.path)
    out: dict[str, Any] = {}
    for key, value in profile.options.items():
        where = cfg.where(f"profiles.{profile.name}", f"options.{key}")
        action = _setting(table, key, where)
        if action.dest == "config":
            raise ConfigError(f"{where}: a profile cannot name another config file")
        converted = _convert(action, value, where)
        if action.dest in _PATH_OPTIONS:
            converted = resolve_path(converted, base)
        out[action.dest] = converted
    return out


def parse_mount_options(parser: argparse.ArgumentParser, groups: Sequence[str]) -> dict[str, Any]:
    """``-o allow_other,frozen,metadata_ttl=120`` as parser destinations and values."""
    table = _long_options(parser)
    out: dict[str, Any] = {}
    for group in groups:
        for opt in group.split(","):
            opt = opt.strip()
            name, sep, value = opt.partition("=")
            if not opt or opt in _GENERIC_MOUNT_OPTIONS or opt.startswith(_IGNORED_PREFIXES):
                continue
            if opt == "rw":
                raise ConfigError(
                    "mount option 'rw': guestfs-mount is read-only (use ro, or leave it out)"
                )
            where = f"mount option {name!r}"
            action = _setting(table, name, where)
            if action.nargs == 0:
                word = value.lower()
                if word not in _TRUE | _FALSE:
                    raise ConfigError(f"{where}: is a switch: {name} or {name}=no")
                converted: Any = word in _TRUE
            elif not sep:
                raise ConfigError(f"{where}: needs a value ({name}=...)")
            else:
                converted = _convert(action, value, where)
            if action.dest in _LIST_OPTIONS:
                out.setdefault(action.dest, []).extend(converted)
            else:
                out[action.dest] = converted
    return out


def _absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Command-line paths: "~" expanded, relative to the current directory (the
    daemon runs in /)."""
    for key in _PATH_OPTIONS & values.keys():
        if values[key]:
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    return values


def _server_settings(server: ServerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "server": server.server,
        "thumbprint": list(server.thumbprints.items()),
        "esx_host": list(server.esx_hosts),
    }
    for key in ("user", "password_file", "ca_file", "esx_ca_file", "api"):
        value = getattr(server, key)
        if value is not None:
            out[key] = value
    return out


def _merge(ns: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Lay ``layer`` over ``ns``: lists (thumbprints, ESXi hosts) add up, the rest
    replaces."""
    for key, value in layer.items():
        if key in _LIST_OPTIONS:
            ns[key] = [*ns.get(key, []), *value]
        else:
            ns[key] = value


def _no_config_error(name: str) -> ConfigError:
    return ConfigError(
        f"profile {name!r}: no config file ({default_path()} and {SYSTEM_CONFIG} do not "
        f"exist); create one or use --config FILE"
    )


def resolve_args(
    argv: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """The command line, config file and profile merged into one namespace with every
    DEFAULTS key plus ``server``, ``vm`` and ``mountpoint``; and the config's warnings.
    Usage errors exit through the parser; everything else is a ConfigError."""
    parser = parser or build_parser()
    given = vars(parser.parse_intermixed_args(argv))
    positionals: list[str] = given.pop("positionals", [])
    mount_options: list[str] = given.pop("mount_options", None) or []
    cli = _absolute_paths(parse_mount_options(parser, mount_options))
    _merge(cli, _absolute_paths(given))  # long options win over -o

    profile_name: str | None = cli.pop("profile", None)
    if profile_name is not None:
        if len(positionals) != 1:
            parser.error("with --profile give only the MOUNTPOINT")
        server_arg, vm_arg, (mountpoint,) = None, None, positionals
    elif len(positionals) == 2:
        profile_name, mountpoint = positionals  # the fstab form: SOURCE MOUNTPOINT
        server_arg = vm_arg = None
    elif len(positionals) == 3:
        server_arg, vm_arg, mountpoint = positionals
    else:
        parser.error(
            "expected SERVER VM MOUNTPOINT, --profile NAME MOUNTPOINT or PROFILE MOUNTPOINT"
        )

    config_path: str | None = cli.pop("config", None)
    cfg: Config | None = None
    if config_path is not None:
        cfg = load_config(config_path)
    else:
        found = find_config()
        if found is not None:
            cfg = load_config(found)
        elif profile_name is not None:
            raise _no_config_error(profile_name)

    ns: dict[str, Any] = {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}
    ns["profile"] = profile_name
    ns["config"] = cfg.path if cfg else None
    if profile_name is not None:
        assert cfg is not None
        profile = cfg.profile(profile_name)
        _merge(ns, _server_settings(profile.server))
        ns["vm"] = profile.vm
        profile_layer: dict[str, Any] = {
            "guest_user": profile.guest_user,
            "guest_password_file": profile.guest_password_file,
            "saml_token_file": profile.saml_token_file,
            "guest_root": profile.guest_root,
        }
        _merge(ns, {k: v for k, v in profile_layer.items() if v is not None})
        _merge(ns, profile_settings(parser, cfg, profile))
    else:
        assert server_arg is not None and vm_arg is not None
        if cfg is not None and server_arg in cfg.servers:
            _merge(ns, _server_settings(cfg.servers[server_arg]))
        else:
            ns["server"] = server_arg
        ns["vm"] = vm_arg
    if "guest_password_file" in cli or "saml_token_file" in cli:
        # one guest secret on the command line replaces either kind from the config
        ns["guest_password_file"] = ns["saml_token_file"] = None
    _merge(ns, cli)
    ns["mountpoint"] = mountpoint
    return argparse.Namespace(**ns), list(cfg.warnings) if cfg else []


# -- secrets --------------------------------------------------------------------------------


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            value = f.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    if mode & stat.S_IROTH:
        log.warning("%s file %s is readable by other users: chmod o-r %s", what, path, path)
    return value


def _secret(file: str | None, env: str, what: str, prompt: str) -> str:
    if file:
        return _read_secret_file(file, what)
    value = os.environ.get(env)
    if value:
        return value
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    raise ConfigError(f"no {what}: set ${env} or use the --{what.replace(' ', '-')}-file option")


def _guest_credentials(args: argparse.Namespace) -> GuestCredentials:
    if args.saml_token_file:
        token = _read_secret_file(args.saml_token_file, "SAML token")
        return GuestCredentials(
            CredentialType.SAML_BEARER_TOKEN, user_name=args.guest_user, saml_token=token
        )
    if not args.guest_user:
        raise ConfigError(
            "no guest user: use --guest-user, a profile's guest_user or $GUESTFS_GUEST_USER"
        )
    pw = _secret(
        args.guest_password_file,
        "GUESTFS_GUEST_PASSWORD",
        "guest password",
        f"Password of guest user {args.guest_user}: ",
    )
    return GuestCredentials(
        CredentialType.USERNAME_PASSWORD, user_name=args.guest_user, password=pw
    )


def _is_stale(path: str) -> bool:
    # statvfs always reaches the filesystem; a stat may be answered from the
    # kernel's attribute cache even when the daemon behind it is dead.
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def check_mountpoint(path: str) -> str:
    """The mount point as a real path, or ConfigError saying what is wrong with it.
    A stale mount left by a killed daemon is cleaned up (lazily unmounted)."""
    if _is_stale(path):
        log.warning("%s is a stale mount (its daemon died): unmounting it", path)
        tool = shutil.which("fusermount3") or "fusermount3"
        res = subprocess.run([tool, "-u", "-z", path], capture_output=True, text=True)
        if res.returncode != 0 or _is_stale(path):
            raise ConfigError(
                f"mount point {path} is a stale mount and could not be cleaned: "
                f"run 'fusermount3 -u -z {path}' ({res.stderr.strip()})"
            )
    if not os.path.lexists(path):
        raise ConfigError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise ConfigError(f"mount point {path} is already a mount point")
    try:
        if os.listdir(path):
            raise ConfigError(f"mount point {path} is not empty")
    except PermissionError as exc:
        raise ConfigError(f"mount point {path}: {exc.strerror}") from exc
    return os.path.realpath(path)


def _default_cache_size(cache_dir: str | None) -> int:
    try:
        st = os.statvfs(cache_dir or os.environ.get("TMPDIR") or "/tmp")
        free = st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 30
    return max(256 << 20, min(8 << 30, free // 4))


def _server_url(server: str) -> tuple[str, bool]:
    if server.startswith("http://"):
        return server, True
    return server, False


def build_config(args: argparse.Namespace) -> MountConfig:
    """The MountConfig for a namespace from resolve_args: reads the secrets and checks
    the mount point."""
    args.user = args.user or os.environ.get("GUESTFS_USER") or None
    args.guest_user = args.guest_user or os.environ.get("GUESTFS_GUEST_USER") or None
    if not args.user:
        raise ConfigError("no vCenter user: use --user, a server's user or $GUESTFS_USER")
    password = _secret(
        args.password_file, "GUESTFS_PASSWORD", "password", f"vCenter password of {args.user}: "
    )
    guest = _guest_credentials(args)
    server, plain_http = _server_url(args.server)
    if args.insecure:
        log.warning("--insecure: TLS certificates and transfer hosts are NOT verified")
    client = ClientConfig(
        server=server,
        user=args.user,
        password=password,
        guest=guest,
        ca_file=args.ca_file,
        esx_ca_file=args.esx_ca_file,
        thumbprints=dict(args.thumbprint),
        insecure=args.insecure,
        allow_http=plain_http,
        esx_hosts=tuple(args.esx_host),
        api=args.api,
        # Inside the FUSE deadline (--timeout): the client must give up first, with its
        # own error (counted by the circuit breaker), not be cancelled by the handler.
        call_timeout=min(30.0, args.timeout * 0.4),
        retry_budget=min(20.0, args.timeout * 0.5),
        transfer_stall_timeout=args.timeout * 0.8,
        debug=args.debug,
    )
    fs = FsOptions(
        uid=args.uid,
        gid=args.gid,
        raw_symlinks=args.raw_symlinks,
        ttl=args.metadata_ttl,
        timeout=args.timeout,
        prefetch=not args.no_prefetch,
        debug=args.debug,
    )
    guest_root = args.guest_root
    return MountConfig(
        client=client,
        vm=args.vm,
        mountpoint=check_mountpoint(args.mountpoint),
        guest_root=guest_root,
        fs=fs,
        frozen=args.frozen,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size or _default_cache_size(args.cache_dir),
        keep_cache=args.keep_cache,
        allow_other=args.allow_other,
        audit_log=os.path.abspath(args.audit_log) if args.audit_log else None,
        # live transfer display: only for a person watching a terminal
        progress=bool(args.foreground and not args.log_file and sys.stderr.isatty()),
        case=case_metadata(args),
    )


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
            from logging.handlers import SysLogHandler

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


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from trio nurseries."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _run(cfg: MountConfig, ready_fd: int | None) -> int:
    import trio

    from .mount import serve

    said = False

    def ready(err: str | None) -> None:
        nonlocal said
        said = True
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        trio.run(serve, cfg, ready)
    except Exception as exc:
        leaf = _leaf(exc)
        if not isinstance(leaf, (GuestfsError, OSError, RuntimeError)):
            log.exception("internal error")
        msg = one_line(_describe(leaf))
        if not said:
            if ready_fd is not None:
                os.write(ready_fd, ("error " + msg + "\n").encode(errors="replace"))
                os.close(ready_fd)
            else:
                print(f"guestfs-mount: error: {msg}", file=sys.stderr)
            return EXIT_ERROR
        log.error("stopped: %s", msg)
        return EXIT_ERROR
    return EXIT_OK


def _daemonize(cfg: MountConfig, args: argparse.Namespace) -> int:
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
            return EXIT_OK
        if answer.startswith("error "):
            print(f"guestfs-mount: error: {one_line(answer[6:])}", file=sys.stderr)
        else:
            _, status = os.waitpid(pid, 0)
            print(
                f"guestfs-mount: error: the daemon exited before mounting "
                f"(status {status}); run with --foreground to see why",
                file=sys.stderr,
            )
        return EXIT_ERROR
    # child: new session, no terminal, stdio to /dev/null
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    setup_logging(args, daemon=True)
    code = _run(cfg, w)
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        from .status import main as status_main

        return status_main(argv[1:])
    if argv and argv[0] == "evidence":
        from .evidence.command import main as evidence_main

        return evidence_main(argv[1:])
    try:
        args, warnings = resolve_args(argv)
    except ConfigError as exc:
        print(f"guestfs-mount: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(args, daemon=False)
    for warning in warnings:
        log.warning("%s", warning)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"guestfs-mount: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    if args.foreground:
        return _run(cfg, None)
    return _daemonize(cfg, args)


if __name__ == "__main__":
    sys.exit(main())

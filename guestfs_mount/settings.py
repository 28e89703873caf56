"""Settings layering: what the user asked for, merged from every layer into a MountConfig.

Each layer overrides the one before: built-in defaults, the ``[servers]`` table of the
config file, the profile (and its ``options``), then the command line (long options,
which win over ``-o``). The environment (``GUESTFS_USER``, ``GUESTFS_GUEST_USER``) is
used for what no layer gave; secrets come from :mod:`.credentials`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .config import (
    SECRET_KEYS,
    SYSTEM_CONFIG,
    Config,
    Profile,
    ServerConfig,
    default_path,
    find_config,
    load_config,
    resolve_path,
)
from .credentials import (
    fleet_credentials,
    forget_secret_environment,
    guest_credentials,
    vcenter_password,
)
from .errors import ConfigError
from .evidence.command import CASE_DEFAULTS, case_metadata
from .fleet.options import FleetOptions
from .fs import FsOptions
from .model import CredentialType, GuestCredentials
from .mount import MountConfig
from .mountpoint import check_mountpoint
from .options import build_parser
from .vcenter.client import ClientConfig

log = logging.getLogger("guestfs_mount")

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
    "allow_unsafe_mountpoint": False,
    "metadata_ttl": 60.0,
    "frozen": False,
    "cache_dir": None,
    "cache_size": None,
    "keep_cache": False,
    "no_prefetch": False,
    "guest_ops": 16,
    "timeout": 60.0,
    "foreground": False,
    "debug": False,
    "log_file": None,
    "audit_log": None,
    "all_vms": False,
    "vms": [],
    "folder": None,
    "vm_filter": "powered-on",
    "inventory_ttl": 60.0,
    "max_guest_ops": 64,
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
_LIST_OPTIONS = frozenset({"thumbprint", "esx_host", "vms"})
# Long options that make no sense in a profile's options or in -o.
_NOT_SETTINGS = frozenset({"help", "version", "profile"})


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
    if name in SECRET_KEYS:  # refused without echoing the value
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
    if cli.get("all_vms"):
        if profile_name is not None or len(positionals) != 2:
            parser.error("with --all-vms give SERVER MOUNTPOINT (no VM, no profile)")
        (server_arg, mountpoint), vm_arg = positionals, "*"
    elif profile_name is not None:
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


def _default_cache_size(cache_dir: str | None) -> int:
    try:
        st = os.statvfs(cache_dir or os.environ.get("TMPDIR") or "/tmp")
        free = st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 30
    return max(256 << 20, min(8 << 30, free // 4))


def build_config(args: argparse.Namespace) -> MountConfig:
    """The MountConfig for a namespace from resolve_args: reads the secrets and checks
    the mount point."""
    args.user = args.user or os.environ.get("GUESTFS_USER") or None
    args.guest_user = args.guest_user or os.environ.get("GUESTFS_GUEST_USER") or None
    if not args.user:
        raise ConfigError("no vCenter user: use --user, a server's user or $GUESTFS_USER")
    password = vcenter_password(args.user, args.password_file)
    fleet = None
    if args.all_vms:
        fleet = _fleet_options(args)
        guest = GuestCredentials(CredentialType.USERNAME_PASSWORD)  # each VM has its own
    else:
        guest = guest_credentials(args.guest_user, args.guest_password_file, args.saml_token_file)
    forget_secret_environment()
    if args.insecure:
        log.warning("--insecure: TLS certificates and transfer hosts are NOT verified")
    client = ClientConfig(
        server=args.server,
        user=args.user,
        password=password,
        guest=guest,
        ca_file=args.ca_file,
        esx_ca_file=args.esx_ca_file,
        thumbprints=dict(args.thumbprint),
        insecure=args.insecure,
        # Plain http only when the user wrote it out (any case, as URLs allow).
        allow_http=args.server.lower().startswith("http://"),
        esx_hosts=tuple(args.esx_host),
        api=args.api,
        guest_ops=max(1, args.guest_ops),
        max_guest_ops=args.max_guest_ops if fleet is not None else None,
        debug=args.debug,
    )  # its deadlines are derived from --timeout by the mount (mount.client_deadlines)
    fs = FsOptions(
        uid=args.uid,
        gid=args.gid,
        raw_symlinks=args.raw_symlinks,
        timeout=args.timeout,
        prefetch=not args.no_prefetch,
        debug=args.debug,
    )
    mountpoint = check_mountpoint(args.mountpoint, args.allow_unsafe_mountpoint)
    return MountConfig(
        client=client,
        vm=args.vm,
        mountpoint=mountpoint.path,
        pinned=mountpoint,
        guest_root=args.guest_root,
        fs=fs,
        metadata_ttl=args.metadata_ttl,
        frozen=args.frozen,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size or _default_cache_size(args.cache_dir),
        keep_cache=args.keep_cache,
        allow_other=args.allow_other,
        audit_log=os.path.abspath(args.audit_log) if args.audit_log else None,
        # live transfer display: only for a person watching a terminal
        progress=bool(args.foreground and not args.log_file and sys.stderr.isatty()),
        case=case_metadata(args),
        fleet=fleet,
    )


def _fleet_options(args: argparse.Namespace) -> FleetOptions:
    """--all-vms: the credential rules of the config file (read now, before the fork),
    then the command line's guest account if given, as the last rule."""
    rules = load_config(args.config).guest_credentials if args.config else ()
    creds = fleet_credentials(
        rules, args.guest_user, args.guest_password_file, args.saml_token_file
    )
    if not creds:
        raise ConfigError(
            "--all-vms: no guest account: add [[guest_credentials]] rules to the config file"
            " (or give --guest-user with --guest-password-file)"
        )
    return FleetOptions(
        vm_globs=tuple(args.vms),
        folder=args.folder,
        powered_on=args.vm_filter == "powered-on",
        inventory_ttl=args.inventory_ttl,
        credentials=tuple(creds),
    )

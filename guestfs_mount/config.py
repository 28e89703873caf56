"""The configuration file: servers, accounts and named mount profiles.

::

    [servers.prod]
    server = "vc.example.com"          # host, host:port or https URL (default: the name)
    user = "svc-guestfs@vsphere.local"
    password_file = "~/.secrets/vc-prod"
    ca_file = "/etc/ssl/vmca.pem"
    esx_ca_file = "/etc/ssl/vmca.pem"
    thumbprints = { "esx01.example.com" = "AB:CD:..." }
    esx_hosts = ["esx*.example.com"]
    api = "auto"

    [profiles.prod-web01]
    server = "prod"                    # a [servers] name
    vm = "web01"
    guest_user = "root"
    guest_password_file = "~/.secrets/web01-root"   # or saml_token_file
    guest_root = "/"
    options = { frozen = true, metadata_ttl = 120 }  # any long option

    [[guest_credentials]]              # --all-vms: the first rule matching a VM wins
    vms = ["web-*", "db-*"]            # VM name globs (default: any VM)
    folder = "prod/web"                # VM folder path, the subtree below it too
    family = "linux"                   # linux or windows (vCenter's guest family)
    guest_user = "root"
    guest_password_file = "~/.secrets/linux-root"   # or saml_token_file

The file holds no secret, only the names of files that do: a ``password`` key (or
``guest_password``, ``saml_token``) anywhere is refused. Unknown keys are errors, so
a typo never silently loses a setting. Paths may start with ``~``; relative paths are
relative to the directory of the config file.

This module only reads and validates (TOML -> dataclasses); what the ``options`` of a
profile mean is checked by :mod:`.settings` against the long options of :mod:`.options`.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .vcenter.tls import normalize_thumbprint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

APP = "guestfs-mount"
SYSTEM_CONFIG = f"/etc/{APP}/config.toml"

#: Keys that would hold a secret: never accepted, wherever they appear (the config file,
#: a profile's options, ``-o``).
SECRET_KEYS = frozenset({"password", "guest_password", "saml_token", "token", "secret"})
_SECRET_HINT = {
    "password": "password_file",
    "guest_password": "guest_password_file",
    "saml_token": "saml_token_file",
}
_SERVER_KEYS = {
    "server",
    "user",
    "password_file",
    "ca_file",
    "esx_ca_file",
    "thumbprints",
    "esx_hosts",
    "api",
}
_PROFILE_KEYS = {
    "server",
    "vm",
    "guest_user",
    "guest_password_file",
    "saml_token_file",
    "guest_root",
    "options",
}
_RULE_KEYS = {"vms", "folder", "family", "guest_user", "guest_password_file", "saml_token_file"}
FAMILIES = ("linux", "windows")
_APIS = ("auto", "rest", "preview", "vi-json", "soap", "released")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
# Names the command line gives another meaning as a first argument.
RESERVED_PROFILE_NAMES = frozenset({"status", "evidence"})


@dataclass(frozen=True)
class ServerConfig:
    """A ``[servers.NAME]`` table: a vCenter and the account used on it."""

    name: str
    server: str
    user: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    esx_ca_file: str | None = None
    thumbprints: Mapping[str, str] = field(default_factory=dict)
    esx_hosts: tuple[str, ...] = ()
    api: str | None = None


@dataclass(frozen=True)
class Profile:
    """A ``[profiles.NAME]`` table: one VM on one server, and how to mount it."""

    name: str
    server: ServerConfig
    vm: str
    guest_user: str | None = None
    guest_password_file: str | None = None
    saml_token_file: str | None = None
    guest_root: str | None = None
    # Long option name (dashes or underscores, as written) -> TOML value; checked by
    # settings. Path-valued options are resolved like every other path here.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CredentialRule:
    """One ``[[guest_credentials]]`` entry: which VMs (all of the given tests must
    match) log in with which guest account. ``where`` names it in messages."""

    where: str
    guest_user: str | None
    guest_password_file: str | None = None
    saml_token_file: str | None = None
    vms: tuple[str, ...] = ()  # name globs; empty: any name
    folder: str | None = None
    family: str | None = None  # one of FAMILIES


@dataclass(frozen=True)
class Config:
    path: str
    servers: Mapping[str, ServerConfig] = field(default_factory=dict)
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    guest_credentials: tuple[CredentialRule, ...] = ()

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(f"{self.path}: no profile {name!r} (defined: {known})") from None

    def where(self, section: str, key: str | None = None) -> str:
        """``FILE: [section] key`` for messages."""
        return _where(self.path, section, key)


def _where(path: str, section: str, key: str | None = None) -> str:
    text = f"{path}: [{section}]" if section else f"{path}:"
    return f"{text} {key}" if key else text


def default_path(env: Mapping[str, str] | None = None) -> str:
    """``$XDG_CONFIG_HOME/guestfs-mount/config.toml``, else ``~/.config/...``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME", "")
    if not base or not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".config")
    return os.path.join(base, APP, "config.toml")


def find_config(env: Mapping[str, str] | None = None) -> str | None:
    """The config file to use when none is named: the user's, else the system-wide
    ``/etc/guestfs-mount/config.toml`` (for fstab mounts at boot), else None."""
    for path in (default_path(env), SYSTEM_CONFIG):
        if os.path.exists(path):
            return path
    return None


def load_config(path: str) -> Config:
    """Read and validate ``path``; ConfigError naming the file, section and key."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode: int | None = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path, mode=mode)


def parse_config(text: str, path: str, mode: int | None = None) -> Config:
    """Validate the TOML ``text`` of the config file ``path`` (``mode``: its st_mode,
    for the permission warning). Pure: reads no file."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message names the line and column, never a value.
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _refuse_secrets(doc, path, "")
    warnings: list[str] = []
    if mode is not None and mode & stat.S_IROTH:
        warnings.append(
            f"{path} is readable by other users (it holds account names and file "
            f"paths): chmod o-r {path}"
        )
    base = os.path.dirname(os.path.abspath(path))
    for key in doc:
        if key not in ("servers", "profiles", "guest_credentials"):
            raise ConfigError(
                f"{path}: unknown key {key!r} (expected [servers.NAME] or [profiles.NAME]"
                " tables, or [[guest_credentials]])"
            )
    servers_doc = _table(doc.get("servers", {}), path, "", "servers")
    profiles_doc = _table(doc.get("profiles", {}), path, "", "profiles")
    servers: dict[str, ServerConfig] = {}
    for name, body in servers_doc.items():
        servers[name] = _server(name, body, path, base)
    profiles: dict[str, Profile] = {}
    for name, body in profiles_doc.items():
        profiles[name] = _profile(name, body, path, base, servers)
    raw_rules = doc.get("guest_credentials", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{path}: guest_credentials must be an array of tables ([[...]])")
    rules = tuple(_rule(i, body, path, base) for i, body in enumerate(raw_rules))
    return Config(
        path=path,
        servers=servers,
        profiles=profiles,
        warnings=tuple(warnings),
        guest_credentials=rules,
    )


def _rule(index: int, raw: Any, path: str, base: str) -> CredentialRule:
    section = f"guest_credentials #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(path, section)}: must be a table")
    _refuse_secrets(raw, path, section)
    _unknown(raw, _RULE_KEYS, path, section)
    globs = raw.get("vms", [])
    if isinstance(globs, str):
        globs = [globs]
    if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
        raise ConfigError(f"{_where(path, section, 'vms')}: must be a list of VM name globs")
    family = _str(raw, "family", path, section)
    if family is not None and family.lower() not in FAMILIES:
        choices = ", ".join(FAMILIES)
        raise ConfigError(f"{_where(path, section, 'family')}: must be one of {choices}")
    password_file = _path(raw, "guest_password_file", path, section, base)
    token_file = _path(raw, "saml_token_file", path, section, base)
    if bool(password_file) == bool(token_file):
        raise ConfigError(
            f"{_where(path, section)}: needs one of guest_password_file or saml_token_file"
        )
    user = _str(raw, "guest_user", path, section)
    if password_file and not user:
        raise ConfigError(f"{_where(path, section, 'guest_user')}: missing (the guest account)")
    return CredentialRule(
        where=_where(path, section),
        guest_user=user,
        guest_password_file=password_file,
        saml_token_file=token_file,
        vms=tuple(globs),
        folder=_str(raw, "folder", path, section),
        family=family.lower() if family else None,
    )


def _refuse_secrets(node: Any, path: str, section: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS:
                hint = _SECRET_HINT.get(key)
                use = f"; put it in a file readable only by you and set {hint}" if hint else ""
                raise ConfigError(
                    f"{_where(path, section, key)}: secrets do not belong in the config file{use}"
                )
            if isinstance(value, dict):
                sub = f"{section}.{key}" if section else key
                _refuse_secrets(value, path, sub)


def _table(value: Any, path: str, section: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{_where(path, section, key)}: must be a table")
    return value


def _check_name(kind: str, name: str, path: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"{path}: [{kind}.{name}]: bad name (letters, digits and . _ @ + - only)")


def _str(body: Mapping[str, Any], key: str, path: str, section: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{_where(path, section, key)}: must be a non-empty string")
    return value


def _path(body: Mapping[str, Any], key: str, path: str, section: str, base: str) -> str | None:
    value = _str(body, key, path, section)
    return None if value is None else resolve_path(value, base)


def resolve_path(value: str, base: str) -> str:
    """``~`` expanded; a relative path is relative to ``base`` (the config's folder)."""
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _unknown(body: Mapping[str, Any], allowed: set[str], path: str, section: str) -> None:
    for key in body:
        if key not in allowed:
            raise ConfigError(
                f"{_where(path, section, key)}: unknown key (expected one of: "
                f"{', '.join(sorted(allowed))})"
            )


def _server(name: str, raw: Any, path: str, base: str) -> ServerConfig:
    section = f"servers.{name}"
    _check_name("servers", name, path)
    body = _table(raw, path, "servers", name)
    _unknown(body, _SERVER_KEYS, path, section)
    server = _str(body, "server", path, section) or name
    if any(c.isspace() for c in server):
        raise ConfigError(f"{_where(path, section, 'server')}: no spaces allowed")
    if "://" in server and not server.startswith(("https://", "http://")):
        raise ConfigError(
            f"{_where(path, section, 'server')}: expected host, host:port or https://host"
        )
    thumbprints: dict[str, str] = {}
    raw_tp = body.get("thumbprints", {})
    if not isinstance(raw_tp, dict):
        raise ConfigError(
            f'{_where(path, section, "thumbprints")}: must be a table of "HOST[:PORT]" = "SHA256"'
        )
    for host, digest in raw_tp.items():
        bad = ConfigError(
            f"{_where(path, section, 'thumbprints')}: {host!r}: expected a SHA-256 "
            f"fingerprint (64 hex digits, colons allowed)"
        )
        if not host or not isinstance(digest, str):
            raise bad
        try:
            thumbprints[host] = normalize_thumbprint(digest)
        except ConfigError:
            raise bad from None
    raw_hosts = body.get("esx_hosts", [])
    if isinstance(raw_hosts, str):
        raw_hosts = [raw_hosts]
    if not isinstance(raw_hosts, list) or not all(
        isinstance(h, str) and h.strip() for h in raw_hosts
    ):
        raise ConfigError(f"{_where(path, section, 'esx_hosts')}: must be a list of host patterns")
    api = _str(body, "api", path, section)
    if api is not None and api not in _APIS:
        raise ConfigError(f"{_where(path, section, 'api')}: must be one of {', '.join(_APIS)}")
    return ServerConfig(
        name=name,
        server=server,
        user=_str(body, "user", path, section),
        password_file=_path(body, "password_file", path, section, base),
        ca_file=_path(body, "ca_file", path, section, base),
        esx_ca_file=_path(body, "esx_ca_file", path, section, base),
        thumbprints=thumbprints,
        esx_hosts=tuple(raw_hosts),
        api=api,
    )


def _profile(
    name: str, raw: Any, path: str, base: str, servers: Mapping[str, ServerConfig]
) -> Profile:
    section = f"profiles.{name}"
    _check_name("profiles", name, path)
    if name in RESERVED_PROFILE_NAMES:
        raise ConfigError(f"{path}: [{section}]: {name!r} is a command name, not a profile")
    body = _table(raw, path, "profiles", name)
    _unknown(body, _PROFILE_KEYS, path, section)
    server_name = _str(body, "server", path, section)
    if server_name is None:
        raise ConfigError(f"{_where(path, section, 'server')}: missing (a [servers] name)")
    if server_name not in servers:
        known = ", ".join(sorted(servers)) or "none"
        raise ConfigError(
            f"{_where(path, section, 'server')}: no [servers.{server_name}] table "
            f"(defined: {known})"
        )
    vm = _str(body, "vm", path, section)
    if vm is None:
        raise ConfigError(f"{_where(path, section, 'vm')}: missing (VM name or id)")
    guest_password_file = _path(body, "guest_password_file", path, section, base)
    saml_token_file = _path(body, "saml_token_file", path, section, base)
    if guest_password_file and saml_token_file:
        raise ConfigError(
            f"{path}: [{section}]: guest_password_file and saml_token_file are exclusive: keep one"
        )
    raw_options = body.get("options", {})
    if not isinstance(raw_options, dict):
        raise ConfigError(f"{_where(path, section, 'options')}: must be a table")
    options: dict[str, Any] = {}
    for key, value in raw_options.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"{_where(path, section, f'options.{key}')}: must be a string, number, "
                f"boolean or list"
            )
        options[key] = value
    return Profile(
        name=name,
        server=servers[server_name],
        vm=vm,
        guest_user=_str(body, "guest_user", path, section),
        guest_password_file=guest_password_file,
        saml_token_file=saml_token_file,
        guest_root=_str(body, "guest_root", path, section),
        options=options,
    )


__all__ = [
    "SECRET_KEYS",
    "SYSTEM_CONFIG",
    "Config",
    "CredentialRule",
    "Profile",
    "ServerConfig",
    "default_path",
    "find_config",
    "load_config",
    "parse_config",
    "resolve_path",
]

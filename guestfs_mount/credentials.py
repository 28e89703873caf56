"""Secrets: the vCenter password and the guest credentials, from a file, the environment
or a prompt on a terminal; never from the command line (other users can read it in /proc)
nor the config file.

The environment variables that may hold a secret are named once, in :data:`SECRET_ENV`,
and read only here, so that they can be removed from the environment once read.
"""

from __future__ import annotations

import ctypes
import fnmatch
import getpass
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import CredentialRule
from .errors import ConfigError
from .model import CredentialType, GuestCredentials

log = logging.getLogger("guestfs_mount")

PASSWORD_ENV = "GUESTFS_PASSWORD"
GUEST_PASSWORD_ENV = "GUESTFS_GUEST_PASSWORD"
#: Every environment variable read for a secret.
SECRET_ENV = (PASSWORD_ENV, GUEST_PASSWORD_ENV)


def read_secret_file(path: str, what: str) -> str:
    """The first line of ``path`` (a password or token file); ConfigError if unreadable or
    empty. Warns (without the value) when other users may read the file."""
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
        return read_secret_file(file, what)
    value = os.environ.get(env)
    if value:
        return value
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    raise ConfigError(f"no {what}: set ${env} or use the --{what.replace(' ', '-')}-file option")


def vcenter_password(user: str, password_file: str | None) -> str:
    """The vCenter password of ``user``: its file, else $GUESTFS_PASSWORD, else a prompt."""
    return _secret(password_file, PASSWORD_ENV, "password", f"vCenter password of {user}: ")


def guest_credentials(
    user: str | None, password_file: str | None, saml_token_file: str | None
) -> GuestCredentials:
    """The guest login: a SAML token from its file, else ``user`` with the password from
    its file, $GUESTFS_GUEST_PASSWORD or a prompt."""
    if saml_token_file:
        token = read_secret_file(saml_token_file, "SAML token")
        return GuestCredentials(CredentialType.SAML_BEARER_TOKEN, user_name=user, saml_token=token)
    if not user:
        raise ConfigError(
            "no guest user: use --guest-user, a profile's guest_user or $GUESTFS_GUEST_USER"
        )
    pw = _secret(
        password_file, GUEST_PASSWORD_ENV, "guest password", f"Password of guest user {user}: "
    )
    return GuestCredentials(CredentialType.USERNAME_PASSWORD, user_name=user, password=pw)


@dataclass(frozen=True)
class FleetCredential:
    """A ``[[guest_credentials]]`` rule with its secret read (a fleet mount)."""

    rule: CredentialRule
    creds: GuestCredentials

    def matches(self, name: str, family: str | None, in_folder: Callable[[str], bool]) -> bool:
        """All of the rule's tests hold for a VM: a name glob (case-sensitive, as VM
        names are), the family (unknown matches no rule that names one), the folder."""
        r = self.rule
        if r.vms and not any(fnmatch.fnmatchcase(name, g) for g in r.vms):
            return False
        if r.family is not None and r.family != family:
            return False
        return r.folder is None or in_folder(r.folder)


def fleet_credentials(
    rules: Sequence[CredentialRule],
    user: str | None = None,
    password_file: str | None = None,
    saml_token_file: str | None = None,
) -> list[FleetCredential]:
    """The config's rules with their files read (before the fork: an unreadable file is
    a start-up error, not an EACCES in one VM later), then the command line's account,
    if given, as a last rule matching every VM. Never the environment or a prompt:
    one secret typed once must not be sent to every guest of a vCenter."""
    out = [FleetCredential(r, _rule_credentials(r)) for r in rules]
    if saml_token_file or (user and password_file):
        rule = CredentialRule(
            where="the command line", guest_user=user, guest_password_file=password_file,
            saml_token_file=saml_token_file,
        )  # fmt: skip
        out.append(FleetCredential(rule, _rule_credentials(rule)))
    return out


def _rule_credentials(rule: CredentialRule) -> GuestCredentials:
    if rule.saml_token_file:
        token = read_secret_file(rule.saml_token_file, "SAML token")
        return GuestCredentials(
            CredentialType.SAML_BEARER_TOKEN, user_name=rule.guest_user, saml_token=token
        )
    assert rule.guest_password_file is not None  # the config parser checked it
    pw = read_secret_file(rule.guest_password_file, "guest password")
    return GuestCredentials(
        CredentialType.USERNAME_PASSWORD, user_name=rule.guest_user, password=pw
    )


def forget_secret_environment() -> None:
    """Remove the secret variables from the environment once read, before the fork: the
    daemon lives for days and same-uid processes can read its /proc/PID/environ.

    ``unsetenv`` alone is not enough: /proc/PID/environ shows the block the kernel
    copied at exec, which libc never changes, so those bytes are overwritten too."""
    for name in SECRET_ENV:
        os.environ.pop(name, None)
    try:
        _wipe_exec_environment(tuple(os.fsencode(n) + b"=" for n in SECRET_ENV))
    except (OSError, ValueError, IndexError) as exc:
        log.warning("could not clear the secrets from /proc/%d/environ: %s", os.getpid(), exc)


def _wipe_exec_environment(prefixes: tuple[bytes, ...]) -> None:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # env_start and env_end are fields 50 and 51 of stat(5); the split starts at field 3.
    start, end = int(fields[47]), int(fields[48])
    with open("/proc/self/environ", "rb") as f:
        block = f.read()
    if start <= 0 or len(block) > end - start:
        raise ValueError("unexpected environment block")
    offset = 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefixes):
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1

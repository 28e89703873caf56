"""Plain data shared by every layer: what the guest reports about its files.

Guest paths and names are ``str``. A guest name that is not valid UTF-8 travels as a
``str`` with lone surrogates (Python's ``surrogateescape``), so ``os.fsencode(name)``
gives back the guest's bytes; every layer keeps that property.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

# The SHA-256 of zero bytes: what an empty file hashes to without any transfer.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class FileType(enum.Enum):
    FILE = "FILE"
    DIRECTORY = "DIRECTORY"
    SYMLINK = "SYMLINK"


class FilesystemFamily(enum.Enum):
    POSIX = "POSIX"
    WINDOWS = "WINDOWS"


class PowerState(enum.Enum):
    POWERED_ON = "POWERED_ON"
    POWERED_OFF = "POWERED_OFF"
    SUSPENDED = "SUSPENDED"


@dataclass(frozen=True, slots=True)
class GuestStat:
    """``files/{path}?action=get``: the full attributes of one guest path.

    Times are integer nanoseconds since the epoch. ``permissions`` holds only the
    chmod(2) bits (``0o7777`` at most); ``owner``/``group`` are None for Windows guests.
    """

    type: FileType
    size: int
    mtime_ns: int
    atime_ns: int
    family: FilesystemFamily = FilesystemFamily.POSIX
    owner: int | None = None
    group: int | None = None
    permissions: int | None = None
    symlink_target: str | None = None
    hidden: bool | None = None
    read_only: bool | None = None
    created_ns: int | None = None


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One listed entry. ``stat`` is set when the listing itself carried the entry's full
    attributes (the vim25 ``ListFilesInGuest``; REST listings give name, type and size
    only and leave it None), so a stat cache can be filled without a call per entry."""

    name: str
    type: FileType
    size: int
    stat: GuestStat | None = None


@dataclass(frozen=True, slots=True)
class VmInfo:
    """``instance_uuid``: vCenter's own unique id of the VM (REST ``identity.instance_uuid``,
    vim25 ``config.instanceUuid``); None when the server did not give it. Unlike the name
    and the moid, it is not reused by another VM, so a kept cache is keyed by it."""

    vm: str
    name: str
    power_state: PowerState
    instance_uuid: str | None = None


class CredentialType(enum.Enum):
    USERNAME_PASSWORD = "USERNAME_PASSWORD"
    SAML_BEARER_TOKEN = "SAML_BEARER_TOKEN"


@dataclass(frozen=True, slots=True)
class GuestCredentials:
    """Guest account sent with every guest operation. Secrets are kept out of ``repr``."""

    type: CredentialType
    user_name: str | None = None
    password: str | None = field(default=None, repr=False)
    saml_token: str | None = field(default=None, repr=False)
    interactive_session: bool = False

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "type": self.type.value,
            "interactive_session": self.interactive_session,
        }
        if self.user_name is not None:
            body["user_name"] = self.user_name
        if self.type is CredentialType.USERNAME_PASSWORD and self.password is not None:
            body["password"] = self.password
        if self.type is CredentialType.SAML_BEARER_TOKEN and self.saml_token is not None:
            body["saml_token"] = self.saml_token
        return body


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a finished download delivered. ``stat`` is the file's attributes as the
    transport reported them with the transfer URL (vim25), None when it does not (REST):
    they confirm the version (size, mtime) that was fetched."""

    nbytes: int
    sha256: str
    seconds: float
    md5: str = ""  # beside the SHA-256: hashdeep manifests and bodyfiles carry MD5
    stat: GuestStat | None = None


class BodyWriter(Protocol):
    """Where a download's body goes: the transfer's worker thread stores each piece itself
    (one hop per piece, no thread -> event loop -> thread relay), then says on the event
    loop how far the body is stored. Implemented by the content cache (a cache file)."""

    def write(self, data: bytes, offset: int) -> None:
        """Store ``data`` at ``offset``: called in a worker thread, in order, from 0 up
        (blocking is fine). Raises a :class:`~guestfs_mount.errors.GuestfsError` (a full
        disk, a body longer than announced), which ends the download."""

    def stored(self, nbytes: int) -> None:
        """On the event loop: bytes ``[0, nbytes)`` are stored. Reports are coalesced
        (not one per ``write``) and only grow; this must not raise."""

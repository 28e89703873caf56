"""The vim25 wire model shared by the SOAP and VI/JSON front ends: data objects, the
parameter kinds of each method, and guest entries as ``GuestFileInfo``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .entry import DIRECTORY, FILE, SYMLINK, GuestEntry
from .vim_faults import MoRef

API_VERSION = "8.0.3.0"
# vimServiceVersions.xml priorVersions, and the VI/JSON releases served (8.0.1.0 is the
# first vCenter with VI/JSON).
PRIOR_VERSIONS = ("8.0.2.0", "8.0.1.0", "8.0.0.0", "7.0.3.0", "7.0.2.0", "7.0.1.0", "7.0.0.0")
VI_JSON_RELEASES = frozenset({"8.0.1.0", "8.0.2.0", "8.0.3.0"})
DEFAULT_PAGE = 50  # ListFilesInGuest maxResults default (spec)


@dataclass
class DateTime:
    """An ``xsd:dateTime``, whole seconds (what Tools reports)."""

    seconds: int

    def text(self) -> str:
        dt = datetime.fromtimestamp(self.seconds, tz=timezone.utc)
        return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class AnyValue:
    """A value in an ``xsd:anyType`` slot: it travels with its type name."""

    type_name: str  # "string", "boolean", "int", "ManagedObjectReference", an enum or a data type
    value: Any


@dataclass
class Data:
    """A vim25 data object: type name and fields in XSD sequence order."""

    type_name: str
    fields: list[tuple[str, Any]] = field(default_factory=list)
    polymorphic: bool = False  # declared as a base type: needs xsi:type / _typeName


Value = Any  # str | int | bool | MoRef | DateTime | AnyValue | Data | list[...] | None


# Parameter kinds per method (XSD sequence order): moref, auth, string, int, bool,
# strings (repeated), specSet, options.
PARAMS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "RetrieveServiceContent": (),
    "Login": (
        ("userName", "string", True),
        ("password", "string", True),
        ("locale", "string", False),
    ),
    "Logout": (),
    "CurrentTime": (),
    "ListFilesInGuest": (
        ("vm", "moref", True),
        ("auth", "auth", True),
        ("filePath", "string", True),
        ("index", "int", False),
        ("maxResults", "int", False),
        ("matchPattern", "string", False),
    ),
    "InitiateFileTransferFromGuest": (
        ("vm", "moref", True),
        ("auth", "auth", True),
        ("guestFilePath", "string", True),
    ),
    "ValidateCredentialsInGuest": (("vm", "moref", True), ("auth", "auth", True)),
    "FindByInventoryPath": (("inventoryPath", "string", True),),
    "CreateContainerView": (
        ("container", "moref", True),
        ("type", "strings", False),
        ("recursive", "bool", True),
    ),
    "DestroyView": (),
    "RetrieveProperties": (("specSet", "specSet", True),),
    "RetrievePropertiesEx": (("specSet", "specSet", True), ("options", "options", True)),
    "ContinueRetrievePropertiesEx": (("token", "string", True),),
    "CancelRetrievePropertiesEx": (("token", "string", True),),
    "Fetch": (("prop", "string", True),),
}


# ---- property collector specs ---------------------------------------------------------
@dataclass
class PropertySpec:
    """A PropertyFilterSpec reduced to what the simulator uses."""

    props: list[tuple[str, list[str]]]  # (type, pathSet)
    objects: list[tuple[MoRef, bool, bool]]  # (obj, skip, has selectSet)


def as_any(value: Value) -> Value:
    if isinstance(value, AnyValue):
        return value
    if isinstance(value, Data):
        return AnyValue(value.type_name, value)
    if isinstance(value, bool):
        return AnyValue("boolean", value)
    if isinstance(value, int):
        return AnyValue("int", value)
    if isinstance(value, str):
        return AnyValue("string", value)
    if isinstance(value, MoRef):
        return AnyValue("ManagedObjectReference", value)
    if isinstance(value, list):
        return AnyValue("ArrayOfManagedObjectReference", value)
    raise TypeError(type(value))


# ---- listings with attributes ---------------------------------------------------------
def attributes(e: GuestEntry) -> Data:
    """GuestPosixFileAttributes / GuestWindowsFileAttributes of an entry."""
    base: list[tuple[str, Any]] = [
        ("modificationTime", DateTime(e.mtime)),
        ("accessTime", DateTime(e.atime)),
    ]
    if e.symlink_target is not None:
        base.append(("symlinkTarget", e.symlink_target))
    if e.family == "WINDOWS":
        return Data(
            "GuestWindowsFileAttributes",
            [
                *base,
                ("hidden", e.hidden),
                ("readOnly", e.read_only),
                ("createTime", DateTime(e.ctime)),
            ],
            polymorphic=True,
        )
    return Data(
        "GuestPosixFileAttributes",
        [*base, ("ownerId", e.uid), ("groupId", e.gid), ("permissions", e.mode)],
        polymorphic=True,
    )


FILE_TYPE = {FILE: "file", DIRECTORY: "directory", SYMLINK: "symlink"}


def file_info(e: GuestEntry) -> Data:
    return Data(
        "GuestFileInfo",
        [
            ("path", e.name),
            ("type", FILE_TYPE[e.type]),
            ("size", e.size),
            ("attributes", attributes(e)),
        ],
    )


def wire_safe(e: GuestEntry, xml: bool) -> bool:
    """Whether a name can travel: valid UTF-8 (a real guest's Tools sends UTF-8 only
    [estimate]) and, over SOAP, only characters XML 1.0 can carry."""
    try:
        e.name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not xml or _xml_ok(e.name)


def _xml_ok(text: str) -> bool:
    return all(
        c in "\t\n" or "\x20" <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd" or c >= "\U00010000"
        for c in text
    )

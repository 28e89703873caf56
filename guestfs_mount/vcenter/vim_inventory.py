"""The fleet's inventory over vim25 (VI/JSON or SOAP): every VM with its power state,
Tools state, guest family, instance UUID and folder, in one paged property collector read.

One ``ContainerView`` of ``VirtualMachine`` and ``Folder`` over the root folder
(recursive), one ``RetrievePropertiesEx`` over it (``maxObjects`` per page) continued
with its token until the result ends, then the view is destroyed. REST's
``GET /api/vcenter/vm`` refuses more than 4,000 VMs; this has no such limit, and since
the family and the Tools state come with the listing, opening a VM needs no vCenter call
of its own (:mod:`guestfs_mount.fleet.vm`).

Every answer is untrusted: at most ``max_objects`` objects and a bounded number of pages
are read (a server whose token never ends, or that claims a million VMs, gives a
:class:`ProtocolError`, and the rest of its result is cancelled); a VM without a usable
id or name is skipped. Names come as vim25 carries them (``%``, ``/`` and ``\\`` escaped
as ``%25``, ``%2f``, ``%5c``) and are unescaped here, so they equal REST's.

Folder paths (``--folder prod/web``, a credential rule's ``folder``) are resolved from
the same listing (each Folder's name and parent), the way REST's
:func:`.inventory.folder_subtree` does: the first name matches a folder of that name
anywhere, each next one a child of the previous, and the subtree below counts.
"""

from __future__ import annotations

import logging
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from guestfs_mount.errors import GuestfsError, NotFound, ProtocolError
from guestfs_mount.model import PowerState

from . import parse, vim
from .inventory import InventoryVm

log = logging.getLogger(__name__)

__all__ = [
    "MAX_OBJECTS",
    "PAGE_SIZE",
    "VimCaller",
    "VimListing",
    "family_of_listing",
    "list_inventory",
    "read_vm",
    "select",
]

PAGE_SIZE = 1000  # objects per page: ~1 MB of SOAP, well inside the reply cap
MAX_OBJECTS = 250_000  # VMs and folders: a vCenter holds at most 45,000 VMs
VM_PROPS = (
    "name",
    "runtime.powerState",
    "guest.toolsRunningStatus",
    "guest.guestFamily",
    "config.instanceUuid",
    "config.guestId",
    "parent",
)
FOLDER_PROPS = ("name", "parent")
_MAX_PROPS = 64  # properties of one object in an answer
_MAX_NAME = 1024
_POWER = {
    "poweredOn": PowerState.POWERED_ON,
    "poweredOff": PowerState.POWERED_OFF,
    "suspended": PowerState.SUSPENDED,
}
_FAMILY = re.compile(r"([A-Za-z]{1,32}?)(?:GuestFamily|Guest)?", re.ASCII)


class VimCaller(Protocol):
    """What the listing needs of a vim25 transport (:class:`.vim.GuestOps` subclasses)."""

    async def service_content(self) -> Any: ...

    async def vim_call(
        self, method: str, this: Mapping[str, str], args: Mapping[str, Any], *, desc: str
    ) -> Any: ...


@dataclass(frozen=True)
class VimListing:
    """One inventory read: every VM (any power state) and every folder."""

    vms: tuple[InventoryVm, ...]
    folders: Mapping[str, tuple[str, str | None]]  # folder id -> (name, parent folder id)

    def folder_subtree(self, path: str) -> frozenset[str]:
        """The ids of folder ``path`` and every folder below it; NotFound if none."""
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise NotFound(f"folder {path!r}: empty path")
        ids = {f for f, (name, _p) in self.folders.items() if name == parts[0]}
        for part in parts[1:]:
            ids = {f for f, (name, p) in self.folders.items() if name == part and p in ids}
        if not ids:
            raise NotFound(f"no VM folder {path!r} on this vCenter")
        children: dict[str, list[str]] = {}
        for f, (_name, p) in self.folders.items():
            if p is not None:
                children.setdefault(p, []).append(f)
        found, frontier = set(ids), list(ids)
        while frontier:
            nxt = [c for f in frontier for c in children.get(f, ()) if c not in found]
            found.update(nxt)
            frontier = nxt
        return frozenset(found)

    def in_folders(self, folders: Iterable[str]) -> list[InventoryVm]:
        ids = set(folders)
        return [v for v in self.vms if v.folder in ids]


def _scalar(v: Any) -> Any:
    # VI/JSON carries an anyType value as {"_typeName": "string", "_value": ...}; SOAP's
    # reader already gives the text (a MoRef stays a dict in both).
    if isinstance(v, Mapping) and "_value" in v:
        return v["_value"]
    return v


def _text(v: Any, limit: int = _MAX_NAME) -> str | None:
    v = _scalar(v)
    return v if isinstance(v, str) and 0 < len(v) <= limit else None


def _name(v: Any) -> str | None:
    raw = _text(v, 3 * _MAX_NAME)
    if raw is None:
        return None
    name = urllib.parse.unquote(raw, errors="surrogateescape") if "%" in raw else raw
    return name if len(name) <= _MAX_NAME else None


def _ref(v: Any, mo_type: str) -> str | None:
    if not isinstance(v, Mapping) or v.get("type") != mo_type:
        return None
    try:
        return vim.moref_value(v, mo_type)
    except ProtocolError:
        return None


def family_of_listing(guest_family: Any, guest_id: Any) -> str | None:
    """``linux``, ``windows`` (or another family, lower case) from ``guest.guestFamily``
    (``linuxGuest``: Tools reported it), else from the configured ``config.guestId``
    (``windows9Server64Guest``; REST's rule: not Windows is Linux), else None."""
    text = _text(guest_family, 64)
    m = _FAMILY.fullmatch(text) if text is not None else None
    if m is not None:
        return m.group(1).lower()
    gid = _text(guest_id, 128)
    if gid is None:
        return None
    return "windows" if gid.lower().startswith("win") else "linux"


def _props(obj: Mapping[str, Any]) -> dict[str, Any]:
    props = obj.get("propSet") or []
    if isinstance(props, Mapping):
        props = [props]
    if not isinstance(props, list) or len(props) > _MAX_PROPS:
        raise ProtocolError("inventory: an object's propSet is not a short array")
    out: dict[str, Any] = {}
    for p in props:
        if isinstance(p, Mapping) and isinstance(p.get("name"), str):
            out[p["name"]] = p.get("val")
    return out


def _vm(moid: str, props: Mapping[str, Any]) -> InventoryVm | None:
    name = _name(props.get("name"))
    if name is None:
        return None
    tools = _text(props.get("guest.toolsRunningStatus"), 64)
    power = _POWER.get(str(_scalar(props.get("runtime.powerState"))), PowerState.POWERED_OFF)
    return InventoryVm(
        vm=moid,
        name=name,
        power_state=power,
        family=family_of_listing(props.get("guest.guestFamily"), props.get("config.guestId")),
        # unset (Tools never ran) reads as not running: the VM cannot answer either way
        tools_running=tools == "guestToolsRunning",
        instance_uuid=parse.instance_uuid(_scalar(props.get("config.instanceUuid"))),
        folder=_ref(props.get("parent"), "Folder"),
    )


class _Reader:
    """The objects of a result's pages, bounded."""

    def __init__(self, max_objects: int) -> None:
        self.max_objects = max_objects
        self.count = 0
        self.vms: dict[str, InventoryVm] = {}
        self.folders: dict[str, tuple[str, str | None]] = {}
        self.skipped = 0

    def page(self, data: Any) -> str | None:
        """Read one ``RetrieveResult`` (None: no objects at all); its token, if any."""
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise ProtocolError("inventory: a RetrieveResult is not an object")
        objects = data.get("objects") or []
        if isinstance(objects, Mapping):
            objects = [objects]
        if not isinstance(objects, list):
            raise ProtocolError("inventory: 'objects' is not an array")
        self.count += len(objects)
        if self.count > self.max_objects:
            raise ProtocolError(f"inventory: more than {self.max_objects} objects")
        for obj in objects:
            self._object(obj)
        token = data.get("token")
        if token is None:
            return None
        if not isinstance(token, str) or not 0 < len(token) <= 1024:
            raise ProtocolError("inventory: an unusable continuation token")
        return token

    def _object(self, obj: Any) -> None:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("obj"), Mapping):
            self.skipped += 1
            return
        ref = obj["obj"]
        props = _props(obj)
        vm_id = _ref(ref, "VirtualMachine")
        if vm_id is not None:
            vm = _vm(vm_id, props)
            if vm is None:
                self.skipped += 1
            else:
                self.vms[vm_id] = vm
            return
        folder_id = _ref(ref, "Folder")
        name = _name(props.get("name"))
        if folder_id is not None and name is not None:
            self.folders[folder_id] = (name, _ref(props.get("parent"), "Folder"))
        else:
            self.skipped += 1


# A view's id names its session: "session[52b0...]52e1..." on a real vCenter.
_VIEW_ID = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,256}", re.ASCII)


def _view_id(v: Any) -> str:
    value = v.get("value") if isinstance(v, Mapping) else None
    if not isinstance(value, str) or not _VIEW_ID.fullmatch(value):
        raise ProtocolError("inventory: CreateContainerView gave no usable view")
    return value


def _spec(view: str) -> dict[str, Any]:
    return {
        "propSet": [
            {"type": "VirtualMachine", "all": False, "pathSet": list(VM_PROPS)},
            {"type": "Folder", "all": False, "pathSet": list(FOLDER_PROPS)},
        ],
        "objectSet": [
            {
                "obj": vim.moref("ContainerView", view),
                "skip": True,
                "selectSet": [
                    {
                        "_typeName": "TraversalSpec",
                        "name": "view",
                        "type": "ContainerView",
                        "path": "view",
                        "skip": False,
                    }
                ],
            }
        ],
    }


async def _best_effort(t: VimCaller, method: str, this: Mapping[str, str],
                       args: Mapping[str, Any], desc: str) -> None:  # fmt: skip
    # Clean-up on the server: short, shielded (it runs while an error or a cancellation
    # is on its way out), and its own failure only logged.
    with trio.move_on_after(5) as scope:
        scope.shield = True
        try:
            await t.vim_call(method, this, args, desc=desc)
        except GuestfsError as exc:
            log.debug("%s: %s", desc, exc)


async def _refs(t: VimCaller) -> tuple[str, str, str]:
    """The ids of the root folder, the ViewManager and the PropertyCollector."""
    sc = await t.service_content()
    if not isinstance(sc, Mapping):
        raise ProtocolError("inventory: the service content is not an object")
    root, views, collector = (
        vim.moref_value(sc.get(k), f"service content {k}")
        for k in ("rootFolder", "viewManager", "propertyCollector")
    )
    return root, views, collector


async def read_vm(t: VimCaller, vm: str) -> InventoryVm | None:
    """One VM's entry as a listing would give it, read now (None: no such VM). For a VM
    the last listing said cannot answer, tried again before the next listing."""
    _root, _views, collector = await _refs(t)
    spec = {
        "propSet": [{"type": "VirtualMachine", "all": False, "pathSet": list(VM_PROPS)}],
        "objectSet": [{"obj": vim.moref("VirtualMachine", vm), "skip": False}],
    }
    data = await t.vim_call(
        "RetrievePropertiesEx", vim.moref("PropertyCollector", collector),
        {"specSet": [spec], "options": {}}, desc=f"state of VM {vm}",
    )  # fmt: skip
    reader = _Reader(max_objects=4)
    reader.page(data)  # one object: a token, if a server sent one, is left to expire
    return reader.vms.get(vm)


async def list_inventory(
    t: VimCaller, *, page_size: int = PAGE_SIZE, max_objects: int = MAX_OBJECTS
) -> VimListing:
    """Every VM and VM folder of the server, read through one container view."""
    root, views, collector = await _refs(t)
    pc = vim.moref("PropertyCollector", collector)
    made = await t.vim_call(
        "CreateContainerView", vim.moref("ViewManager", views),
        {"container": vim.moref("Folder", root), "type": ["VirtualMachine", "Folder"],
         "recursive": True},
        desc="create a view of every VM",
    )  # fmt: skip
    view = _view_id(made)
    reader = _Reader(max_objects)
    # Each page holds at least a quarter of what was asked, or the server is stalling.
    max_pages = 4 * math.ceil(max_objects / max(1, page_size)) + 16
    token: str | None = None
    try:
        data = await t.vim_call(
            "RetrievePropertiesEx", pc,
            {"specSet": [_spec(view)], "options": {"maxObjects": page_size}},
            desc="list the VMs",
        )  # fmt: skip
        pages = 1
        token = reader.page(data)
        while token is not None:
            if pages >= max_pages:
                raise ProtocolError(f"inventory: more than {max_pages} pages")
            data = await t.vim_call(
                "ContinueRetrievePropertiesEx", pc, {"token": token}, desc="list the VMs"
            )
            pages += 1
            token = reader.page(data)
    except BaseException:
        if token is not None:
            await _best_effort(
                t, "CancelRetrievePropertiesEx", pc, {"token": token}, "cancel the VM listing"
            )
        raise
    finally:
        await _best_effort(
            t, "DestroyView", vim.moref("ContainerView", view), {}, "destroy the VM view"
        )
    if reader.skipped:
        log.warning("inventory: skipped %d objects without a usable id or name", reader.skipped)
    return VimListing(tuple(reader.vms.values()), reader.folders)


def select(
    listing: VimListing, *, folders: Sequence[str] = (), powered_on: bool = True
) -> list[InventoryVm]:
    """The VMs of ``listing`` in ``folders`` (ids; all when empty), powered on if asked."""
    vms = listing.in_folders(folders) if folders else list(listing.vms)
    if powered_on:
        vms = [v for v in vms if v.power_state is PowerState.POWERED_ON]
    return vms

"""The fleet's inventory over REST: which VMs there are, their folders and guest family.

``GET /api/vcenter/vm`` lists VMs (filtered by power state and parent folders); a folder
path (``prod/web``) is resolved component by component with ``GET /api/vcenter/folder``
(``names`` and ``parent_folders``), and a subtree is its folder and every folder below
it. A VM's guest family comes from ``GET /api/vcenter/vm/{vm}/guest/identity`` (Tools
running) or ``GET /api/vcenter/vm/{vm}`` (``guest_OS``), asked once per VM and only when
the VM is first used. None of these is a guest operation: the guests are not touched.

The transport is REST (``/api``): the fleet uses this module with ``--api rest`` or
``preview``; the vim25 transports list the fleet with :mod:`.vim_inventory` (no 4,000
limit, and the family and Tools state in the same listing).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guestfs_mount.errors import ApiError, NotFound, ProtocolError, RemoteError
from guestfs_mount.model import PowerState

from . import parse
from .rest import RestTransport
from .session import NoSuchOperation

__all__ = [
    "InventoryVm",
    "configured_family",
    "family_of",
    "folder_subtree",
    "list_vms",
    "running_family",
]

# The REST list refuses more matches than this (vCenter's own limit).
MAX_REST_VMS = 4000
_TOO_MANY = "UNABLE_TO_ALLOCATE_RESOURCE"
_MAX_FOLDERS = 10_000


@dataclass(frozen=True, slots=True)
class InventoryVm:
    vm: str
    name: str
    power_state: PowerState
    # Known from a vim25 listing (:mod:`.vim_inventory`); REST's leaves them None, and
    # the family and Tools state are then asked per VM when it is first opened.
    family: str | None = None
    tools_running: bool | None = None
    instance_uuid: str | None = None
    folder: str | None = None  # parent folder id


def _names(data: Any, what: str) -> list[str]:
    data = parse.unwrap_value(data)
    if not isinstance(data, list) or len(data) > _MAX_FOLDERS:
        raise ProtocolError(f"{what}: expected an array of folders")
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("folder"), str):
            raise ProtocolError(f"{what}: a folder entry without its id")
        out.append(item["folder"])
    return out


async def _folders(rest: RestTransport, params: list[tuple[str, str]], what: str) -> list[str]:
    query = urllib.parse.urlencode([("type", "VIRTUAL_MACHINE"), *params])
    data = await rest.api("folder.list", "GET", f"/api/vcenter/folder?{query}", desc=what)
    return _names(data, what)


async def folder_subtree(rest: RestTransport, path: str) -> list[str]:
    """The ids of folder ``path`` (``prod/web``: names from the top, ``/`` between them)
    and of every folder below it. NotFound when no folder has that path."""
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        raise NotFound(f"folder {path!r}: empty path")
    what = f"look up folder {path!r}"
    try:
        ids = await _folders(rest, [("names", parts[0])], what)
        for name in parts[1:]:
            if not ids:
                break
            ids = await _folders(
                rest, [("names", name), *(("parent_folders", i) for i in ids)], what
            )
    except NoSuchOperation as exc:
        raise NotFound(f"{what}: this vCenter has no folder API") from exc
    if not ids:
        raise NotFound(f"no VM folder {path!r} on this vCenter")
    found, frontier = list(ids), list(ids)
    while frontier and len(found) < _MAX_FOLDERS:
        frontier = [
            i
            for i in await _folders(rest, [("parent_folders", f) for f in frontier], what)
            if i not in found
        ]
        found += frontier
    return found


async def list_vms(
    rest: RestTransport, *, folders: Sequence[str] = (), powered_on: bool = True
) -> list[InventoryVm]:
    """Every VM (in ``folders`` when given, powered on when asked), as the server names
    them (guest-controlled text: the caller makes them safe).

    REST refuses a listing of more than 4000 VMs (``UNABLE_TO_ALLOCATE_RESOURCE``): the
    listing is then split by parent folder (every VM folder, when none was given), in
    halves until each part fits. Only a single folder holding more than 4000 VMs
    cannot be listed this way."""
    try:
        return await _list_once(rest, folders, powered_on)
    except ApiError as exc:
        if exc.type_name != _TOO_MANY:
            raise
        if not folders:
            folders = await _folders(rest, [], "list VM folders")
        if len(folders) <= 1:
            raise
    half = len(folders) // 2
    seen: dict[str, InventoryVm] = {}
    for part in (folders[:half], folders[half:]):
        for v in await list_vms(rest, folders=part, powered_on=powered_on):
            seen.setdefault(v.vm, v)
    return list(seen.values())


async def _list_once(
    rest: RestTransport, folders: Sequence[str], powered_on: bool
) -> list[InventoryVm]:
    params: list[tuple[str, str]] = [("folders", f) for f in folders]
    if powered_on:
        params.append(("power_states", PowerState.POWERED_ON.value))
    query = urllib.parse.urlencode(params)
    data = await rest.api(
        "vm.list", "GET", "/api/vcenter/vm" + (f"?{query}" if query else ""), desc="list VMs"
    )
    vms = parse.parse_vm_list(data)
    return [InventoryVm(v.vm, v.name, v.power_state) for v in vms]


async def running_family(rest: RestTransport, vm: str) -> str | None:
    """The family the guest identity reports (lower case): vCenter has one only while
    the VM runs VMware Tools, so an answer also says Tools is running. None when it has
    none (Tools not running, or an older vCenter)."""
    base = f"/api/vcenter/vm/{urllib.parse.quote(vm, safe='')}"
    try:
        data = parse.unwrap_value(
            await rest.api(
                "vm.identity",
                "GET",
                base + "/guest/identity",
                desc=f"guest identity of VM {vm}",
                retry=False,
            )
        )
    except (RemoteError, NoSuchOperation):
        return None
    family = data.get("family") if isinstance(data, dict) else None
    return family.lower() if isinstance(family, str) and family else None


async def family_of(rest: RestTransport, vm: str) -> str | None:
    """``"linux"`` or ``"windows"`` (or another family, lower case), None when vCenter
    cannot tell: from the guest identity, else the configured guest OS."""
    family = await running_family(rest, vm)
    if family is not None:
        return family
    # Tools not running, or an older vCenter: the configured OS may say
    return await configured_family(rest, vm)


async def configured_family(rest: RestTransport, vm: str) -> str | None:
    """``"linux"`` or ``"windows"`` from the VM's configured guest OS, None if unset."""
    base = f"/api/vcenter/vm/{urllib.parse.quote(vm, safe='')}"
    try:
        data = parse.unwrap_value(
            await rest.api("vm.get", "GET", base, desc=f"VM {vm}", retry=False)
        )
    except (RemoteError, NoSuchOperation):
        return None
    os_id = data.get("guest_OS") if isinstance(data, dict) else None
    if not isinstance(os_id, str) or not os_id:
        return None
    return "windows" if os_id.upper().startswith("WINDOWS") else "linux"

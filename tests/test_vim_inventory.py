"""The fleet inventory over vim25 (vcenter/vim_inventory.py): one container view read in
pages, against the simulator's vim25 service in process (5,000 VMs, no guest trees), and
against hostile answers."""

from __future__ import annotations

import errno
import types
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from guestfs_mount.config import CredentialRule
from guestfs_mount.credentials import FleetCredential
from guestfs_mount.errors import NotFound, ProtocolError
from guestfs_mount.fleet.options import FleetOptions
from guestfs_mount.fleet.serve import Inventory
from guestfs_mount.fleet.space import InodeSpace
from guestfs_mount.fleet.vm import FleetVm, VmUnavailable, _Failure
from guestfs_mount.model import CredentialType, GuestCredentials, PowerState
from guestfs_mount.sim import fleet
from guestfs_mount.sim.state import Folder, SimOptions, SimState, Vm
from guestfs_mount.sim.vcenter_app import build_vcenter_app
from guestfs_mount.sim.vim_app import VimOptions, wrap_vim
from guestfs_mount.vcenter import ClientConfig, VCenterClient
from guestfs_mount.vcenter.inventory import InventoryVm
from guestfs_mount.vcenter.vim_inventory import (
    family_of_listing,
    list_inventory,
    read_vm,
    select,
)

N = 5000  # more than REST's GET /api/vcenter/vm answers at once (4,000)
SEED = 3


def _state() -> SimState:
    vms = []
    for i, s in enumerate(fleet.specs(N, SEED)):
        shape = fleet.SHAPES[s.shape]
        vms.append(
            Vm(f"vm-{fleet.FIRST_ID + i}", s.name, b"/nonexistent", power_state=s.power_state,
               tools_running=s.tools_running, family=shape.family, guest_os=shape.guest_os,
               folder=fleet.FOLDER_OF_PATH[s.folder_path])
        )  # fmt: skip
    folders = [Folder(*f) for f in fleet.FOLDERS]
    return SimState(SimOptions(), {"admin": "pw"}, [], vms, folders=folders)


def _client(state: SimState, api: str) -> VCenterClient:
    app = wrap_vim(build_vcenter_app(state), state, VimOptions(), tls=False)
    cfg = ClientConfig(
        server="http://vc.test", allow_http=True, user="admin", password="pw", api=api,
        guest=GuestCredentials(CredentialType.USERNAME_PASSWORD, "root", "unused"),
    )  # fmt: skip
    return VCenterClient(cfg, transport=httpx.ASGITransport(app))


async def _listing(api: str, page_size: int) -> tuple[Any, dict[str, int]]:
    state = _state()
    async with _client(state, api) as client:
        t = await client.transport()
        listing = await list_inventory(t, page_size=page_size)  # type: ignore[arg-type]
    calls = {k.partition(".")[2]: v for k, v in state.stats.calls.items()}
    return listing, calls


@pytest.mark.parametrize("api", ["vi-json", "soap"])
async def test_five_thousand_vms_are_listed_in_pages_with_family_tools_and_folder(api):
    listing, calls = await _listing(api, page_size=500)
    specs = fleet.specs(N, SEED)
    by_id = {v.vm: v for v in listing.vms}
    assert len(by_id) == N
    # one view, one read continued until its end (5,000 VMs + 8 folders: 11 pages), the
    # view destroyed; no per-VM call
    assert calls["CreateContainerView"] == 1 and calls["DestroyView"] == 1
    assert calls["RetrievePropertiesEx"] == 1 and calls["ContinueRetrievePropertiesEx"] == 10
    for i, s in enumerate(specs):
        v = by_id[f"vm-{fleet.FIRST_ID + i}"]
        on = s.power_state == "POWERED_ON"
        assert v.name == s.name  # vim25's %2f / %5c / %25 escapes undone
        assert v.power_state is PowerState(s.power_state)
        assert v.family == ("windows" if fleet.SHAPES[s.shape].family == "WINDOWS" else "linux")
        assert v.tools_running is (s.tools_running and on)
        assert v.folder == fleet.FOLDER_OF_PATH[s.folder_path]
        assert v.instance_uuid is not None
    assert {"a/b", "nul\x00name", "back\\slash 100%", "esc\x1b[31mred"} <= {
        v.name for v in listing.vms
    }
    powered = select(listing)
    assert len(powered) == sum(s.power_state == "POWERED_ON" for s in specs)


async def test_folder_paths_resolve_from_the_listing_like_rest():
    listing, _ = await _listing("vi-json", page_size=1000)
    assert listing.folder_subtree("prod") == {"group-v101", "group-v102", "group-v103"}
    assert listing.folder_subtree("/dev/web/") == {"group-v105", "group-v106"}
    # the first name matches a folder of that name anywhere (REST's names= filter)
    assert listing.folder_subtree("web") == {"group-v102", "group-v105", "group-v106"}
    for missing in ("nope", "prod/nope", "", "/"):
        with pytest.raises(NotFound):
            listing.folder_subtree(missing)
    web = select(listing, folders=sorted(listing.folder_subtree("prod/web")), powered_on=False)
    expected = [s for s in fleet.specs(N, SEED) if s.folder_path == "prod/web"]
    assert len(web) == len(expected) > 1000


@pytest.mark.parametrize(
    ("family", "guest_id", "want"),
    [({"_typeName": "string", "_value": "linuxGuest"}, None, "linux"),
     ("windowsGuest", "ubuntu64Guest", "windows"), ("darwinGuestFamily", None, "darwin"),
     (None, "windows9Server64Guest", "windows"), (None, "rhel8_64Guest", "linux"),
     (None, None, None), ("bad family!", None, None), (7, {"x": 1}, None)],
)  # fmt: skip
def test_family_from_guest_family_else_configured_guest_id(family, guest_id, want):
    assert family_of_listing(family, guest_id) == want


class _Vm:
    """What the fleet's Inventory keeps of a VM (a FleetVm without its machinery)."""

    def __init__(self, vm: str, name: str, dirname: str) -> None:
        self.vm, self.name, self.dirname = vm, name, dirname
        self.seen: list[InventoryVm] = []

    def listed(self, v: InventoryVm) -> None:
        self.seen.append(v)


async def test_fleet_inventory_over_vim25_asks_rest_nothing_and_resolves_folders():
    state = _state()
    rule = CredentialRule("rule 1", "root", folder="dev/web")
    creds = GuestCredentials(CredentialType.USERNAME_PASSWORD, "root", "pw")
    opts = FleetOptions(folder="prod", credentials=(FleetCredential(rule, creds),))
    async with _client(state, "soap") as client:
        inv = Inventory(client, opts)
        inv.make_vm = _Vm  # type: ignore[assignment]
        await inv.refresh()
    specs = fleet.specs(N, SEED)
    want = {f"vm-{fleet.FIRST_ID + i}" for i, s in enumerate(specs)
            if s.folder_path.startswith("prod") and s.power_state == "POWERED_ON"}  # fmt: skip
    shown = inv.all_current()
    assert {v.vm for v in shown} == want and inv.source == "vim25"
    # every shown VM got its listing entry: family and Tools state for its first open
    assert all(v.seen and v.seen[-1].tools_running is not None for v in shown)  # type: ignore[attr-defined]
    in_rule = {f"vm-{fleet.FIRST_ID + i}" for i, s in enumerate(specs)
               if s.folder_path.startswith("dev/web")}  # fmt: skip
    assert all(inv.in_folder(vm, "dev/web") for vm in in_rule)
    assert not any(inv.in_folder(vm, "dev/web") for vm in want)
    rest = {k: v for k, v in state.stats.calls.items() if v and "." in k and
            not k.startswith(("soap.", "vi-json."))}  # fmt: skip
    assert rest == {}  # no REST listing, folder or identity call
    assert state.stats.calls["soap.RetrievePropertiesEx"] == 1  # the rule's folder too


# ---- hostile servers -----------------------------------------------------------------------
def _moref(t: str, v: str) -> dict[str, str]:
    return {"_typeName": "ManagedObjectReference", "type": t, "value": v}


def _vm_object(i: int) -> dict[str, Any]:
    return {
        "obj": _moref("VirtualMachine", f"vm-{i}"),
        "propSet": [{"name": "name", "val": f"vm {i}"},
                    {"name": "runtime.powerState", "val": "poweredOn"},
                    {"name": "guest.toolsRunningStatus", "val": "guestToolsRunning"}],
    }  # fmt: skip


class Hostile:
    """A vim25 transport whose property collector answers ``pages`` (called per page)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.calls: list[str] = []

    async def service_content(self) -> Any:
        return {k: _moref(t, k) for k, t in (("rootFolder", "Folder"),
                ("viewManager", "ViewManager"), ("propertyCollector", "PropertyCollector"))}  # fmt: skip

    async def vim_call(
        self, method: str, this: Mapping[str, str], args: Mapping[str, Any], *, desc: str
    ) -> Any:
        self.calls.append(method)
        if method == "CreateContainerView":
            return _moref("ContainerView", "session[5f0c]52a1")
        if method in ("RetrievePropertiesEx", "ContinueRetrievePropertiesEx"):
            return self.page(len(self.calls))
        return None


async def test_an_endless_token_is_a_protocol_error_after_bounded_pages():
    t = Hostile(lambda n: {"token": "again", "objects": [_vm_object(n)]})
    with pytest.raises(ProtocolError, match="pages"):
        await list_inventory(t, page_size=100, max_objects=1000)
    pages = t.calls.count("ContinueRetrievePropertiesEx") + 1
    assert pages == 4 * 10 + 16  # bounded by the object cap, not by the server
    assert t.calls[-2:] == ["CancelRetrievePropertiesEx", "DestroyView"]  # cleaned up


async def test_an_absurd_object_count_is_refused():
    t = Hostile(lambda n: {"token": "more", "objects": [_vm_object(i) for i in range(600)]})
    with pytest.raises(ProtocolError, match="more than 1000 objects"):
        await list_inventory(t, page_size=1000, max_objects=1000)
    assert t.calls.count("ContinueRetrievePropertiesEx") == 1  # the second page broke it
    assert t.calls[-1] == "DestroyView"


async def test_unusable_objects_are_skipped_and_the_rest_listed():
    objects = [
        _vm_object(1),
        {"obj": _moref("VirtualMachine", "vm 2/../x"), "propSet": []},  # bad id
        {"obj": _moref("VirtualMachine", "vm-3"), "propSet": [{"name": "name", "val": ""}]},
        {"obj": "not a moref"},
        7,
        {"obj": _moref("Folder", "f-1"), "propSet": [{"name": "name", "val": "a%2fb"}]},
    ]
    listing = await list_inventory(Hostile(lambda n: {"objects": objects}))
    assert [(v.vm, v.name, v.tools_running) for v in listing.vms] == [("vm-1", "vm 1", True)]
    assert listing.folders == {"f-1": ("a/b", None)}
    with pytest.raises(ProtocolError):
        await list_inventory(Hostile(lambda n: {"objects": "many"}))
    with pytest.raises(ProtocolError, match="token"):
        await list_inventory(Hostile(lambda n: {"objects": [], "token": "x" * 5000}))


@pytest.mark.parametrize("api", ["vi-json", "soap"])
async def test_one_vm_is_read_again_with_its_current_state(api):
    state = _state()
    vm = state.vms["vm-1005"]  # the fleet's "no-tools"
    async with _client(state, api) as client:
        t = await client.transport()
        before = await read_vm(t, "vm-1005")  # type: ignore[arg-type]
        vm.tools_running = True  # Tools started after the listing
        after = await read_vm(t, "vm-1005")  # type: ignore[arg-type]
    assert before is not None and after is not None
    assert (before.name, before.tools_running, after.tools_running) == ("no-tools", False, True)
    assert state.stats.calls[f"{api}.RetrievePropertiesEx"] == 2  # one call each, no view
    assert state.stats.calls[f"{api}.CreateContainerView"] == 0


async def test_a_vm_the_listing_said_was_down_is_read_again_on_retry():
    state = _state()
    async with _client(state, "vi-json") as client:
        ctx = types.SimpleNamespace(client=client, options=FleetOptions(), space=InodeSpace())
        vm = FleetVm(ctx, "vm-1005", "no-tools", "no-tools")  # type: ignore[arg-type]
        stale = await read_vm(await client.transport(), "vm-1005")  # type: ignore[arg-type]
        assert stale is not None and not stale.tools_running
        vm.listed(stale)
        state.vms["vm-1005"].tools_running = True  # started since the listing
        with pytest.raises(VmUnavailable, match="Tools is not running"):
            await vm._open()  # first open: the listing's word, no call
        calls = state.stats.calls["vi-json.RetrievePropertiesEx"]
        vm.failure = _Failure(VmUnavailable("earlier", errno.EHOSTDOWN), 0.0)  # a retry
        with pytest.raises(VmUnavailable, match="no \\[\\[guest_credentials\\]\\] rule"):
            await vm._open()  # past the Tools check: on to the credential rules
        assert state.stats.calls["vi-json.RetrievePropertiesEx"] == calls + 1

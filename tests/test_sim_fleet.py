"""guestfs-sim --fleet: the generated inventory, its trees and accounts, the REST inventory
APIs (VM filters, the 4,000-result limit, folders, guest OS family) and vim25 inventory
paging over VI/JSON. The pyvmomi walk of the same inventory is in test_sim_contract.py."""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guestfs_mount.sim import fleet
from guestfs_mount.sim.state import GuestAccount, SimOptions, SimState, Vm
from guestfs_mount.sim.testing import ApiClient, Sim, SimulatorError, run_simulator
from guestfs_mount.sim.vapi import VapiError

N = 60
HOSTILE = {
    "a/b",
    "nul\x00name",
    ".",
    "..",
    "long-" + "x" * 295,
    "esc\x1b[31mred",
    "back\\slash 100%",
}


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    with run_simulator("--no-tls", "--fleet", str(N), "--fleet-seed", "3") as s:
        yield s


@pytest.fixture
def api(sim: Sim) -> Iterator[ApiClient]:
    with ApiClient(sim) as c:
        c.login()
        yield c


def by_name(sim: Sim, name: str) -> dict[str, Any]:
    return next(v for v in sim.vms if v["name"] == name)


def account(sim: Sim, key: str) -> dict[str, Any]:
    return next(a for a in sim.fleet["accounts"] if a["key"] == key)


def creds(user: str, password: str) -> dict[str, Any]:
    return {
        "interactive_session": False,
        "type": "USERNAME_PASSWORD",
        "user_name": user,
        "password": password,
    }


def names(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [v["name"] for v in resp.json()]


# ---- generation --------------------------------------------------------------------------
def test_generation_is_a_function_of_count_and_seed() -> None:
    assert fleet.specs(300, 7) == fleet.specs(300, 7)
    assert fleet.specs(300, 7) != fleet.specs(300, 8)
    # the specials come first whatever the seed; a smaller fleet is a prefix of a larger one
    assert fleet.specs(300, 8)[: len(fleet.SPECIALS)] == list(fleet.SPECIALS)
    assert fleet.specs(100, 7) == fleet.specs(300, 7)[:100]
    assert [s.name for s in fleet.specs(5, 1)] == [s.name for s in fleet.SPECIALS[:5]]


def test_generated_mix_of_states_shapes_and_accounts() -> None:
    specs = fleet.specs(500, 0)
    power = collections.Counter(s.power_state for s in specs)
    assert power["POWERED_OFF"] > 10 and power["SUSPENDED"] > 2 and power["POWERED_ON"] > 400
    assert sum(not s.tools_running for s in specs) > 5
    families = collections.Counter(fleet.SHAPES[s.shape].family for s in specs)
    assert families["WINDOWS"] > 50 and families["POSIX"] > 300
    assert {s.account for s in specs} == set(fleet.ACCOUNT_USERS)
    assert sum(s.compromised for s in specs) > 3
    # generated names are unique; the specials' "dup" is the one duplicate name
    dupes = [n for n, c in collections.Counter(s.name for s in specs).items() if c > 1]
    assert dupes == ["dup"]


def test_trees_share_content_and_differ_where_it_matters(tmp_path: Path) -> None:
    f = fleet.build_fleet(40, 0, str(tmp_path), GuestAccount("root", "pw"))
    vms = {v.name: v for v in f.vms if v.name != "dup"}

    def path(name: str, rel: str) -> str:
        return os.path.join(os.fsdecode(vms[name].root), rel)

    # one copy of the data on disk, one /etc/hostname per VM
    a, b = os.stat(path(".", "usr/sbin/sshd")), os.stat(path("a/b", "usr/sbin/sshd"))
    assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)
    assert Path(path("web-01", "etc/hostname")).read_text() == "vm-1000\n"
    assert Path(path("a/b", "etc/hostname")).read_text() == "vm-1010\n"
    bad = path("web-compromised", "")
    assert fleet.ATTACKER_KEY in Path(bad, "root/.ssh/authorized_keys").read_text()
    assert Path(bad, "etc/cron.d/sysupdate").read_text() == fleet.ATTACKER_CRON
    assert not os.path.exists(path("web-01", "etc/cron.d/sysupdate"))
    assert os.stat(path("web-01", "root/.ssh")).st_mode & 0o777 == 0o700
    # sha256sum /mnt/vc/*/usr/sbin/sshd | uniq -c: a few groups, the backdoor alone
    sums = collections.Counter(
        hashlib.sha256(Path(v.root.decode(), "usr/sbin/sshd").read_bytes()).hexdigest()
        for v in f.vms
        if v.family == "POSIX"
    )
    backdoor = hashlib.sha256(fleet.sshd_binary(fleet.SSHD_BACKDOOR)).hexdigest()
    assert len(sums) == 3 and 1 <= sums[backdoor] < 5
    win = vms["win-dc-01"]
    assert set(win.drives) == {"C", "D"}
    assert Path(os.fsdecode(win.drives["D"]), "data/report.csv").exists()


def test_more_than_4000_vms_is_refused() -> None:
    root = os.fsencode(os.getcwd())
    vms = [Vm(f"vm-{i}", f"n{i}", root) for i in range(4001)]
    state = SimState(SimOptions(), {}, [], vms)
    with pytest.raises(VapiError) as err:
        state.list_vms(set(), set(), set(), set())
    assert err.value.error_type == "UNABLE_TO_ALLOCATE_RESOURCE" and err.value.status == 500
    assert [v.vm for v in state.list_vms({"n7"}, set(), set(), set())] == ["vm-7"]
    del state.vms["vm-0"]
    assert len(state.list_vms(set(), set(), set(), set())) == 4000


def test_bad_fleet_size_is_a_usage_error() -> None:
    with (
        pytest.raises(SimulatorError, match="--fleet must be >= 0"),
        run_simulator("--no-tls", "--fleet", "-1"),
    ):
        pass


# ---- REST inventory ---------------------------------------------------------------------
def test_ready_info_describes_the_fleet(sim: Sim) -> None:
    assert sim.fleet["count"] == N and sim.fleet["seed"] == 3
    assert [v["vm"] for v in sim.vms] == [f"vm-{1000 + i}" for i in range(N)]
    web = by_name(sim, "web-01")
    assert (web["folder"], web["folder_path"]) == ("group-v102", "prod/web")
    assert by_name(sim, "rotated-root")["folder_path"] == "dev/web/sandbox"
    assert by_name(sim, "old-build")["power_state"] == "POWERED_OFF"
    assert by_name(sim, "no-tools")["tools_running"] is False
    default = account(sim, "default")
    assert (default["user"], default["password"]) == (sim.guest_user, sim.guest_password)
    assert "vm-1001" in account(sim, "ops")["vms"]
    assert account(sim, "rotated")["vms"] == ["vm-1017"]


def test_vm_list_serves_hostile_names_raw(api: ApiClient) -> None:
    listed = names(api.get("/api/vcenter/vm"))
    assert len(listed) == N
    assert set(listed) >= HOSTILE
    assert listed.count("dup") == 3


def test_vm_list_filters(api: ApiClient, sim: Sim) -> None:
    get = api.get
    assert names(get("/api/vcenter/vm", params={"names": ["dup", "web-01"]})) == [
        "web-01",
        "dup",
        "dup",
        "dup",
    ]
    assert names(get("/api/vcenter/vm", params={"vms": ["vm-1011"]})) == ["nul\x00name"]
    off = names(get("/api/vcenter/vm", params={"power_states": "POWERED_OFF"}))
    assert "old-build" in off and "web-01" not in off
    suspended = names(get("/api/vcenter/vm", params={"power_states": "SUSPENDED"}))
    assert "suspended-vm" in suspended
    # folders: the VM's own folder, not its ancestors
    in_web = names(get("/api/vcenter/vm", params={"folders": "group-v102"}))
    assert {"web-01", "web-compromised", "dup"} <= set(in_web)
    expected = {v["name"] for v in sim.vms if v["folder"] == "group-v102"}
    assert set(in_web) == expected
    assert "web-01" not in names(get("/api/vcenter/vm", params={"folders": "group-v101"}))
    root = names(get("/api/vcenter/vm", params={"folders": "group-v3"}))
    assert {"a/b", ".", ".."} <= set(root)
    assert names(get("/api/vcenter/vm", params={"folders": "group-v999"})) == []
    both = get("/api/vcenter/vm", params={"folders": "group-v102", "names": "dup"})
    assert [v["vm"] for v in both.json()] == ["vm-1007"]
    bad = get("/api/vcenter/vm", params={"power_states": "ON"})
    assert bad.status_code == 400 and bad.json()["error_type"] == "INVALID_ARGUMENT"


def test_vm_list_limit_over_http() -> None:
    with (
        run_simulator("--no-tls", "--fleet", "30", "--vm-list-limit", "25") as sim,
        ApiClient(sim) as api,
    ):
        api.login()
        resp = api.get("/api/vcenter/vm")
        assert resp.status_code == 500
        assert resp.json()["error_type"] == "UNABLE_TO_ALLOCATE_RESOURCE"
        # a narrower filter gets under the limit: what a client falls back to
        assert len(names(api.get("/api/vcenter/vm", params={"folders": "group-v3"}))) < 25


def test_folder_list(api: ApiClient) -> None:
    resp = api.get("/api/vcenter/folder", params={"type": "VIRTUAL_MACHINE"})
    assert resp.status_code == 200
    folders = {f["folder"]: f["name"] for f in resp.json()}
    assert folders == {
        "group-v3": "vm",
        **{fid: name for fid, name, _p in fleet.FOLDERS},
    }
    assert all(f["type"] == "VIRTUAL_MACHINE" for f in resp.json())
    sub = api.get("/api/vcenter/folder", params={"parent_folders": "group-v104"}).json()
    assert sub == [{"folder": "group-v105", "name": "web", "type": "VIRTUAL_MACHINE"}]
    webs = api.get("/api/vcenter/folder", params={"names": "web"}).json()
    assert [f["folder"] for f in webs] == ["group-v102", "group-v105"]
    assert api.get("/api/vcenter/folder", params={"type": "HOST"}).json() == []
    bad = api.get("/api/vcenter/folder", params={"type": "NOPE"})
    assert bad.status_code == 400


def test_vm_info_and_guest_family(api: ApiClient, sim: Sim) -> None:
    info = api.get("/api/vcenter/vm/vm-1002").json()
    assert info["name"] == "win-dc-01" and info["guest_OS"].startswith("WINDOWS")
    assert info["identity"]["instance_uuid"] == by_name(sim, "win-dc-01")["instance_uuid"]
    uuids = {
        api.get(f"/api/vcenter/vm/vm-{1000 + i}").json()["identity"]["instance_uuid"]
        for i in range(10)
    }
    assert len(uuids) == 10
    assert api.get("/api/vcenter/vm/vm-1002/guest/identity").json()["family"] == "WINDOWS"
    assert api.get("/api/vcenter/vm/vm-1000/guest/identity").json()["family"] == "LINUX"
    down = api.get("/api/vcenter/vm/vm-1005/guest/identity")
    assert down.status_code == 503 and down.json()["error_type"] == "SERVICE_UNAVAILABLE"
    assert api.get("/api/vcenter/vm/vm-1004/guest/identity").status_code == 503
    assert api.get("/api/vcenter/vm/vm-9").status_code == 404


# ---- guest accounts and trees through the API ------------------------------------------
def test_per_vm_guest_accounts(api: ApiClient, sim: Sim) -> None:
    default = creds(sim.guest_user, sim.guest_password)
    cases = [
        ("vm-1000", "/etc", default, 200),
        ("vm-1001", "/etc", default, 401),  # db-01 only knows ops
        ("vm-1017", "/etc", default, 401),  # rotated-root: same user, other password
        ("vm-1002", "C:\\", default, 401),
    ]
    for key, vm, path in [
        ("ops", "vm-1001", "/etc"),
        ("rotated", "vm-1017", "/etc"),
        ("admin", "vm-1002", "D:\\"),
        ("corp", "vm-1019", "C:\\"),
    ]:
        acc = account(sim, key)
        cases.append((vm, path, creds(acc["user"], acc["password"]), 200))
        # an account of one VM is no good on another
        cases.append(("vm-1000", "/etc", creds(acc["user"], acc["password"]), 401))
    for vm, path, cred, status in cases:
        resp = api.post(
            f"/api/vcenter/vm/{vm}/guest/filesystem/files?action=list",
            {"credentials": cred, "path": path},
        )
        assert resp.status_code == status, (vm, cred["user_name"], resp.text)
    assert account(sim, "corp")["user"] == "CORP\\forensic"


def test_each_vm_serves_its_own_tree(api: ApiClient, sim: Sim) -> None:
    cred = sim.guest_credentials()
    for vm in ("vm-1000", "vm-1010", "vm-1011"):
        body = api.download("/etc/hostname", vm=vm, credentials=cred)
        assert body == f"{vm}\n".encode()


def test_untouched_vms_are_not_in_the_stats(api: ApiClient, sim: Sim) -> None:
    sim.reset_stats()
    api.get("/api/vcenter/vm")
    api.get("/api/vcenter/folder")
    api.get("/api/vcenter/vm/vm-1000")
    api.get("/api/vcenter/vm/vm-1000/guest/identity")
    stats = sim.stats()
    assert stats["vms"] == {}
    assert stats["calls"]["vm.list"] == 1 and stats["calls"]["folder.list"] == 1
    api.list("/etc", vm="vm-1003")
    assert list(sim.stats()["vms"]) == ["vm-1003"]


def test_inventory_changes_at_run_time(sim: Sim, api: ApiClient) -> None:
    """What an inventory-refresh test needs: VMs appear, are renamed, vanish."""
    added = sim.add_vm("vm-1000", "late-web", folder="group-v104")
    new = added["vm"]
    assert new == f"vm-{1000 + N}" and added["folder"] == "group-v104"
    try:
        in_dev = api.get("/api/vcenter/vm", params={"folders": "group-v104"})
        assert "late-web" in names(in_dev)
        # it serves web-01's tree with web-01's accounts
        assert api.download("/etc/hostname", vm=new) == b"vm-1000\n"
        sim.rename_vm(new, "late-web-renamed")
        assert names(api.get("/api/vcenter/vm", params={"vms": new})) == ["late-web-renamed"]
        url = api.transfer_url("/etc/passwd", vm=new)
    finally:
        sim.remove_vm(new)
    assert names(api.get("/api/vcenter/vm", params={"vms": new})) == []
    assert api.list("/etc", vm=new).status_code == 404
    with httpx.Client(timeout=30) as c:
        assert c.get(url).status_code == 404  # its transfer URLs died with it
    with pytest.raises(SimulatorError):
        sim.add_vm("vm-9999", "x")
    with pytest.raises(SimulatorError):
        sim.add_vm("vm-1000", "x", folder="group-v999")


# ---- vim25 inventory over VI/JSON ------------------------------------------------------
class ViJson:
    def __init__(self, sim: Sim) -> None:
        self.base = f"{sim.vcenter_url}/sdk/vim25/8.0.3.0"
        self.http = httpx.Client(timeout=30)
        resp = self.call(
            "SessionManager", "SessionManager", "Login",
            {"userName": sim.user, "password": sim.password},
        )  # fmt: skip
        self.http.headers["vmware-api-session-id"] = resp.headers["vmware-api-session-id"]

    def call(self, mo_type: str, moid: str, method: str, body: Any = None) -> httpx.Response:
        return self.http.post(f"{self.base}/{mo_type}/{moid}/{method}", json=body or {})

    def ok(self, mo_type: str, moid: str, method: str, body: Any = None) -> Any:
        resp = self.call(mo_type, moid, method, body)
        assert resp.status_code in (200, 204), resp.text
        return resp.json() if resp.status_code == 200 else None


def moref(t: str, v: str) -> dict[str, str]:
    return {"_typeName": "ManagedObjectReference", "type": t, "value": v}


PROPS = [
    "name",
    "runtime.powerState",
    "guest.toolsRunningStatus",
    "guest.guestFamily",
    "config.instanceUuid",
    "parent",
]


def test_vi_json_container_view_pages(sim: Sim) -> None:
    vj = ViJson(sim)
    view = vj.ok(
        "ViewManager", "ViewManager", "CreateContainerView",
        {"container": moref("Folder", "group-d1"), "type": ["VirtualMachine"], "recursive": True},
    )  # fmt: skip
    spec = {
        "specSet": [
            {
                "propSet": [{"type": "VirtualMachine", "pathSet": PROPS}],
                "objectSet": [
                    {
                        "obj": view,
                        "skip": True,
                        "selectSet": [
                            {"_typeName": "TraversalSpec", "name": "v", "type": "ContainerView",
                             "path": "view", "skip": False}
                        ],
                    }
                ],
            }
        ],
        "options": {"maxObjects": 25},
    }  # fmt: skip
    result = vj.ok("PropertyCollector", "propertyCollector", "RetrievePropertiesEx", spec)
    pages = [result]
    while "token" in result:
        result = vj.ok(
            "PropertyCollector", "propertyCollector", "ContinueRetrievePropertiesEx",
            {"token": result["token"]},
        )  # fmt: skip
        pages.append(result)
    assert [len(p["objects"]) for p in pages] == [25, 25, 10]
    objs = {
        o["obj"]["value"]: {p["name"]: p["val"] for p in o["propSet"]}
        for p in pages
        for o in p["objects"]
    }
    assert set(objs) == {v["vm"] for v in sim.vms}
    assert objs["vm-1010"]["name"]["_value"] == "a%2fb"
    assert objs["vm-1011"]["name"]["_value"] == "nul%00name"
    assert objs["vm-1016"]["name"]["_value"] == "back%5cslash 100%25"
    assert objs["vm-1002"]["guest.guestFamily"]["_value"] == "windowsGuest"
    assert objs["vm-1005"]["guest.toolsRunningStatus"]["_value"] == "guestToolsNotRunning"
    assert objs["vm-1004"]["runtime.powerState"]["_value"] == "poweredOff"
    assert objs["vm-1000"]["parent"] == moref("Folder", "group-v102")
    assert objs["vm-1010"]["parent"] == moref("Folder", "group-v3")
    api_uuid = by_name(sim, "web-01")["instance_uuid"]
    assert objs["vm-1000"]["config.instanceUuid"]["_value"] == api_uuid
    # a finished token is gone
    gone = vj.call(
        "PropertyCollector", "propertyCollector", "ContinueRetrievePropertiesEx",
        {"token": pages[0]["token"]},
    )  # fmt: skip
    assert gone.status_code == 500 and gone.json()["_typeName"] == "InvalidArgument"
    # Cancel drops the rest of a result
    first = vj.ok(
        "PropertyCollector", "propertyCollector", "RetrievePropertiesEx",
        {**spec, "options": {"maxObjects": 5}},
    )  # fmt: skip
    assert len(first["objects"]) == 5
    vj.ok("PropertyCollector", "propertyCollector", "CancelRetrievePropertiesEx",
          {"token": first["token"]})  # fmt: skip
    again = vj.call(
        "PropertyCollector", "propertyCollector", "ContinueRetrievePropertiesEx",
        {"token": first["token"]},
    )  # fmt: skip
    assert again.status_code == 500 and again.json()["_typeName"] == "InvalidArgument"
    # a view of one folder, not recursive, holds that folder's VMs only
    sub = vj.ok(
        "ViewManager", "ViewManager", "CreateContainerView",
        {"container": moref("Folder", "group-v104"), "type": ["VirtualMachine"],
         "recursive": False},
    )  # fmt: skip
    held = vj.http.get(f"{vj.base}/ContainerView/{sub['value']}/view").json()
    expected = {v["vm"] for v in sim.vms if v["folder"] == "group-v104"}
    assert {m["value"] for m in held} == expected
    vj.ok("ContainerView", sub["value"], "DestroyView")
    assert vj.http.get(f"{vj.base}/ContainerView/{sub['value']}/view").status_code == 500


def test_vi_json_folder_tree(sim: Sim) -> None:
    vj = ViJson(sim)
    get = vj.http.get
    assert get(f"{vj.base}/Folder/group-v106/name").json() == "sandbox"
    assert get(f"{vj.base}/Folder/group-v106/parent").json() == moref("Folder", "group-v105")
    assert get(f"{vj.base}/Folder/group-v101/parent").json() == moref("Folder", "group-v3")
    children = {m["value"] for m in get(f"{vj.base}/Folder/group-v101/childEntity").json()}
    assert {"group-v102", "group-v103", "vm-1018"} <= children
    found = vj.ok(
        "SearchIndex", "SearchIndex", "FindByInventoryPath",
        {"inventoryPath": "Datacenter/vm/dev/web/sandbox/rotated-root"},
    )  # fmt: skip
    assert found == moref("VirtualMachine", "vm-1017")
    found = vj.ok(
        "SearchIndex", "SearchIndex", "FindByInventoryPath",
        {"inventoryPath": "Datacenter/vm/a%2fb"},
    )  # fmt: skip
    assert found == moref("VirtualMachine", "vm-1010")


# ---- per-VM faults -----------------------------------------------------------------------
def test_a_vm_of_its_own_stalls_alone(sim: Sim) -> None:
    """``/_sim/vms/{vm}/faults``: one VM's guest calls stall, the others answer."""
    done: list[int] = []

    def stalled_list() -> None:
        with ApiClient(sim) as c:
            c.login()
            done.append(c.list("/etc", vm="vm-1000").status_code)

    sim.vm_faults("vm-1000", stall_api=True)
    try:
        assert sim.vm_faults("vm-1000")["stall_api"] is True
        assert sim.faults()["stall_api"] is False  # the global faults are untouched
        t = threading.Thread(target=stalled_list, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while sim.vm_faults("vm-1000")["held"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.vm_faults("vm-1000")["held"] == 1
        with ApiClient(sim) as c:
            c.login()
            for _ in range(3):
                assert c.list("/etc", vm="vm-1003").status_code == 200
            assert c.download("/etc/hostname", vm="vm-1003") == b"vm-1003\n"
        assert t.is_alive() and done == []  # vm-1000's call is still held
    finally:
        sim.reset_faults()  # the global reset clears every VM's own faults too
    t.join(30)
    assert done == [200]
    assert sim.vm_faults("vm-1000")["stall_api"] is False


def test_per_vm_counted_faults_and_validation(sim: Sim, api: ApiClient) -> None:
    sim.vm_faults("vm-1000", busy_next=1)
    try:
        assert api.list("/etc", vm="vm-1003").status_code == 200  # not consumed by another VM
        busy = api.list("/etc", vm="vm-1000")
        assert busy.status_code == 500 and "RESOURCE_BUSY" in busy.text
        assert api.list("/etc", vm="vm-1000").status_code == 200
        for bad in ({"truncate": {"bytes": 1}}, {"stall_api": 1}, [1]):
            with pytest.raises(SimulatorError):
                sim.admin("POST", "vms/vm-1000/faults", bad)  # type: ignore[arg-type]
        with pytest.raises(SimulatorError):
            sim.vm_faults("vm-9999", stall_api=True)
        sim.vm_faults("vm-1000", api_latency=0.01)
        reset = sim.admin("POST", "vms/vm-1000/faults/reset")
        assert reset == {
            "api_latency": 0.0, "stall_api": False, "busy_next": 0, "unavailable_next": 0,
            "held": 0,
        }  # fmt: skip
    finally:
        sim.reset_faults()

"""guestfs-sim's SOAP endpoint (``POST /sdk``, urn:vim25) with pyvmomi, VMware's own SOAP
client, as the independent judge of the wire format; ``--as-esxi``; the endpoint switches;
and hostile requests against the simulator's XML parser."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guestfs_mount.sim.testing import Sim, esx_url, run_simulator

pyVim_connect = pytest.importorskip("pyVim.connect")
pyVmomi = pytest.importorskip("pyVmomi")
vim = pyVmomi.vim

ODD_NAME = "<a&b>\"'.txt"


def build_tree(base: Path) -> Path:
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    os.chmod(root / "etc/hosts", 0o640)
    many = root / "many"
    many.mkdir()
    for i in range(75):
        (many / f"f-{i:03d}").write_text("x" * i)
    (root / ODD_NAME).write_text("odd\n")
    (root / "ctl\x01name").write_text("control character\n")
    os.symlink("etc/hosts", root / "rel")
    return root


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    root = build_tree(tmp_path_factory.mktemp("vimsoap"))
    with run_simulator("--root", str(root), "--vm-name", "web01") as s:
        yield s


def connect(sim: Sim, password: str | None = None) -> Any:
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    port = int(httpx.URL(sim.vcenter_url).port or 443)
    return pyVim_connect.SmartConnect(
        host="127.0.0.1",
        port=port,
        user=sim.user,
        pwd=sim.password if password is None else password,
        sslContext=ctx,
    )


@pytest.fixture
def si(sim: Sim) -> Iterator[Any]:
    sim.reset_faults()
    si = connect(sim)
    yield si
    pyVim_connect.Disconnect(si)


def auth(sim: Sim, password: str | None = None) -> Any:
    return vim.vm.guest.NamePasswordAuthentication(
        username=sim.guest_user,
        password=sim.guest_password if password is None else password,
        interactiveSession=False,
    )


def find_vm(si: Any, dc: str = "Datacenter", name: str = "web01") -> Any:
    return si.content.searchIndex.FindByInventoryPath(f"{dc}/vm/{name}")


def test_login_find_vm_and_managers(sim: Sim, si: Any) -> None:
    content = si.RetrieveContent()
    assert content.about.apiType == "VirtualCenter"
    vm = find_vm(si)
    assert vm._moId == sim.vm_id()  # the same id as /api/vcenter/vm
    assert vm.name == "web01"
    assert vm.runtime.powerState == "poweredOn"
    assert vm.guest.toolsRunningStatus == "guestToolsRunning"
    assert find_vm(si, name="nope") is None
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    assert [v.name for v in view.view] == ["web01"]
    gom = content.guestOperationsManager
    assert gom._moId == "guestOperationsManager"
    assert gom.fileManager._moId == "guestOperationsFileManager"
    assert gom.authManager._moId == "guestOperationsAuthManager"


def test_bad_vcenter_password(sim: Sim) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        connect(sim, password="wrong")


def test_list_pages_with_attributes(sim: Sim, si: Any) -> None:
    vm = find_vm(si)
    fm = si.content.guestOperationsManager.fileManager
    names: list[str] = []
    index = 0
    while True:
        page = fm.ListFilesInGuest(vm, auth(sim), "/many", index, 30)
        assert len(page.files) <= 30
        names += [f.path for f in page.files]
        index += len(page.files)
        assert page.remaining == 77 - index
        if not page.remaining:
            break
    assert names[:2] == [".", ".."]
    assert sorted(names[2:]) == sorted(os.listdir(Path(sim.root()) / "many"))
    top = {f.path: f for f in fm.ListFilesInGuest(vm, auth(sim), "/", 0, 100).files}
    hosts = os.stat(Path(sim.root()) / "etc/hosts")
    rel = top["rel"]
    assert rel.type == "symlink" and rel.size == 0
    assert isinstance(rel.attributes, vim.vm.guest.FileManager.PosixFileAttributes)
    assert rel.attributes.symlinkTarget == "etc/hosts"
    assert rel.attributes.permissions == hosts.st_mode
    assert rel.attributes.ownerId == hosts.st_uid
    assert int(rel.attributes.modificationTime.timestamp()) == int(hosts.st_mtime)
    assert top[ODD_NAME].size == 4  # escaped by the serialiser, intact for the client
    assert not any(n.startswith("ctl") for n in top)  # XML 1.0 cannot carry \x01: left out
    logs = fm.ListFilesInGuest(vm, auth(sim), "/many", matchPattern=r"^f-07[0-4]$")
    assert [f.path for f in logs.files] == [f"f-07{i}" for i in range(5)]
    with pytest.raises(vmodl_fault("InvalidArgument")):
        fm.ListFilesInGuest(vm, auth(sim), "/many", matchPattern="(")


def vmodl_fault(name: str) -> Any:
    return getattr(pyVmomi.vmodl.fault, name)


def test_initiate_then_get(sim: Sim, si: Any) -> None:
    vm = find_vm(si)
    fm = si.content.guestOperationsManager.fileManager
    info = fm.InitiateFileTransferFromGuest(vm, auth(sim), "/etc/hosts")
    assert info.size == len("127.0.0.1 localhost\n")
    assert info.attributes.permissions == 0o100640
    with httpx.Client(verify=sim.esx_verify(), timeout=30) as h:
        r = h.get(esx_url(sim, info.url))
        assert r.status_code == 200 and r.content == b"127.0.0.1 localhost\n"
        assert h.get(esx_url(sim, info.url)).status_code == 404


def test_faults(sim: Sim, si: Any) -> None:
    vm = find_vm(si)
    gom = si.content.guestOperationsManager
    fm = gom.fileManager
    gom.authManager.ValidateCredentialsInGuest(vm, auth(sim))
    with pytest.raises(vim.fault.InvalidGuestLogin):
        gom.authManager.ValidateCredentialsInGuest(vm, auth(sim, "wrong"))
    with pytest.raises(vim.fault.InvalidGuestLogin):
        fm.ListFilesInGuest(vm, auth(sim, "wrong"), "/")
    with pytest.raises(vim.fault.FileNotFound) as missing:
        fm.InitiateFileTransferFromGuest(vm, auth(sim), "/nope")
    assert missing.value.file == "/nope"
    with pytest.raises(vim.fault.NotAFile) as directory:
        fm.InitiateFileTransferFromGuest(vm, auth(sim), "/etc")
    assert directory.value.file == "/etc"
    with pytest.raises(vim.fault.FileNotFound):
        fm.ListFilesInGuest(vm, auth(sim), "/nope")
    try:
        sim.tools(sim.vm_id(), False)
        with pytest.raises(vim.fault.GuestOperationsUnavailable):
            fm.ListFilesInGuest(vm, auth(sim), "/")
        sim.tools(sim.vm_id(), True)
        sim.power(sim.vm_id(), "SUSPENDED")
        with pytest.raises(vim.fault.InvalidPowerState) as off:
            fm.InitiateFileTransferFromGuest(vm, auth(sim), "/etc/hosts")
        assert off.value.existingState == "suspended"
    finally:
        sim.tools(sim.vm_id(), True)
        sim.power(sim.vm_id(), "POWERED_ON")
    sim.faults(busy_next=1)
    with pytest.raises(vim.fault.InvalidState):
        fm.ListFilesInGuest(vm, auth(sim), "/")
    gone = vim.VirtualMachine("vm-999", si._stub)
    with pytest.raises(vmodl_fault("ManagedObjectNotFound")):
        fm.ListFilesInGuest(gone, auth(sim), "/")


def test_not_authenticated(sim: Sim) -> None:
    si = connect(sim)
    vm = find_vm(si)
    fm = si.content.guestOperationsManager.fileManager
    sim.expire_sessions()  # like an idle timeout on the server
    with pytest.raises(vim.fault.NotAuthenticated):
        fm.ListFilesInGuest(vm, auth(sim), "/")


def test_stats_count_soap_calls(sim: Sim, si: Any) -> None:
    vm = find_vm(si)
    fm = si.content.guestOperationsManager.fileManager
    sim.reset_stats()
    fm.ListFilesInGuest(vm, auth(sim), "/")
    fm.InitiateFileTransferFromGuest(vm, auth(sim), "/etc/hosts")
    si.content.guestOperationsManager.authManager.ValidateCredentialsInGuest(vm, auth(sim))
    by = sim.stats()["vms"][sim.vm_id()]["calls_by_transport"]
    assert by["soap"] == {"files.list": 1, "transfer.create": 1, "credentials.validate": 1}


# ---- hostile requests -------------------------------------------------------------------
ENVELOPE = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    "<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
)
RSC = '<RetrieveServiceContent xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></RetrieveServiceContent>'
LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "lol">'
    + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    + ']><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
    '<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this>'
    "<userName>&lol9;</userName><password>x</password></Login></soapenv:Body></soapenv:Envelope>"
)
XXE = (
    '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
    '<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this>'
    "<userName>&e;</userName><password>x</password></Login></soapenv:Body></soapenv:Envelope>"
)


@pytest.mark.parametrize(
    ("body", "fault"),
    [
        (b"<not xml", "InvalidRequest"),
        (LAUGHS.encode(), "InvalidRequest"),
        (XXE.encode(), "InvalidRequest"),
        (b"<a/>", "InvalidRequest"),
        (ENVELOPE.format(body=RSC.replace("urn:vim25", "urn:other")).encode(), "InvalidRequest"),
        (ENVELOPE.format(body='<Frobnicate xmlns="urn:vim25"/>').encode(), "MethodNotFound"),
        (
            ENVELOPE.format(body='<RetrieveServiceContent xmlns="urn:vim25"/>').encode(),
            "InvalidArgument",
        ),
        (b"<x>" + b"a" * 2_000_000 + b"</x>", "InvalidRequest"),
    ],
    ids=[
        "malformed",
        "billion-laughs",
        "external-entity",
        "no-envelope",
        "foreign-ns",
        "unknown-method",
        "no-this",
        "oversized",
    ],
)
def test_hostile_soap_requests_are_refused(sim: Sim, body: bytes, fault: str) -> None:
    with httpx.Client(verify=sim.verify(), timeout=30) as h:
        r = h.post(f"{sim.vcenter_url}/sdk", content=body, headers={"content-type": "text/xml"})
        assert r.status_code == 500
        assert f'xsi:type="{fault}"' in r.text
        assert "root:" not in r.text  # no file content leaked
        ok = h.post(f"{sim.vcenter_url}/sdk", content=ENVELOPE.format(body=RSC).encode())
        assert ok.status_code == 200 and "guestOperationsManager" in ok.text


# ---- --as-esxi and the endpoint switches ------------------------------------------------------
def test_as_esxi(tmp_path: Path) -> None:
    root = build_tree(tmp_path)
    with run_simulator("--root", str(root), "--vm-name", "web01", "--as-esxi") as sim:
        assert sim.info["apis"] == ["soap"]
        si = connect(sim)
        try:
            content = si.RetrieveContent()
            assert content.about.apiType == "HostAgent"
            assert content.sessionManager._moId == "ha-sessionmgr"
            vm = find_vm(si, dc="ha-datacenter")
            assert vm is not None and vm.name == "web01"
            fm = content.guestOperationsManager.fileManager
            assert fm._moId == "ha-guest-operations-file-manager"
            assert [f.path for f in fm.ListFilesInGuest(vm, auth(sim), "/etc").files] == [
                ".",
                "..",
                "hosts",
            ]
        finally:
            pyVim_connect.Disconnect(si)
        with httpx.Client(verify=sim.verify(), timeout=30) as h:
            assert (
                h.post(f"{sim.vcenter_url}/api/session", auth=(sim.user, sim.password)).status_code
                == 404
            )
            vi = f"{sim.vcenter_url}/sdk/vim25/8.0.3.0/ServiceInstance/ServiceInstance/RetrieveServiceContent"
            assert h.post(vi).status_code == 404


def test_soap_and_vi_json_can_be_switched_off(tmp_path: Path) -> None:
    root = build_tree(tmp_path)
    with run_simulator("--root", str(root), "--no-soap", "--no-vi-json") as sim:
        assert sim.info["apis"] == ["rest"]
        with httpx.Client(verify=sim.verify(), timeout=30) as h:
            assert (
                h.post(
                    f"{sim.vcenter_url}/sdk", content=ENVELOPE.format(body=RSC).encode()
                ).status_code
                == 404
            )
            assert h.get(f"{sim.vcenter_url}/sdk/vimServiceVersions.xml").status_code == 404
            vi = f"{sim.vcenter_url}/sdk/vim25/8.0.3.0/ServiceInstance/ServiceInstance/RetrieveServiceContent"
            assert h.post(vi).status_code == 404
            assert (
                h.post(f"{sim.vcenter_url}/api/session", auth=(sim.user, sim.password)).status_code
                == 201
            )

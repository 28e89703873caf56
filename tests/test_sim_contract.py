"""Contract test: the simulator's requests and responses against the published 7.0.3 spec
(Swagger 2.0 subset at ../shared/specs/vcenter-7.0.3-guestfs-subset.json)."""

from __future__ import annotations

import json
import os
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guestfs_mount.sim.testing import ApiClient, Sim, run_simulator

SPEC_PATH = (
    Path(__file__).resolve().parents[1].parent / "shared/specs/vcenter-7.0.3-guestfs-subset.json"
)

pytestmark = pytest.mark.skipif(not SPEC_PATH.exists(), reason=f"{SPEC_PATH} not present")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return dict(json.loads(SPEC_PATH.read_text()))


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["definitions"][name]
    return schema


def validate(spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> None:
    """A small Swagger 2.0 schema check: types, required, enums, properties, items."""
    schema = resolve(spec, schema)
    t = schema.get("type")
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if t == "object" or "properties" in schema:
        assert isinstance(value, dict), f"{where}: expected object, got {value!r}"
        for req in schema.get("required", []):
            assert req in value, f"{where}: missing required {req!r}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(spec, sub, value[key], f"{where}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, v in value.items():
                if key not in schema.get("properties", {}):
                    validate(spec, extra, v, f"{where}.{key}")
    elif t == "array":
        assert isinstance(value, list), f"{where}: expected array"
        for i, item in enumerate(value):
            validate(spec, schema.get("items", {}), item, f"{where}[{i}]")
    elif t == "string":
        assert isinstance(value, str), f"{where}: expected string, got {value!r}"
        if schema.get("format") == "date-time":
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", value), where
    elif t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: int"
    elif t == "boolean":
        assert isinstance(value, bool), f"{where}: expected boolean"


def operation(spec: dict[str, Any], key: str, method: str) -> dict[str, Any]:
    return dict(spec["paths"][key][method])


def check_response(spec: dict[str, Any], key: str, method: str, resp: httpx.Response) -> None:
    op = operation(spec, key, method)
    declared = op["responses"]
    assert str(resp.status_code) in declared, (
        f"{method.upper()} {key}: status {resp.status_code} not declared ({sorted(declared)})"
    )
    schema = declared[str(resp.status_code)].get("schema")
    if schema is None:
        assert resp.content == b"", f"{key}: {resp.status_code} must have no body"
        return
    body = resp.json()
    validate(spec, schema, body)
    if resp.status_code >= 400:
        validate(spec, {"$ref": "#/definitions/VapiStdErrorsErrorType"}, body["error_type"])


def check_request(spec: dict[str, Any], key: str, method: str, body: Any) -> None:
    for p in operation(spec, key, method).get("parameters", []):
        if p["in"] == "body":
            validate(spec, p["schema"], body, "request")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    root = tmp_path_factory.mktemp("contract")
    (root / "d").mkdir()
    (root / "d/f.txt").write_text("x\n")
    os.symlink("d/f.txt", root / "l")
    with run_simulator("--root", str(root)) as s:
        yield s


FILES_LIST = "/api/vcenter/vm/{vm}/guest/filesystem/files?action=list"
FILES_GET = "/api/vcenter/vm/{vm}/guest/filesystem/files/{path}?action=get"
CREATE = "/api/vcenter/vm/{vm}/guest/filesystem?action=create"


def test_session_contract(spec: dict[str, Any], sim: Sim) -> None:
    with ApiClient(sim) as api:
        r = api.http.post(f"{sim.vcenter_url}/api/session", auth=(sim.user, sim.password))
        check_response(spec, "/api/session", "post", r)
        api.token = r.json()
        check_response(spec, "/api/session", "get", api.get("/api/session"))
        r = api.http.delete(f"{sim.vcenter_url}/api/session", headers=api.headers)
        check_response(spec, "/api/session", "delete", r)
        check_response(spec, "/api/session", "get", api.get("/api/session"))
        r = api.http.post(f"{sim.vcenter_url}/api/session", auth=(sim.user, "bad"))
        check_response(spec, "/api/session", "post", r)


def test_inventory_contract(spec: dict[str, Any], sim: Sim) -> None:
    with ApiClient(sim) as api:
        check_response(spec, "/api/vcenter/vm", "get", api.get("/api/vcenter/vm"))  # 401
        api.login()
        vm = sim.vm_id()
        check_response(spec, "/api/vcenter/vm", "get", api.get("/api/vcenter/vm"))
        check_response(
            spec, "/api/vcenter/vm", "get", api.get("/api/vcenter/vm", params={"power_states": "X"})
        )
        for key, suffix in [
            ("/api/vcenter/vm/{vm}/power", "power"),
            ("/api/vcenter/vm/{vm}/tools", "tools"),
            ("/api/vcenter/vm/{vm}/guest/operations", "guest/operations"),
        ]:
            check_response(spec, key, "get", api.get(f"/api/vcenter/vm/{vm}/{suffix}"))
            check_response(spec, key, "get", api.get(f"/api/vcenter/vm/vm-0/{suffix}"))


def test_guest_filesystem_contract(spec: dict[str, Any], sim: Sim) -> None:
    creds = sim.guest_credentials()
    bad = {**creds, "password": "nope"}
    with ApiClient(sim) as api:
        api.login()
        bodies: list[dict[str, Any]] = [
            {"credentials": creds, "path": "/d"},
            {
                "credentials": creds,
                "path": "/d",
                "iteration": {"size": 1, "index": 0},
                "filter": {"match_pattern": ".*"},
            },
            {"credentials": creds, "path": "/missing"},
            {"credentials": creds, "path": "/d", "filter": {"match_pattern": "("}},
            {"credentials": bad, "path": "/d"},
        ]
        for body in bodies:
            check_request(spec, FILES_LIST, "post", body)
            r = api.list(
                body["path"],
                credentials=body["credentials"],
                size=body.get("iteration", {}).get("size"),
                index=body.get("iteration", {}).get("index"),
                pattern=body.get("filter", {}).get("match_pattern"),
            )
            check_response(spec, FILES_LIST, "post", r)
        check_request(spec, FILES_GET, "post", {"credentials": creds})
        for path, c in [
            ("/d/f.txt", creds),
            ("/l", creds),
            ("/d", creds),
            ("/nope", creds),
            ("/d/f.txt", bad),
        ]:
            check_response(spec, FILES_GET, "post", api.stat(path, credentials=c))
        for path, c in [("/d/f.txt", creds), ("/d", creds), ("/nope", creds), ("/d/f.txt", bad)]:
            check_request(spec, CREATE, "post", {"credentials": c, "spec": {"path": path}})
            check_response(spec, CREATE, "post", api.create_transfer(path, credentials=c))
        sim.faults(busy_next=2, unavailable_next=1)
        try:
            check_response(spec, CREATE, "post", api.create_transfer("/d/f.txt"))
            check_response(spec, FILES_GET, "post", api.stat("/d/f.txt"))
            check_response(spec, FILES_LIST, "post", api.list("/d"))
        finally:
            sim.reset_faults()
        sim.power(sim.vm_id(), "POWERED_OFF")
        try:
            check_response(spec, CREATE, "post", api.create_transfer("/d/f.txt"))
        finally:
            sim.power(sim.vm_id(), "POWERED_ON")


# ---- the fleet inventory ------------------------------------------------------------------
FLEET = 40


@pytest.fixture(scope="module")
def fleet_sim() -> Iterator[Sim]:
    with run_simulator("--fleet", str(FLEET), "--vm-list-limit", "30") as s:
        yield s


def test_fleet_inventory_contract(spec: dict[str, Any], fleet_sim: Sim) -> None:
    with ApiClient(fleet_sim) as api:
        api.login()
        too_many = api.get("/api/vcenter/vm")
        check_response(spec, "/api/vcenter/vm", "get", too_many)
        assert too_many.json()["error_type"] == "UNABLE_TO_ALLOCATE_RESOURCE"
        for params in ({"folders": "group-v102"}, {"names": "dup"}, {"folders": "group-v3"}):
            r = api.get("/api/vcenter/vm", params=params)
            check_response(spec, "/api/vcenter/vm", "get", r)
            assert r.json()


def test_pyvmomi_walks_the_fleet_through_a_container_view(fleet_sim: Sim) -> None:
    """pyvmomi, VMware's SOAP client, pages the whole inventory: container view on the
    root folder, RetrievePropertiesEx with maxObjects, ContinueRetrievePropertiesEx."""
    pyvim_connect = pytest.importorskip("pyVim.connect")
    vim = pytest.importorskip("pyVmomi").vim
    ssl_ctx = ssl.create_default_context(cafile=fleet_sim.ca_file)
    si = pyvim_connect.SmartConnect(
        host="127.0.0.1",
        port=int(httpx.URL(fleet_sim.vcenter_url).port or 443),
        user=fleet_sim.user,
        pwd=fleet_sim.password,
        sslContext=ssl_ctx,
    )
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        props = [
            "name",
            "runtime.powerState",
            "guest.toolsRunningStatus",
            "guest.guestFamily",
            "config.instanceUuid",
            "parent",
        ]
        pc = content.propertyCollector
        fspec = vim.PropertyCollector.FilterSpec(
            objectSet=[
                vim.PropertyCollector.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        vim.PropertyCollector.TraversalSpec(
                            name="v", type=vim.view.ContainerView, path="view", skip=False
                        )
                    ],
                )
            ],
            propSet=[vim.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=props)],
        )
        result = pc.RetrievePropertiesEx(
            [fspec], vim.PropertyCollector.RetrieveOptions(maxObjects=15)
        )
        pages = [result]
        while result.token:
            result = pc.ContinueRetrievePropertiesEx(result.token)
            pages.append(result)
        assert [len(p.objects) for p in pages] == [15, 15, 10]
        seen = {
            o.obj._moId: {p.name: p.val for p in o.propSet} for page in pages for o in page.objects
        }
        expected = {v["vm"]: v for v in fleet_sim.vms}
        assert set(seen) == set(expected)
        for vm_id, got in seen.items():
            info = expected[vm_id]
            assert got["config.instanceUuid"] == info["instance_uuid"]
            assert got["parent"]._moId == info["folder"]
            assert isinstance(got["parent"], vim.Folder)
            assert (
                got["runtime.powerState"]
                == {
                    "POWERED_ON": "poweredOn",
                    "POWERED_OFF": "poweredOff",
                    "SUSPENDED": "suspended",
                }[info["power_state"]]
            )
            family = "windowsGuest" if info["family"] == "WINDOWS" else "linuxGuest"
            assert got["guest.guestFamily"] == family
        # names travel escaped, as vim25 carries ManagedEntity.name
        assert seen["vm-1010"]["name"] == "a%2fb"
        assert seen["vm-1015"]["name"] == "esc%1b[31mred"
        assert seen["vm-1005"]["guest.toolsRunningStatus"] == "guestToolsNotRunning"
        # the folder tree through the same client
        sandbox = si.content.searchIndex.FindByInventoryPath("Datacenter/vm/dev/web/sandbox")
        assert sandbox.name == "sandbox" and sandbox.parent.parent.name == "dev"
        assert [e._moId for e in sandbox.childEntity if isinstance(e, vim.VirtualMachine)] == [
            v["vm"] for v in fleet_sim.vms if v["folder_path"] == "dev/web/sandbox"
        ]
        view.DestroyView()
    finally:
        pyvim_connect.Disconnect(si)

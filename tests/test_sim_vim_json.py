"""guestfs-sim's VI/JSON endpoint (``/sdk/vim25/{release}/...``): every answer checked against
the published subset ``../shared/specs/vi-json-guestfile-subset.json`` (when that file is
present; the behaviour checks run without it), and the listing compared with the tree."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guestfs_mount.sim.testing import Sim, esx_url, run_simulator

SPEC_PATH = (
    Path(__file__).resolve().parents[1].parent / "shared/specs/vi-json-guestfile-subset.json"
)
RELEASE = "8.0.3.0"
FM = "guestOperationsFileManager"
AM = "guestOperationsAuthManager"


# ---- a small OpenAPI 3 checker for the VI/JSON subset ------------------------------------
class Schemas:
    """Validates values against the subset's components, following ``allOf`` inheritance and
    the ``_typeName`` discriminator (a value may be any subtype of the declared type)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.schemas: dict[str, Any] = spec["components"]["schemas"]

    @staticmethod
    def _ref(schema: dict[str, Any]) -> str | None:
        if "$ref" in schema:
            return str(schema["$ref"]).rsplit("/", 1)[-1]
        refs = [s for s in schema.get("allOf", []) if "$ref" in s]
        if len(refs) == 1 and "properties" not in schema and "type" not in schema:
            return str(refs[0]["$ref"]).rsplit("/", 1)[-1]
        return None

    def chain(self, name: str) -> list[str]:
        out = [name]
        for sub in self.schemas[name].get("allOf", []):
            parent = self._ref(sub)
            if parent:
                out += self.chain(parent)
        return out

    def flat(self, name: str) -> tuple[dict[str, Any], set[str]]:
        props: dict[str, Any] = {}
        req: set[str] = set()
        for n in reversed(self.chain(name)):
            s = self.schemas[n]
            props.update(s.get("properties", {}))
            req |= set(s.get("required", []))
        return props, req

    def check(self, schema: dict[str, Any], value: Any, where: str = "$") -> None:
        if value is None:
            assert schema.get("nullable"), f"{where}: null not allowed"
            return
        name = self._ref(schema)
        if name is not None:
            self.check_named(name, value, where)
            return
        t = schema.get("type")
        if "enum" in schema:
            assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
        if t == "string":
            assert isinstance(value, str), f"{where}: expected string, got {value!r}"
            if schema.get("format") == "date-time":
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", value), where
        elif t == "integer":
            assert isinstance(value, int) and not isinstance(value, bool), f"{where}: int"
            bits = 31 if schema.get("format") == "int32" else 63
            assert -(2**bits) <= value < 2**bits, f"{where}: {value} out of range"
        elif t == "boolean":
            assert isinstance(value, bool), f"{where}: expected boolean"
        elif t == "array":
            assert isinstance(value, list), f"{where}: expected array"
            for i, item in enumerate(value):
                self.check(schema["items"], item, f"{where}[{i}]")

    def check_named(
        self, name: str, value: Any, where: str = "$", runtime_ok: bool = False
    ) -> None:
        schema = self.schemas[name]
        if "properties" not in schema and "allOf" not in schema:
            self.check(schema, value, where)  # an enum or primitive
            return
        assert isinstance(value, dict), f"{where}: expected {name} object, got {value!r}"
        actual = value.get("_typeName")
        assert isinstance(actual, str), f"{where}: missing _typeName"
        assert actual in self.schemas, f"{where}: type {actual} not in the subset"
        chain = self.chain(actual)
        # any vim method may also throw a RuntimeFault (NotAuthenticated, InvalidArgument)
        assert name in chain or (runtime_ok and "RuntimeFault" in chain), (
            f"{where}: {actual} is not a {name}"
        )
        props, req = self.flat(actual)
        missing = req - set(value)
        assert not missing, f"{where}: {actual} lacks required {sorted(missing)}"
        extra = set(value) - set(props) - {"_typeName"}
        assert not extra, f"{where}: {actual} has undeclared {sorted(extra)}"
        for key, v in value.items():
            if key != "_typeName":
                self.check(props[key], v, f"{where}.{key}")

    def response(self, op_path: str, method: str, resp: httpx.Response) -> None:
        op = self.spec["paths"][op_path][method]
        declared = op["responses"]
        status = str(resp.status_code)
        assert status in declared, f"{op_path}: status {status} not declared ({sorted(declared)})"
        content = declared[status].get("content")
        if content is None:
            assert resp.content == b"", f"{op_path}: {status} must have no body"
            return
        schema = content["application/json"]["schema"]
        name = self._ref(schema)
        if status == "500":
            assert name is not None
            self.check_named(name, resp.json(), runtime_ok=True)
        else:
            self.check(schema, resp.json())

    def request(self, op_path: str, body: dict[str, Any]) -> None:
        schema = self.spec["paths"][op_path]["post"]["requestBody"]["content"]["application/json"]
        name = self._ref(schema["schema"])
        assert name is not None
        props, req = self.flat(name)
        assert req <= set(body), f"request lacks {sorted(req - set(body))}"
        for key, v in body.items():
            self.check(props[key], v, f"request.{key}")


@pytest.fixture(scope="module")
def schemas() -> Schemas | None:
    if not SPEC_PATH.exists():
        return None
    return Schemas(json.loads(SPEC_PATH.read_text()))


# ---- the simulator -----------------------------------------------------------------------
def build_tree(base: Path) -> Path:
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    os.utime(root / "etc/hosts", (1_700_000_000, 1_704_164_645))
    os.chmod(root / "etc/hosts", 0o640)
    many = root / "many"
    many.mkdir()
    for i in range(130):
        (many / (f"f-{i:03d}.log" if i % 10 == 0 else f"f-{i:03d}.txt")).write_text(str(i))
    os.symlink("etc/hosts", root / "rel")
    os.symlink("/etc", root / "etcdir")
    (root / "sub").mkdir()
    os.symlink("../etc/hosts", root / "sub/up")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name\n")
    return root


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    root = build_tree(tmp_path_factory.mktemp("vimjson"))
    with run_simulator("--root", str(root), "--max-page-size", "100") as s:
        yield s


class Vi:
    """A bare VI/JSON caller (the product's client lives elsewhere; this one checks wire shapes)."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.http = httpx.Client(verify=sim.verify(), timeout=30)
        self.base = f"{sim.vcenter_url}/sdk/vim25/{RELEASE}"
        self.token: str | None = None

    def post(self, mo_type: str, moid: str, method: str, body: Any = None) -> httpx.Response:
        headers = {"vmware-api-session-id": self.token} if self.token else {}
        return self.http.post(
            f"{self.base}/{mo_type}/{moid}/{method}",
            json=body if body is not None else None,
            headers=headers,
        )

    def get(self, mo_type: str, moid: str, prop: str) -> httpx.Response:
        headers = {"vmware-api-session-id": self.token} if self.token else {}
        return self.http.get(f"{self.base}/{mo_type}/{moid}/{prop}", headers=headers)

    def login(self) -> httpx.Response:
        r = self.post(
            "SessionManager",
            "SessionManager",
            "Login",
            {"userName": self.sim.user, "password": self.sim.password},
        )
        assert r.status_code == 200, r.text
        self.token = r.headers["vmware-api-session-id"]
        return r

    def auth(self, password: str | None = None) -> dict[str, Any]:
        return {
            "_typeName": "NamePasswordAuthentication",
            "interactiveSession": False,
            "username": self.sim.guest_user,
            "password": self.sim.guest_password if password is None else password,
        }

    def vm(self) -> dict[str, Any]:
        return {
            "_typeName": "ManagedObjectReference",
            "type": "VirtualMachine",
            "value": self.sim.vm_id(),
        }

    def list(self, path: str, **kw: Any) -> httpx.Response:
        body = {"vm": self.vm(), "auth": self.auth(), "filePath": path, **kw}
        return self.post("GuestFileManager", FM, "ListFilesInGuest", body)

    def initiate(self, path: str, password: str | None = None) -> httpx.Response:
        body = {"vm": self.vm(), "auth": self.auth(password), "guestFilePath": path}
        return self.post("GuestFileManager", FM, "InitiateFileTransferFromGuest", body)


@pytest.fixture
def vi(sim: Sim) -> Iterator[Vi]:
    sim.reset_faults()
    c = Vi(sim)
    c.login()
    yield c
    c.http.close()


LIST = "/GuestFileManager/{moId}/ListFilesInGuest"
INIT = "/GuestFileManager/{moId}/InitiateFileTransferFromGuest"
VALIDATE = "/GuestAuthManager/{moId}/ValidateCredentialsInGuest"


def fault_of(resp: httpx.Response) -> str:
    assert resp.status_code == 500, resp.text
    return str(resp.json()["_typeName"])


# ---- tests -------------------------------------------------------------------------------
def test_service_content_and_managers(sim: Sim, schemas: Schemas | None) -> None:
    c = Vi(sim)  # anonymous
    r = c.post("ServiceInstance", "ServiceInstance", "RetrieveServiceContent")
    assert r.status_code == 200, r.text
    content = r.json()
    if schemas:
        schemas.response("/ServiceInstance/{moId}/RetrieveServiceContent", "post", r)
    assert content["about"]["apiType"] == "VirtualCenter"
    assert content["sessionManager"]["value"] == "SessionManager"
    gom = content["guestOperationsManager"]
    assert gom == {
        "_typeName": "ManagedObjectReference",
        "type": "GuestOperationsManager",
        "value": "guestOperationsManager",
    }
    for prop, want in (
        ("fileManager", ("GuestFileManager", FM)),
        ("authManager", ("GuestAuthManager", AM)),
    ):
        r = c.get("GuestOperationsManager", gom["value"], prop)
        assert r.status_code == 200, r.text
        if schemas:
            schemas.response(f"/GuestOperationsManager/{{moId}}/{prop}", "get", r)
        assert (r.json()["type"], r.json()["value"]) == want


def test_login_logout(sim: Sim, schemas: Schemas | None) -> None:
    c = Vi(sim)
    bad = c.post(
        "SessionManager", "SessionManager", "Login", {"userName": sim.user, "password": "nope"}
    )
    assert fault_of(bad) == "InvalidLogin"
    assert "vmware-api-session-id" not in bad.headers
    r = c.login()
    if schemas:
        schemas.response("/SessionManager/{moId}/Login", "post", bad)
        schemas.response("/SessionManager/{moId}/Login", "post", r)
    assert r.json()["userName"] == sim.user
    assert r.json()["key"] != c.token  # the session key is not the secret header value
    assert c.list("/").status_code == 200
    out = c.post("SessionManager", "SessionManager", "Logout")
    assert out.status_code == 204
    if schemas:
        schemas.response("/SessionManager/{moId}/Logout", "post", out)
    r = c.list("/")
    assert fault_of(r) == "NotAuthenticated"
    if schemas:
        schemas.response(LIST, "post", r)
    c.token = None
    assert fault_of(c.list("/")) == "NotAuthenticated"


def test_listing_pages_carry_every_attribute(sim: Sim, vi: Vi, schemas: Schemas | None) -> None:
    root = Path(sim.root())
    seen: list[dict[str, Any]] = []
    index = 0
    pages = 0
    while True:
        body = {
            "vm": vi.vm(),
            "auth": vi.auth(),
            "filePath": "/many",
            "index": index,
            "maxResults": 40,
        }
        if schemas:
            schemas.request(LIST, body)
        r = vi.post("GuestFileManager", FM, "ListFilesInGuest", body)
        assert r.status_code == 200, r.text
        if schemas:
            schemas.response(LIST, "post", r)
        page = r.json()
        pages += 1
        files = page.get("files", [])
        assert len(files) <= 40
        seen += files
        index += len(files)
        assert page["remaining"] == 132 - index
        if page["remaining"] == 0:
            break
    assert pages == 4
    names = [f["path"] for f in seen]
    assert names[:2] == [".", ".."]
    assert sorted(names[2:]) == sorted(os.listdir(root / "many"))
    by_name = {f["path"]: f for f in seen}
    st = os.stat(root / "many/f-007.txt")
    f = by_name["f-007.txt"]
    assert (f["type"], f["size"]) == ("file", st.st_size)
    attrs = f["attributes"]
    assert attrs["_typeName"] == "GuestPosixFileAttributes"
    assert attrs["permissions"] == st.st_mode
    assert (attrs["ownerId"], attrs["groupId"]) == (st.st_uid, st.st_gid)
    assert attrs["modificationTime"].endswith("Z")
    assert by_name["."]["type"] == "directory" and by_name["."]["size"] == 0


def test_page_size_is_clamped_and_zero_means_default(vi: Vi) -> None:
    big = vi.list("/many", maxResults=100000).json()
    assert len(big["files"]) == 100 and big["remaining"] == 32
    default = vi.list("/many", maxResults=0).json()
    assert len(default["files"]) == 50
    assert fault_of(vi.list("/many", maxResults=-1)) == "InvalidArgument"
    assert fault_of(vi.list("/many", index=-1)) == "InvalidArgument"
    past = vi.list("/many", index=500).json()
    assert past.get("files", []) == [] and past["remaining"] == 0


def test_symlinks_show_their_targets_attributes(sim: Sim, vi: Vi) -> None:
    files = {f["path"]: f for f in vi.list("/", maxResults=100).json()["files"]}
    hosts = os.stat(Path(sim.root()) / "etc/hosts")
    rel = files["rel"]
    assert (rel["type"], rel["size"]) == ("symlink", 0)
    assert rel["attributes"]["symlinkTarget"] == "etc/hosts"
    assert rel["attributes"]["permissions"] == hosts.st_mode
    assert rel["attributes"]["modificationTime"] == "2024-01-02T03:04:05Z"
    assert stat.S_ISDIR(files["etcdir"]["attributes"]["permissions"])
    assert files["etc"]["size"] == 0


def test_match_pattern(vi: Vi, schemas: Schemas | None) -> None:
    r = vi.list("/many", matchPattern=r"\.log$", maxResults=100)
    names = [f["path"] for f in r.json()["files"]]
    assert names == [f"f-{i:03d}.log" for i in range(0, 130, 10)]
    bad = vi.list("/many", matchPattern="(")
    assert fault_of(bad) == "InvalidArgument"
    assert bad.json()["invalidProperty"] == "matchPattern"
    if schemas:
        schemas.response(LIST, "post", bad)


def test_initiate_transfer_and_download_once(sim: Sim, vi: Vi, schemas: Schemas | None) -> None:
    r = vi.initiate("/etc/hosts")
    assert r.status_code == 200, r.text
    if schemas:
        schemas.response(INIT, "post", r)
    info = r.json()
    assert info["size"] == len("127.0.0.1 localhost\n")
    assert info["attributes"]["permissions"] == 0o100640
    assert info["url"].startswith("https://*:")
    with httpx.Client(verify=sim.esx_verify(), timeout=30) as h:
        got = h.get(esx_url(sim, info["url"]))
        assert got.status_code == 200 and got.content == b"127.0.0.1 localhost\n"
        assert h.get(esx_url(sim, info["url"])).status_code == 404  # one successful GET


@pytest.mark.parametrize(
    ("path", "fault", "file"),
    [
        ("/nope", "FileNotFound", "/nope"),
        ("/etc", "NotAFile", "/etc"),
        ("/rel", "NotAFile", "/rel"),  # the spec: not a directory nor a symlink
    ],
)
def test_initiate_faults(vi: Vi, schemas: Schemas | None, path: str, fault: str, file: str) -> None:
    r = vi.initiate(path)
    assert fault_of(r) == fault
    assert r.json()["file"] == file
    if schemas:
        schemas.response(INIT, "post", r)


def test_guest_credentials(sim: Sim, vi: Vi, schemas: Schemas | None) -> None:
    ok = vi.post(
        "GuestAuthManager", AM, "ValidateCredentialsInGuest", {"vm": vi.vm(), "auth": vi.auth()}
    )
    assert ok.status_code == 204
    bad = vi.post(
        "GuestAuthManager",
        AM,
        "ValidateCredentialsInGuest",
        {"vm": vi.vm(), "auth": vi.auth("wrong")},
    )
    assert fault_of(bad) == "InvalidGuestLogin"
    listing = vi.post(
        "GuestFileManager",
        FM,
        "ListFilesInGuest",
        {"vm": vi.vm(), "auth": vi.auth("wrong"), "filePath": "/"},
    )
    assert fault_of(listing) == "InvalidGuestLogin"
    if schemas:
        schemas.response(VALIDATE, "post", ok)
        schemas.response(VALIDATE, "post", bad)
        schemas.response(LIST, "post", listing)


def test_vm_state_faults(sim: Sim, vi: Vi, schemas: Schemas | None) -> None:
    vm = sim.vm_id()
    try:
        sim.tools(vm, False)
        r = vi.list("/")
        assert fault_of(r) == "GuestOperationsUnavailable"
        if schemas:
            schemas.response(LIST, "post", r)
        sim.tools(vm, True)
        sim.power(vm, "POWERED_OFF")
        r = vi.initiate("/etc/hosts")
        assert fault_of(r) == "InvalidPowerState"
        assert r.json()["existingState"] == "poweredOff"
        if schemas:
            schemas.response(INIT, "post", r)
    finally:
        sim.tools(vm, True)
        sim.power(vm, "POWERED_ON")
    sim.faults(busy_next=1)
    assert fault_of(vi.list("/")) == "InvalidState"
    assert vi.list("/").status_code == 200


def test_bad_requests(sim: Sim, vi: Vi) -> None:
    unknown_vm = {
        "_typeName": "ManagedObjectReference",
        "type": "VirtualMachine",
        "value": "vm-999",
    }
    r = vi.post(
        "GuestFileManager",
        FM,
        "ListFilesInGuest",
        {"vm": unknown_vm, "auth": vi.auth(), "filePath": "/"},
    )
    assert fault_of(r) == "ManagedObjectNotFound"
    r = vi.post("GuestFileManager", FM, "ListFilesInGuest", {"vm": vi.vm(), "auth": vi.auth()})
    assert fault_of(r) == "InvalidArgument" and r.json()["invalidProperty"] == "filePath"
    untyped = {k: v for k, v in vi.auth().items() if k != "_typeName"}
    r = vi.post(
        "GuestFileManager",
        FM,
        "ListFilesInGuest",
        {"vm": vi.vm(), "auth": untyped, "filePath": "/"},
    )
    assert fault_of(r) == "InvalidArgument" and r.json()["invalidProperty"] == "auth"
    r = vi.post(
        "GuestFileManager",
        FM,
        "ListFilesInGuest",
        {"vm": vi.vm(), "auth": vi.auth(), "filePath": "/", "bogus": 1},
    )
    assert fault_of(r) == "InvalidArgument"
    r = vi.http.post(
        f"{vi.base}/GuestFileManager/{FM}/ListFilesInGuest",
        content=b"{not json",
        headers={"vmware-api-session-id": vi.token or ""},
    )
    assert fault_of(r) == "InvalidRequest"
    r = vi.http.post(
        f"{vi.base}/GuestFileManager/{FM}/ListFilesInGuest",
        content=b"[" * 2_000_000,
        headers={"vmware-api-session-id": vi.token or ""},
    )
    assert fault_of(r) == "InvalidRequest"
    assert (
        vi.http.post(
            f"{sim.vcenter_url}/sdk/vim25/6.7.0.0/ServiceInstance/ServiceInstance/RetrieveServiceContent"
        ).status_code
        == 404
    )
    r = vi.post("GuestFileManager", "someOtherManager", "ListFilesInGuest", {})
    assert fault_of(r) == "ManagedObjectNotFound"


def test_stats_count_vi_json_calls_per_vm(sim: Sim, vi: Vi) -> None:
    sim.reset_stats()
    vi.list("/")
    vi.list("/many")
    vi.initiate("/etc/hosts")
    by = sim.stats()["vms"][sim.vm_id()]["calls_by_transport"]
    assert by["vi-json"] == {"files.list": 2, "transfer.create": 1}
    assert "rest" not in by or not any(by["rest"].values())


def test_checker_rejects_wrong_shapes(schemas: Schemas | None) -> None:
    """Negative controls: the checker above is what makes the other tests contract tests."""
    if schemas is None:
        pytest.skip(f"{SPEC_PATH} not present")
    good = {"_typeName": "GuestListFileInfo", "remaining": 0, "files": []}
    schemas.check_named("GuestListFileInfo", good)
    for bad in (
        {"_typeName": "GuestListFileInfo", "files": []},  # remaining is required
        {"_typeName": "GuestListFileInfo", "remaining": "0"},  # wrong type
        {"_typeName": "GuestListFileInfo", "remaining": 0, "extra": 1},  # undeclared field
        {"remaining": 0},  # no discriminator
        {"_typeName": "FileTransferInformation", "remaining": 0},  # not a subtype
    ):
        with pytest.raises(AssertionError):
            schemas.check_named("GuestListFileInfo", bad)
    with pytest.raises(AssertionError):  # InvalidLogin is no FileFault
        schemas.check_named("FileFault", {"_typeName": "InvalidLogin"})


def test_windows_vm_lists_windows_attributes(tmp_path: Path, schemas: Schemas | None) -> None:
    c_drive = tmp_path / "c"
    (c_drive / "Users").mkdir(parents=True)
    (c_drive / "boot.ini").write_text("[boot]\r\n")
    os.chmod(c_drive / "boot.ini", 0o444)
    with run_simulator("--windows-vm", f"win={c_drive}") as sim:
        c = Vi(sim)
        c.login()
        r = c.list("C:\\")
        assert r.status_code == 200, r.text
        if schemas:
            schemas.response(LIST, "post", r)
        files = {f["path"]: f for f in r.json()["files"]}
        assert list(files)[:2] == [".", ".."]
        boot = files["boot.ini"]["attributes"]
        assert boot["_typeName"] == "GuestWindowsFileAttributes"
        assert boot["readOnly"] is True and boot["hidden"] is False
        assert files["Users"]["type"] == "directory"
        r = c.initiate("C:\\boot.ini")
        assert r.status_code == 200, r.text
        if schemas:
            schemas.response(INIT, "post", r)
        assert r.json()["size"] == len("[boot]\r\n")
        c.http.close()


def test_same_vm_state_as_rest(sim: Sim, vi: Vi) -> None:
    """One VM, three views: the REST listing, VI/JSON and the property reads agree."""
    from guestfs_mount.sim.testing import ApiClient

    with ApiClient(sim) as api:
        api.login()
        rest = api.list("/many", size=1000).json()["files"]
    vim_files = vi.list("/many", maxResults=1000).json()["files"]
    assert [f["path"] for f in vim_files] == [f["filename"] for f in rest]
    assert [f["size"] for f in vim_files] == [f["size"] for f in rest]
    r = vi.get("VirtualMachine", sim.vm_id(), "name")
    assert r.status_code == 200 and r.json() == "demo-vm"
    assert vi.get("VirtualMachine", sim.vm_id(), "runtime").json()["powerState"] == "poweredOn"
    anonymous = Vi(sim)
    assert fault_of(anonymous.get("VirtualMachine", sim.vm_id(), "name")) == "NotAuthenticated"
    assert fault_of(vi.get("VirtualMachine", sim.vm_id(), "config")) == "InvalidProperty"


def test_interactive_session_is_refused(vi: Vi) -> None:
    body = {"vm": vi.vm(), "auth": {**vi.auth(), "interactiveSession": True}, "filePath": "/"}
    assert fault_of(vi.post("GuestFileManager", FM, "ListFilesInGuest", body)) == "InvalidState"


def test_non_utf8_names_are_left_out(sim: Sim, vi: Vi) -> None:
    from guestfs_mount.sim.testing import ApiClient

    with ApiClient(sim) as api:
        api.login()
        rest = [os.fsencode(f["filename"]) for f in api.list("/", size=1000).json()["files"]]
    assert b"caf\xe9.txt" in rest  # /api carries it (surrogate escapes)
    names = [f["path"] for f in vi.list("/", maxResults=1000).json()["files"]]
    assert "rel" in names and not any(n.startswith("caf") for n in names)

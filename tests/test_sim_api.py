"""guestfs-sim: sessions, inventory, listing, stat, transfers and every error of the seed table.

All tests talk HTTP to a running simulator process (one per module)."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guestfs_mount.sim.testing import ApiClient, Sim, esx_url, quote_bytes, run_simulator

SAML = "saml-token-for-alice"


def build_tree(base: Path) -> Path:
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(random.Random(1).randbytes(3 * 1024 * 1024 + 17))
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/sub/file.txt").write_text("in sub\n")
    os.chmod(root / "dir/sub/file.txt", 0o640)
    many = root / "many"
    many.mkdir()
    for i in range(1000):
        (many / (f"f-{i:04d}.log" if i % 10 == 0 else f"f-{i:04d}.txt")).write_text(str(i))
    with open(os.path.join(os.fsencode(root), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name\n")
    (root / "home/alice").mkdir(parents=True)
    (root / "home/alice/a.txt").write_text("alice\n")
    (root / "home/bob").mkdir(parents=True)
    (root / "home/bob/b.txt").write_text("bob\n")
    os.symlink("etc/hosts", root / "rel")
    os.symlink("/etc/hosts", root / "abs")
    os.symlink("/etc", root / "absdir")
    os.symlink("/nope/nothing", root / "dangling")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("../../..", root / "up")
    os.symlink("../outside", root / "parentlink")
    os.symlink("/home/bob", root / "home/alice/to-bob")
    os.mkfifo(root / "fifo")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET\n")
    os.utime(root / "etc/hosts", ns=(1_700_000_000_123_456_789, 1_704_164_645_987_000_000))
    return root


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    base = tmp_path_factory.mktemp("simapi")
    root = build_tree(base)
    other = base / "other"
    other.mkdir()
    (other / "x.txt").write_text("other vm\n")
    cfg = base / "sim.json"
    cfg.write_text(
        json.dumps(
            {
                "vcenter_users": [{"user": "ro@vsphere.local", "password": "pw-ro"}],
                "guest_accounts": [
                    {
                        "user": "alice",
                        "password": "pw-alice",
                        "subtree": "/home/alice",
                        "saml_tokens": [SAML],
                    }
                ],
                "vms": [{"name": "off-vm", "root": str(other), "power_state": "POWERED_OFF"}],
            }
        )
    )
    with run_simulator("--root", str(root), "--vm", f"second={other}", "--config", str(cfg)) as s:
        yield s


@pytest.fixture
def api(sim: Sim) -> Iterator[ApiClient]:
    sim.reset_faults()
    with ApiClient(sim) as c:
        c.login()
        yield c


def alice(password: str = "pw-alice") -> dict[str, Any]:
    return {
        "interactive_session": False,
        "type": "USERNAME_PASSWORD",
        "user_name": "alice",
        "password": password,
    }


def assert_error(
    resp: httpx.Response, status: int, error_type: str, reason: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error_type"] == error_type
    assert isinstance(body["messages"], list) and body["messages"]
    for m in body["messages"]:
        assert isinstance(m["id"], str) and isinstance(m["default_message"], str)
        assert isinstance(m["args"], list)
    if reason is not None:
        assert body["data"]["reason"] == reason
        assert isinstance(body["data"]["file_path"], str)
    return dict(body)


# ---- sessions ------------------------------------------------------------------------


def test_session_lifecycle(sim: Sim) -> None:
    with ApiClient(sim) as c:
        assert_error(c.get("/api/session"), 401, "UNAUTHENTICATED")
        r = c.http.post(f"{sim.vcenter_url}/api/session", auth=(sim.user, sim.password))
        assert r.status_code == 201
        token = r.json()
        assert isinstance(token, str) and token
        c.token = token
        info = c.get("/api/session").json()
        assert info["user"] == sim.user
        assert info["created_time"].endswith("Z") and info["last_accessed_time"].endswith("Z")
        assert c.http.delete(f"{sim.vcenter_url}/api/session", headers=c.headers).status_code == 204
        assert_error(c.get("/api/session"), 401, "UNAUTHENTICATED")
        assert_error(c.get("/api/vcenter/vm"), 401, "UNAUTHENTICATED")


def test_session_bad_credentials(sim: Sim) -> None:
    with ApiClient(sim) as c:
        r = c.http.post(f"{sim.vcenter_url}/api/session", auth=(sim.user, "wrong"))
        assert_error(r, 401, "UNAUTHENTICATED")
        assert_error(c.http.post(f"{sim.vcenter_url}/api/session"), 401, "UNAUTHENTICATED")
        c.login("ro@vsphere.local", "pw-ro")  # extra account from the config file
        c.token = "not-a-token"
        assert_error(c.get("/api/vcenter/vm"), 401, "UNAUTHENTICATED")


def test_admin_expire_sessions(sim: Sim) -> None:
    with ApiClient(sim) as c:
        c.login()
        assert c.get("/api/vcenter/vm").status_code == 200
        sim.expire_sessions()
        assert_error(c.get("/api/vcenter/vm"), 401, "UNAUTHENTICATED")


# ---- inventory -------------------------------------------------------------------------


def test_vm_list_and_filters(api: ApiClient, sim: Sim) -> None:
    vms = api.get("/api/vcenter/vm").json()
    assert [v["name"] for v in vms] == [vm["name"] for vm in sim.vms]
    for v in vms:
        assert set(v) == {"vm", "name", "power_state", "cpu_count", "memory_size_MiB"}
    r = api.get("/api/vcenter/vm", params=[("names", "second"), ("names", "off-vm")]).json()
    assert sorted(v["name"] for v in r) == ["off-vm", "second"]
    r = api.get("/api/vcenter/vm", params={"vms": sim.vm_id()}).json()
    assert [v["vm"] for v in r] == [sim.vm_id()]
    r = api.get("/api/vcenter/vm", params={"power_states": "POWERED_OFF"}).json()
    assert [v["name"] for v in r] == ["off-vm"]
    assert api.get("/api/vcenter/vm", params={"names": "nope"}).json() == []
    assert_error(
        api.get("/api/vcenter/vm", params={"power_states": "BOGUS"}), 400, "INVALID_ARGUMENT"
    )


def test_vm_state_endpoints(api: ApiClient, sim: Sim) -> None:
    vm = sim.vm_id()
    assert api.get(f"/api/vcenter/vm/{vm}/power").json() == {"state": "POWERED_ON"}
    tools = api.get(f"/api/vcenter/vm/{vm}/tools").json()
    assert tools["run_state"] == "RUNNING"
    assert api.get(f"/api/vcenter/vm/{vm}/guest/operations").json() == {
        "guest_operations_ready": True,
        "interactive_guest_operations_ready": False,
    }
    off = sim.vm_id("off-vm")
    assert api.get(f"/api/vcenter/vm/{off}/power").json()["state"] == "POWERED_OFF"
    assert api.get(f"/api/vcenter/vm/{off}/tools").json()["run_state"] == "NOT_RUNNING"
    assert not api.get(f"/api/vcenter/vm/{off}/guest/operations").json()["guest_operations_ready"]
    for suffix in ("power", "tools", "guest/operations"):
        assert_error(api.get(f"/api/vcenter/vm/vm-999/{suffix}"), 404, "NOT_FOUND")


def test_unknown_operation(api: ApiClient) -> None:
    assert_error(api.get("/api/vcenter/nothing"), 404, "OPERATION_NOT_FOUND")
    assert_error(
        api.post("/api/vcenter/vm/vm-42/guest/filesystem?action=bogus", {}),
        404,
        "OPERATION_NOT_FOUND",
    )


# ---- listing ---------------------------------------------------------------------------


def test_list_directory(api: ApiClient) -> None:
    r = api.list("/dir")
    assert r.status_code == 200
    assert r.json() == {
        "files": [
            {"filename": ".", "type": "DIRECTORY", "size": 0},
            {"filename": "..", "type": "DIRECTORY", "size": 0},
            {"filename": "sub", "type": "DIRECTORY", "size": 0},
        ],
        "total": 3,
        "start_index": 0,
        "end_index": 2,
        "status": "END_OF_DATA",
    }
    root = api.list("/", size=1000).json()
    names = [f["filename"] for f in root["files"]]
    assert names[:2] == [".", ".."] and "." not in names[2:] and ".." not in names[2:]
    assert names[2:] == sorted(names[2:], key=os.fsencode)
    types = {f["filename"]: f["type"] for f in root["files"]}
    assert types["rel"] == "SYMLINK" and types["fifo"] == "FILE" and types["etc"] == "DIRECTORY"
    assert "caf\udce9.txt" in names  # non-UTF-8 byte as a lone surrogate


def test_list_paging_1000(api: ApiClient) -> None:
    first = api.list("/many").json()
    assert len(first["files"]) == 50 and first["total"] == 1002
    assert (first["start_index"], first["end_index"], first["status"]) == (0, 49, "READY")
    seen: list[str] = []
    index = 0
    while True:
        page = api.list("/many", index=index, size=300).json()
        seen += [f["filename"] for f in page["files"]]
        index += len(page["files"])
        if page["status"] == "END_OF_DATA":
            break
        assert page["status"] == "READY"
    assert seen[:2] == [".", ".."]
    assert len(set(seen)) == 1002 and seen[2:] == sorted(seen[2:])
    last = api.list("/many", index=952, size=50).json()
    assert (last["start_index"], last["end_index"], last["status"]) == (952, 1001, "END_OF_DATA")
    past = api.list("/many", index=5000).json()
    assert past["files"] == [] and "start_index" not in past and "end_index" not in past
    assert past["status"] == "END_OF_DATA" and past["total"] == 1002
    big = api.list("/many", size=5000).json()  # clamped to --max-page-size (1000)
    assert len(big["files"]) == 1000 and big["status"] == "READY"


def test_list_filter(api: ApiClient) -> None:
    r = api.list("/many", pattern=r"\.log$", size=1000).json()
    assert r["total"] == 100 and all(f["filename"].endswith(".log") for f in r["files"])
    assert api.list("/many", pattern="^nothing$").json() == {
        "files": [],
        "total": 0,
        "status": "END_OF_DATA",
    }
    assert_error(api.list("/many", pattern="(unclosed"), 400, "INVALID_ARGUMENT")
    assert_error(api.list("/many", size=0), 400, "INVALID_ARGUMENT")
    assert_error(api.list("/many", index=-1), 400, "INVALID_ARGUMENT")


def test_list_file_and_symlinked_dir(api: ApiClient) -> None:
    r = api.list("/etc/hosts").json()
    assert r["files"] == [{"filename": "hosts", "type": "FILE", "size": 20}]
    assert r["total"] == 1 and r["status"] == "END_OF_DATA"
    via = api.list("/absdir").json()  # absolute symlink to a directory: within the root
    assert [f["filename"] for f in via["files"]] == [".", "..", "hosts"]
    assert_error(api.list("/nope"), 404, "NOT_FOUND", "FILE_NOT_FOUND")
    assert_error(api.list("/dangling"), 404, "NOT_FOUND", "FILE_NOT_FOUND")


# ---- stat ------------------------------------------------------------------------------


def test_stat_file(api: ApiClient) -> None:
    r = api.stat("/etc/hosts")
    assert r.status_code == 200
    info = r.json()
    assert info["type"] == "FILE" and info["size"] == 20
    attrs = info["attributes"]
    assert attrs["last_accessed"] == "2023-11-14T22:13:20.123Z"
    assert attrs["last_modified"] == "2024-01-02T03:04:05.987Z"
    assert attrs["filesystem_family"] == "POSIX"
    assert set(attrs["posix_attributes"]) == {"owner", "group", "permissions"}
    assert "symlink_target" not in attrs
    assert (
        api.stat("/dir/sub/file.txt").json()["attributes"]["posix_attributes"]["permissions"]
        == "640"
    )
    assert api.stat("/dir").json()["type"] == "DIRECTORY"
    assert api.stat("/fifo").json()["type"] == "FILE"
    assert api.stat("/").json()["type"] == "DIRECTORY"


def test_stat_symlinks(api: ApiClient) -> None:
    for path, target in [
        ("/rel", "etc/hosts"),
        ("/abs", "/etc/hosts"),
        ("/dangling", "/nope/nothing"),
        ("/loop1", "loop2"),
        ("/up", "../../.."),
        ("/parentlink", "../outside"),
    ]:
        info = api.stat(path).json()
        assert info["type"] == "SYMLINK", path
        assert info["attributes"]["symlink_target"] == target
    # a symlink in the middle of a path is resolved within the root
    assert api.stat("/absdir/hosts").json()["size"] == 20


def test_path_encodings(api: ApiClient, sim: Sim) -> None:
    vm = api.vm_path()
    creds = {"credentials": sim.guest_credentials()}
    raw = api.post(f"{vm}/guest/filesystem/files//etc/hosts?action=get", creds)
    assert raw.status_code == 200 and raw.json()["size"] == 20
    enc = api.post(f"{vm}/guest/filesystem/files/%2Fetc%2Fhosts?action=get", creds)
    assert enc.json() == raw.json()
    # non-UTF-8 name: the listing's surrogate form maps back to the same bytes
    name = "/caf\udce9.txt"
    assert quote_bytes(os.fsencode(name)) == "%2Fcaf%E9.txt"
    assert api.stat(name).json()["size"] == 13
    assert api.download(name) == b"latin-1 name\n"
    assert_error(api.stat("relative/path"), 400, "INVALID_ARGUMENT")


def test_path_escapes(api: ApiClient) -> None:
    for path in [
        "/../outside/secret.txt",
        "/up/outside/secret.txt",
        "/parentlink/secret.txt",
        "/../../../../etc/../outside/secret.txt",
        "/dir/../../outside/secret.txt",
    ]:
        assert_error(api.stat(path), 404, "NOT_FOUND", "FILE_NOT_FOUND")
        assert_error(api.create_transfer(path), 404, "NOT_FOUND", "FILE_NOT_FOUND")
        assert_error(api.list(path), 404, "NOT_FOUND", "FILE_NOT_FOUND")
    # ".." is clamped at the root, like the guest kernel does
    assert api.stat("/../../etc/hosts").json()["size"] == 20
    assert api.stat("/up/etc/hosts").json()["size"] == 20
    assert_error(api.stat("/loop1/x"), 400, "INVALID_ARGUMENT")
    assert_error(api.list("/loop1"), 400, "INVALID_ARGUMENT")
    assert_error(api.create_transfer("/loop1"), 400, "INVALID_ARGUMENT", "NOT_A_FILE")


# ---- transfers -------------------------------------------------------------------------


def test_transfer_released(api: ApiClient, sim: Sim) -> None:
    r = api.create_transfer("/big.bin")
    assert r.status_code == 201
    url = r.json()
    port = httpx.URL(sim.esx_url).port
    assert url.startswith(f"https://*:{port}/guestFile?id=")
    data = (Path(sim.root()) / "big.bin").read_bytes()
    with httpx.Client(verify=sim.esx_verify()) as c:
        got = c.get(esx_url(sim, url))
        assert got.status_code == 200
        assert got.headers["content-length"] == str(len(data))
        assert got.content == data
        again = c.get(esx_url(sim, url))  # single use
        assert again.status_code in (403, 404) and again.headers["content-type"].startswith(
            "text/plain"
        )
    assert api.download("/empty") == b""


def test_transfer_preview(api: ApiClient) -> None:
    r = api.preview_transfer("/etc/hosts")
    assert r.status_code == 200
    with httpx.Client(verify=api.sim.esx_verify()) as c:
        assert c.get(esx_url(api.sim, r.json())).content == b"127.0.0.1 localhost\n"
    assert_error(api.preview_transfer("/etc"), 400, "INVALID_ARGUMENT", "NOT_A_FILE")


def test_transfer_bad_token(sim: Sim, api: ApiClient) -> None:
    url = api.transfer_url("/etc/hosts")
    with httpx.Client(verify=sim.esx_verify()) as c:
        bad = c.get(url.rsplit("token=", 1)[0] + "token=wrong")
        assert bad.status_code in (403, 404)
        assert c.get(url.replace("id=", "id=9999")).status_code in (403, 404)
        assert c.get(f"{sim.esx_url}/guestFile").status_code in (403, 404)
        assert c.get(url).status_code == 200  # the bad tries did not burn the URL


def test_transfer_upload_spec_refused(api: ApiClient, sim: Sim) -> None:
    body = {
        "credentials": sim.guest_credentials(),
        "spec": {"path": "/tmp/x", "attributes": {"size": 3, "overwrite": True}},
    }
    assert_error(
        api.post(f"{api.vm_path()}/guest/filesystem?action=create", body), 400, "INVALID_ARGUMENT"
    )


# ---- the seed's error table (plus credentials) -----------------------------------------


def test_errors_not_a_file(api: ApiClient) -> None:
    for path in ["/dir", "/rel", "/abs", "/dangling"]:
        assert_error(api.create_transfer(path), 400, "INVALID_ARGUMENT", "NOT_A_FILE")


def test_errors_vm_state(api: ApiClient, sim: Sim) -> None:
    off = sim.vm_id("off-vm")
    assert_error(api.create_transfer("/x.txt", vm=off), 400, "NOT_ALLOWED_IN_CURRENT_STATE")
    assert_error(api.list("/", vm=off), 400, "NOT_ALLOWED_IN_CURRENT_STATE")
    assert_error(api.stat("/x.txt", vm=off), 400, "NOT_ALLOWED_IN_CURRENT_STATE")
    for state in ("SUSPENDED", "POWERED_OFF"):
        sim.power(sim.vm_id("second"), state)
        assert_error(
            api.stat("/x.txt", vm=sim.vm_id("second")), 400, "NOT_ALLOWED_IN_CURRENT_STATE"
        )
    sim.power(sim.vm_id("second"), "POWERED_ON")
    assert api.stat("/x.txt", vm=sim.vm_id("second")).status_code == 200
    assert_error(api.create_transfer("/x", vm="vm-999"), 404, "NOT_FOUND")
    assert_error(api.preview_transfer("/x", vm="vm-999"), 404, "NOT_FOUND")
    assert_error(api.create_transfer("/missing"), 404, "NOT_FOUND", "FILE_NOT_FOUND")
    assert_error(api.stat("/missing"), 404, "NOT_FOUND", "FILE_NOT_FOUND")


def test_errors_tools_not_running(api: ApiClient, sim: Sim) -> None:
    vm = sim.vm_id("second")
    sim.tools(vm, False)
    try:
        assert_error(api.create_transfer("/x.txt", vm=vm), 503, "SERVICE_UNAVAILABLE")
        assert_error(api.list("/", vm=vm), 503, "SERVICE_UNAVAILABLE")
        assert api.get(f"/api/vcenter/vm/{vm}/tools").json()["run_state"] == "NOT_RUNNING"
    finally:
        sim.tools(vm, True)


def test_errors_busy_and_unavailable(api: ApiClient, sim: Sim) -> None:
    sim.faults(busy_next=2)
    assert_error(api.create_transfer("/etc/hosts"), 500, "RESOURCE_BUSY")
    assert_error(api.stat("/etc/hosts"), 500, "RESOURCE_BUSY")
    assert api.stat("/etc/hosts").status_code == 200
    sim.faults(unavailable_next=1)
    assert_error(api.list("/"), 503, "SERVICE_UNAVAILABLE")
    assert api.list("/").status_code == 200


def test_errors_guest_credentials(api: ApiClient, sim: Sim) -> None:
    bad = {**sim.guest_credentials(), "password": "wrong"}
    assert_error(api.create_transfer("/etc/hosts", credentials=bad), 401, "UNAUTHENTICATED")
    assert_error(api.stat("/etc/hosts", credentials=bad), 401, "UNAUTHENTICATED")
    nouser = {**sim.guest_credentials(), "user_name": "mallory"}
    assert_error(api.list("/", credentials=nouser), 401, "UNAUTHENTICATED")
    for missing in ("interactive_session", "type"):
        creds = {k: v for k, v in sim.guest_credentials().items() if k != missing}
        assert_error(api.stat("/etc/hosts", credentials=creds), 400, "INVALID_ARGUMENT")
    r = api.post(f"{api.vm_path()}/guest/filesystem?action=create", {"spec": {"path": "/x"}})
    assert_error(r, 400, "INVALID_ARGUMENT")
    saml = {"interactive_session": False, "type": "SAML_BEARER_TOKEN", "saml_token": SAML}
    assert api.stat("/home/alice/a.txt", credentials=saml).status_code == 200
    assert_error(
        api.stat("/home/alice/a.txt", credentials={**saml, "saml_token": "x"}),
        401,
        "UNAUTHENTICATED",
    )


def test_errors_unauthorized_subtree(api: ApiClient) -> None:
    assert api.stat("/home/alice/a.txt", credentials=alice()).status_code == 200
    assert api.download("/home/alice/a.txt", credentials=alice()) == b"alice\n"
    assert_error(api.stat("/etc/hosts", credentials=alice()), 403, "UNAUTHORIZED")
    assert_error(api.create_transfer("/etc/hosts", credentials=alice()), 403, "UNAUTHORIZED")
    assert_error(api.list("/home", credentials=alice()), 403, "UNAUTHORIZED")
    # a symlink inside the subtree pointing elsewhere does not widen it
    assert_error(api.list("/home/alice/to-bob", credentials=alice()), 403, "UNAUTHORIZED")
    assert_error(
        api.create_transfer("/home/alice/to-bob/b.txt", credentials=alice()), 403, "UNAUTHORIZED"
    )
    assert_error(api.stat("/home/alice/a.txt", credentials=alice("bad")), 401, "UNAUTHENTICATED")


def test_stats_counters(api: ApiClient, sim: Sim) -> None:
    sim.reset_stats()
    api.list("/")
    api.stat("/etc/hosts")
    api.download("/etc/hosts")
    api.preview_transfer("/etc/hosts")
    s = sim.stats()
    assert s["calls"]["files.list"] == 1 and s["calls"]["files.get"] == 1
    assert s["calls"]["transfer.create"] == 1 and s["calls"]["transfer.preview"] == 1
    assert s["transfers"]["created"] == 2 and s["transfers"]["started"] == 1
    assert s["transfers"]["completed"] == 1 and s["transfers"]["by_path"] == {"/etc/hosts": 1}
    assert s["bytes_sent"] == 20 and s["sessions"] >= 1
    assert set(s["calls"]) >= {
        "session.create",
        "vm.list",
        "vm.power",
        "vm.tools",
        "vm.guest_operations",
        "session.get",
        "session.delete",
    }


def test_timestamps_millis(api: ApiClient, sim: Sim) -> None:
    p = Path(sim.root()) / "dir/sub/file.txt"
    os.utime(p, ns=(0, 1_000_000_000 * 1_600_000_000 + 5_000_000))
    assert api.stat("/dir/sub/file.txt").json()["attributes"]["last_modified"] == (
        "2020-09-13T12:26:40.005Z"
    )
    assert time.time() > 0

"""guestfs-sim Windows VM mode: drive paths, case-insensitive lookup, win_attributes.

One simulator process serves a Windows VM (C: and D:), a Windows VM from the config
file and a POSIX VM side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guestfs_mount.sim.cli import UsageError, build_parser, setup
from guestfs_mount.sim.testing import ApiClient, Sim, run_simulator

HELLO = b"hello from windows\r\n"


def build_c(base: Path) -> Path:
    c = base / "c"
    admin = c / "Users" / "Admin"
    admin.mkdir(parents=True)
    (admin / "file.txt").write_bytes(HELLO)
    (admin / ".profile").write_text("dot-hidden\n")
    (admin / "attr-hidden.txt").write_text("xattr-hidden\n")
    (admin / "ro.txt").write_text("read only\n")
    os.chmod(admin / "ro.txt", 0o444)
    (c / "Windows" / "System32").mkdir(parents=True)
    (c / "Windows" / "System32" / "notepad.exe").write_bytes(b"MZ" + bytes(100))
    (c / "Dup.txt").write_text("first\n")
    (c / "dup.txt").write_text("second, ignored\n")
    (c / "a:b").write_text("not a Windows name\n")
    os.symlink("Users/Admin/file.txt", c / "link.txt")
    os.symlink("/Windows", c / "WinLink")
    os.symlink("../../outside", c / "escape")
    os.symlink("nowhere", c / "dangling")
    os.symlink("loop2", c / "loop1")
    os.symlink("LOOP1", c / "loop2")
    (base / "outside").mkdir()
    (base / "outside" / "secret.txt").write_text("TOP SECRET\n")
    return c


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    base = tmp_path_factory.mktemp("simwin")
    c = build_c(base)
    d = base / "d"
    (d / "Data").mkdir(parents=True)
    (d / "Data" / "Report.CSV").write_text("a,b\n")
    posix = base / "posix"
    (posix / "etc").mkdir(parents=True)
    (posix / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (posix / "Upper.txt").write_text("posix\n")
    e = base / "e"
    e.mkdir()
    (e / "E.txt").write_text("config drive e\n")
    cfg = base / "sim.json"
    cfg.write_text(
        json.dumps(
            {
                "guest_accounts": [
                    {"user": "alice", "password": "pw-alice", "subtree": "c:/users/admin"}
                ],
                "vms": [
                    {"name": "cfgwin", "root": str(d), "family": "WINDOWS", "drives": {"e": str(e)}}
                ],
            }
        )
    )
    args = ["--windows-vm", f"win={c},D={d}", "--vm", f"posix={posix}", "--config", str(cfg)]
    with run_simulator(*args) as s:
        yield s


@pytest.fixture
def api(sim: Sim) -> Iterator[ApiClient]:
    with ApiClient(sim) as c:
        c.login()
        yield c


def win(sim: Sim) -> str:
    return sim.vm_id("win")


def assert_error(
    resp: httpx.Response, status: int, error_type: str, reason: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["error_type"] == error_type
    if reason is not None:
        assert body["data"]["reason"] == reason
    return body


def names(resp: httpx.Response) -> list[str]:
    """The names of a directory listing after its leading ``.`` and ``..``."""
    assert resp.status_code == 200, resp.text
    got = [f["filename"] for f in resp.json()["files"]]
    assert got[:2] == [".", ".."], got
    return got[2:]


def test_ready_info_and_inventory(sim: Sim, api: ApiClient) -> None:
    by_name = {vm["name"]: vm for vm in sim.vms}
    assert by_name["win"]["family"] == "WINDOWS"
    assert by_name["win"]["guest_root"] == "C:\\"
    assert set(by_name["win"]["drives"]) == {"C", "D"}
    assert by_name["win"]["root"] == by_name["win"]["drives"]["C"]
    assert by_name["cfgwin"]["family"] == "WINDOWS"
    assert set(by_name["cfgwin"]["drives"]) == {"C", "E"}
    assert by_name["posix"]["family"] == "POSIX"
    assert by_name["posix"]["guest_root"] == "/"
    assert sim.guest_root("win") == "C:\\" and sim.family("posix") == "POSIX"
    listed = {v["name"] for v in api.get("/api/vcenter/vm").json()}
    assert {"win", "cfgwin", "posix"} <= listed


def test_list_drive_root(sim: Sim, api: ApiClient) -> None:
    resp = api.list("C:\\", vm=win(sim))
    # NTFS order (case-insensitive); the case duplicate, the invalid name and the
    # dangling symlinks (escape -> ../../outside is C:\outside) are invisible; other
    # symlinks appear as what they point to
    assert names(resp) == ["Dup.txt", "link.txt", "Users", "Windows", "WinLink"]
    files = {f["filename"]: f for f in resp.json()["files"]}
    assert files["link.txt"] == {"filename": "link.txt", "type": "FILE", "size": len(HELLO)}
    assert files["WinLink"]["type"] == "DIRECTORY"
    assert files["Users"]["size"] == 0
    assert resp.json()["total"] == 7 and resp.json()["status"] == "END_OF_DATA"
    assert names(api.list("c:", vm=win(sim))) == names(resp)
    assert names(api.list("c:/", vm=win(sim))) == names(resp)


def test_list_case_insensitive_and_slashes(sim: Sim, api: ApiClient) -> None:
    expected = [".profile", "attr-hidden.txt", "file.txt", "ro.txt"]
    assert names(api.list(r"C:\Users\Admin", vm=win(sim))) == expected
    assert names(api.list("c:/USERS/admin/", vm=win(sim))) == expected
    assert names(api.list(r"C:\users\.\x\..\ADMIN", vm=win(sim))) == expected
    # a file path lists that one entry, with its stored name
    one = api.list(r"c:\users\admin\FILE.TXT", vm=win(sim)).json()["files"]
    assert one == [{"filename": "file.txt", "type": "FILE", "size": len(HELLO)}]
    assert names(api.list(r"C:\WinLink\system32", vm=win(sim))) == ["notepad.exe"]
    # the pattern applies to "." and ".." too
    dup = api.list("C:\\", vm=win(sim), pattern=r"^[Dd]").json()["files"]
    assert [f["filename"] for f in dup] == ["Dup.txt"]


def test_case_duplicate_logged_once(sim: Sim, api: ApiClient) -> None:
    api.list("C:\\", vm=win(sim))
    api.list("C:\\", vm=win(sim))
    assert sim.stderr_text().count("differs only by case") == 1


def test_get_case_insensitive(sim: Sim, api: ApiClient) -> None:
    resp = api.stat(r"c:\users\ADMIN\File.TXT", vm=win(sim))
    assert resp.status_code == 200, resp.text
    info = resp.json()
    assert info["type"] == "FILE" and info["size"] == len(HELLO)
    attrs = info["attributes"]
    assert attrs["filesystem_family"] == "WINDOWS"
    assert "posix_attributes" not in attrs and "symlink_target" not in attrs
    assert set(attrs) == {"last_modified", "last_accessed", "filesystem_family", "win_attributes"}
    assert set(attrs["win_attributes"]) == {"hidden", "read_only", "created"}
    assert attrs["win_attributes"]["created"].endswith("Z")
    # the case duplicate: the first in byte order is served
    dup = api.download(r"C:\DUP.TXT", vm=win(sim))
    assert dup == b"first\n"


def test_percent_encoding(sim: Sim, api: ApiClient) -> None:
    creds = {"credentials": sim.guest_credentials()}
    base = f"{api.vm_path(win(sim))}/guest/filesystem/files"
    for enc in (
        "C%3A%5CUsers%5CAdmin%5Cfile.txt",  # backslash and colon encoded
        "c%3a%5cusers%5cadmin%5cfile.txt",  # lower-case hex, lower-case path
        "C%3A%2FUsers%2FAdmin%2Ffile.txt",  # encoded forward slashes
        "C:/Users/Admin/file.txt",  # raw forward slashes
    ):
        resp = api.post(f"{base}/{enc}?action=get", creds)
        assert resp.status_code == 200, (enc, resp.text)
        assert resp.json()["size"] == len(HELLO)
    resp = api.post(f"{base}/C%3A%5C?action=get", creds)
    assert resp.json()["type"] == "DIRECTORY"
    assert resp.json()["attributes"]["win_attributes"]["hidden"] is False


def test_win_attributes(sim: Sim, api: ApiClient, tmp_path: Path) -> None:
    def wa(path: str) -> dict[str, Any]:
        resp = api.stat(path, vm=win(sim))
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["attributes"]["win_attributes"])

    assert wa(r"C:\Users\Admin\file.txt")["hidden"] is False
    assert wa(r"C:\Users\Admin\file.txt")["read_only"] is False
    assert wa(r"C:\Users\Admin\.profile")["hidden"] is True
    assert wa(r"C:\Users\Admin\RO.txt")["read_only"] is True
    root = Path(sim.root("win"))
    target = root / "Users" / "Admin" / "attr-hidden.txt"
    try:
        os.setxattr(target, "user.hidden", b"1")
    except OSError:
        pytest.skip("no user xattrs on this filesystem")
    assert wa(r"C:\Users\Admin\attr-hidden.txt")["hidden"] is True
    os.setxattr(target, "user.hidden", b"0")
    assert wa(r"C:\Users\Admin\attr-hidden.txt")["hidden"] is False


def test_transfer_by_other_case(sim: Sim, api: ApiClient) -> None:
    sim.reset_stats()
    assert api.download(r"c:\USERS\admin\FILE.txt", vm=win(sim)) == HELLO
    assert api.download("C:/link.txt", vm=win(sim)) == HELLO
    assert sim.stats()["transfers"]["by_path"] == {r"C:\Users\Admin\file.txt": 2}
    assert api.download(r"d:\data\report.csv", vm=win(sim)) == b"a,b\n"
    assert api.download(r"C:\Windows\System32\NOTEPAD.EXE", vm=win(sim)).startswith(b"MZ")
    # the pre-release transfer form takes the same paths
    assert api.preview_transfer(r"c:\users\admin\file.txt", vm=win(sim)).status_code == 200


def test_errors(sim: Sim, api: ApiClient) -> None:
    vm = win(sim)
    assert_error(api.stat(r"C:\Users\Nobody", vm=vm), 404, "NOT_FOUND", "FILE_NOT_FOUND")
    assert_error(api.stat(r"C:\Users\Admin\file.txt\x", vm=vm), 404, "NOT_FOUND")
    assert_error(api.stat(r"C:\dangling", vm=vm), 404, "NOT_FOUND")
    assert_error(api.stat(r"C:\loop1", vm=vm), 400, "INVALID_ARGUMENT")
    assert_error(api.stat(r"C:\a:b", vm=vm), 400, "INVALID_ARGUMENT")
    assert_error(api.stat(r"C:\Users\Admin\file.txt:stream", vm=vm), 400, "INVALID_ARGUMENT")
    assert_error(api.stat(r"C:\Users\*.txt", vm=vm), 400, "INVALID_ARGUMENT")
    assert_error(api.create_transfer(r"C:\Users", vm=vm), 400, "INVALID_ARGUMENT", "NOT_A_FILE")
    assert_error(api.create_transfer(r"C:\WinLink", vm=vm), 400, "INVALID_ARGUMENT", "NOT_A_FILE")
    assert_error(api.list(r"C:\Users\Nobody", vm=vm), 404, "NOT_FOUND", "FILE_NOT_FOUND")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (r"C:\..\..\outside\secret.txt", 404),
        ("C:/../outside/secret.txt", 404),
        (r"C:\Users\..\..\..\outside", 404),
        (r"C:\escape\secret.txt", 404),  # symlink climbing out: clamped at the drive root
        (r"E:\file.txt", 404),  # no such drive on this VM
        (r"\\server\share\secret.txt", 400),
        ("//server/share/secret.txt", 400),
        (r"\\?\C:\Users\Admin\file.txt", 400),
        (r"\Users\Admin\file.txt", 400),  # no drive
        (r"Users\Admin\file.txt", 400),  # relative
        ("/etc/hosts", 400),  # a POSIX path
        ("", 400),
    ],
)
def test_escapes_refused(sim: Sim, api: ApiClient, path: str, status: int) -> None:
    error_type = "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT"
    assert_error(api.create_transfer(path, vm=win(sim)), status, error_type)
    if path:
        assert_error(api.stat(path, vm=win(sim)), status, error_type)
    assert_error(api.list(path, vm=win(sim)), status, error_type)


def test_escaping_symlink_is_dangling(sim: Sim, api: ApiClient) -> None:
    # "escape" -> ../../outside is expanded inside C: and finds no C:\outside
    (Path(sim.root("win")) / "outside").mkdir()
    try:
        assert "escape" in names(api.list("C:\\", vm=win(sim)))
        assert names(api.list(r"C:\escape", vm=win(sim))) == []
    finally:
        (Path(sim.root("win")) / "outside").rmdir()
    assert_error(api.list(r"C:\escape", vm=win(sim)), 404, "NOT_FOUND")


def test_windows_subtree_account(sim: Sim, api: ApiClient) -> None:
    alice = {
        "interactive_session": False,
        "type": "USERNAME_PASSWORD",
        "user_name": "alice",
        "password": "pw-alice",
    }
    resp = api.stat(r"C:\USERS\Admin\file.txt", vm=win(sim), credentials=alice)
    assert resp.status_code == 200, resp.text
    assert_error(api.stat(r"C:\Windows", vm=win(sim), credentials=alice), 403, "UNAUTHORIZED")
    assert_error(api.list("C:\\", vm=win(sim), credentials=alice), 403, "UNAUTHORIZED")
    # a Windows subtree allows nothing on a POSIX VM
    posix = sim.vm_id("posix")
    assert_error(api.stat("/etc/hosts", vm=posix, credentials=alice), 403, "UNAUTHORIZED")


def test_config_windows_vm(sim: Sim, api: ApiClient) -> None:
    vm = sim.vm_id("cfgwin")
    assert names(api.list("C:\\", vm=vm)) == ["Data"]
    assert api.download(r"e:\e.TXT", vm=vm) == b"config drive e\n"
    assert api.stat(r"C:\data", vm=vm).json()["attributes"]["filesystem_family"] == "WINDOWS"


def test_posix_vm_unaffected(sim: Sim, api: ApiClient) -> None:
    vm = sim.vm_id("posix")
    resp = api.stat("/etc/hosts", vm=vm)
    assert resp.status_code == 200, resp.text
    attrs = resp.json()["attributes"]
    assert attrs["filesystem_family"] == "POSIX" and "posix_attributes" in attrs
    assert "win_attributes" not in attrs
    assert_error(api.stat("/ETC/hosts", vm=vm), 404, "NOT_FOUND")
    assert_error(api.stat(r"C:\etc\hosts", vm=vm), 400, "INVALID_ARGUMENT")
    assert names(api.list("/", vm=vm)) == ["Upper.txt", "etc"]
    assert api.download("/etc/hosts", vm=vm) == b"127.0.0.1 localhost\n"


@pytest.mark.parametrize(
    "spec",
    ["win", "win=", "=DIR", "win={d},C={d}", "win={d},D={d},d={d}", "win={d},D=/nonexistent"],
)
def test_bad_windows_vm_option(tmp_path: Path, spec: str) -> None:
    args = build_parser().parse_args(["--windows-vm", spec.format(d=tmp_path)])
    with pytest.raises(UsageError):
        setup(args)

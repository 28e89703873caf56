"""What a listing and a stat contain (real-guest-ops.md section 4), in both cost models:
``.`` and ``..`` first, sizes 0 for directories and symlinks, a symlink showing its
target's owner, mode and times, an entry the guest cannot stat left out. Plus the
path resolution's work growing linearly with the depth."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestfs_mount.sim import guestfs, winfs
from guestfs_mount.sim.testing import ApiClient, Sim, run_simulator

T_TARGET = 1_600_000_000_000_000_000
T_LINK = 1_500_000_000_000_000_000


def build(base: Path) -> Path:
    root = base / "root"
    (root / "d/sub").mkdir(parents=True)
    (root / "d/target.txt").write_text("twelve bytes")
    os.chmod(root / "d/target.txt", 0o604)
    os.chown(root / "d/target.txt", 1234, 5678)
    os.utime(root / "d/target.txt", ns=(T_TARGET, T_TARGET))
    os.symlink("target.txt", root / "d/link")
    os.symlink("/d/sub", root / "d/dirlink")
    os.symlink("/nowhere", root / "d/dangling")
    for name in ("link", "dirlink", "dangling"):
        os.utime(root / "d" / name, ns=(T_LINK, T_LINK), follow_symlinks=False)
    return root


FAST = ("--control-delay", "0", "--auth-posix", "0", "--stat-time", "0", "--packet-time", "0")


@pytest.fixture(scope="module", params=["ideal", "realistic"])
def sim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    root = build(tmp_path_factory.mktemp("listing"))
    with run_simulator("--root", str(root), "--cost-model", request.param, *FAST) as s:
        yield s


@pytest.fixture
def api(sim: Sim) -> Iterator[ApiClient]:
    with ApiClient(sim) as client:
        client.login()
        yield client


def listing(api: ApiClient, path: str, **kw: Any) -> list[dict[str, Any]]:
    r = api.list(path, size=1000, **kw)
    assert r.status_code == 200, r.text
    return list(r.json()["files"])


def test_dot_and_dotdot_first(api: ApiClient) -> None:
    for path in ("/", "/d", "/d/sub", "/d/dirlink"):
        files = listing(api, path)
        assert [f["filename"] for f in files[:2]] == [".", ".."], path
        assert all(f["type"] == "DIRECTORY" and f["size"] == 0 for f in files[:2])
        assert {".", ".."}.isdisjoint(f["filename"] for f in files[2:])
    assert [f["filename"] for f in listing(api, "/d/sub")] == [".", ".."]  # empty dir
    only = listing(api, "/d/target.txt")  # a file lists itself, no dots
    assert only == [{"filename": "target.txt", "type": "FILE", "size": 12}]


def test_sizes_zero_for_directories_and_symlinks(api: ApiClient) -> None:
    files = {f["filename"]: f for f in listing(api, "/d")}
    assert files["sub"] == {"filename": "sub", "type": "DIRECTORY", "size": 0}
    assert files["link"] == {"filename": "link", "type": "SYMLINK", "size": 0}
    assert files["dirlink"]["size"] == 0 and files["dangling"]["size"] == 0
    assert files["target.txt"]["size"] == 12


def test_symlink_reports_its_targets_attributes(api: ApiClient) -> None:
    info = api.stat("/d/link").json()
    assert info["type"] == "SYMLINK" and info["size"] == 0
    attrs = info["attributes"]
    assert attrs["symlink_target"] == "target.txt"
    assert attrs["posix_attributes"] == {"owner": 1234, "group": 5678, "permissions": "604"}
    assert attrs["last_modified"].startswith("2020-09-13T12:26:40")  # the target's mtime
    # a link the guest cannot stat through keeps its own attributes
    dangling = api.stat("/d/dangling").json()["attributes"]
    assert dangling["symlink_target"] == "/nowhere"
    assert dangling["posix_attributes"]["permissions"] == "777"
    assert dangling["last_modified"].startswith("2017-07-14")


def test_directory_stat_size_zero(api: ApiClient) -> None:
    assert api.stat("/d/sub").json()["size"] == 0


# ---- the scan itself (production functions, host tree) ------------------------------


def test_entry_the_guest_cannot_stat_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = build(tmp_path)
    real_lstat = os.lstat

    def lstat(path: Any, *a: Any, **kw: Any) -> os.stat_result:
        if os.fsencode(path).endswith(b"/target.txt"):
            raise PermissionError(13, "denied")
        return real_lstat(path, *a, **kw)

    res = guestfs.resolve(os.fsencode(root), "/d", follow=True)
    monkeypatch.setattr(os, "lstat", lstat)
    names = [e.name for e in guestfs.scan(os.fsencode(root), res)]
    assert names == [".", "..", "dangling", "dirlink", "link", "sub"]


def test_scan_entries_carry_every_attribute(tmp_path: Path) -> None:
    root = os.fsencode(build(tmp_path))
    res = guestfs.resolve(root, "/d", follow=True)
    entries = {e.name: e for e in guestfs.scan(root, res)}
    link = entries["link"]
    assert link.type == "SYMLINK" and link.symlink_target == "target.txt" and link.size == 0
    assert stat.S_ISREG(link.mode) and link.permissions == 0o604  # stat through the link
    assert (link.uid, link.gid, link.mtime) == (1234, 5678, T_TARGET // 10**9)
    assert entries["dirlink"].type == "SYMLINK" and stat.S_ISDIR(entries["dirlink"].mode)
    assert entries[".."].mode == os.stat(tmp_path / "root").st_mode
    top = {e.name: e for e in guestfs.scan(root, guestfs.resolve(root, "/"))}
    same = ("mode", "uid", "gid", "mtime_ns", "ctime_ns")
    # the root's parent is itself
    assert [getattr(top[".."], k) for k in same] == [getattr(top["."], k) for k in same]


def test_windows_scan_dots_first(tmp_path: Path) -> None:
    c = tmp_path / "c"
    (c / "Users").mkdir(parents=True)
    (c / "Users/a.txt").write_text("x")
    drives = {"C": os.fsencode(c)}
    names = [e.name for e in winfs.scan(drives, winfs.resolve(drives, "C:\\Users"))]
    assert names == [".", "..", "a.txt"]
    top = winfs.scan(drives, winfs.resolve(drives, "C:\\"))
    assert [e.name for e in top] == [".", "..", "Users"] and top[2].size == 0


@pytest.mark.parametrize("family", ["POSIX", "WINDOWS"])
def test_resolution_work_is_linear_in_depth(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    depth = 1000
    root = tmp_path / "deep"
    calls = {"n": 0, "bytes": 0}

    def counting(fn: Any) -> Any:
        def wrapper(path: Any, *a: Any, **kw: Any) -> Any:
            calls["n"] += 1
            calls["bytes"] += len(os.fsencode(path)) if not isinstance(path, int) else 0
            return fn(path, *a, **kw)

        return wrapper

    root.mkdir()
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(depth):  # os.makedirs recurses once per level
            os.mkdir("d", dir_fd=fd)
            fd, old = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        os.close(fd)
        with monkeypatch.context() as m:
            for name in ("lstat", "stat", "open", "readlink", "listdir", "scandir"):
                m.setattr(os, name, counting(getattr(os, name)))
            if family == "POSIX":
                guest = "/" + "/".join(["d"] * depth)
                res = guestfs.resolve(os.fsencode(root), guest + "/../d", follow=True)
            else:
                guest = "C:\\" + "\\".join(["D"] * depth)
                res = winfs.resolve({"C": os.fsencode(root)}, guest)
    finally:
        remove_chain(root)
    assert res.guest_path == guest.replace("D", "d")
    # each component is looked up once, by its own name; the old walk passed the whole
    # prefix every time (about depth**2 bytes: a million here)
    assert calls["n"] <= 3 * depth + 10
    assert calls["bytes"] <= 4 * depth + len(os.fsencode(root)) * 4


def remove_chain(root: Path) -> None:
    """Remove a deep d/d/d... chain level by level (shutil.rmtree, and so pytest's
    tmp_path cleanup, recurses once per level)."""
    top, i = root / "d", 0
    while (top / "d").exists():
        os.rename(top / "d", root / f"n{i}")
        os.rmdir(top)
        top, i = root / f"n{i}", i + 1
    if top.exists():
        os.rmdir(top)
    os.rmdir(root)

"""Hostile vCenter end to end: crafted listings, symlinks and transfer URLs through a real
mount (tests/hostile_server.py). Nothing may crash the daemon, show a name that is not a
plain file name, or let a path in the mount resolve outside it."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.testing import mounted
from tests.hostile_server import HostileVCenter, stat_body, symlink_stat

pytestmark = pytest.mark.fuse

HOSTILE_NAMES: list[Any] = [
    {"filename": "", "type": "FILE", "size": 1},
    {"filename": ".", "type": "DIRECTORY", "size": 1},
    {"filename": "..", "type": "DIRECTORY", "size": 1},
    {"filename": "../../etc/passwd", "type": "FILE", "size": 1},
    {"filename": "a/b", "type": "FILE", "size": 1},
    {"filename": "nul\x00name", "type": "FILE", "size": 1},
    {"filename": "x" * 256, "type": "FILE", "size": 1},
    {"filename": "ok.txt", "type": "FILE", "size": 2},  # a duplicate of the real one
    {"filename": "neg", "type": "FILE", "size": -5},
    {"filename": "huge", "type": "FILE", "size": 2**70},
    {"filename": 42, "type": "FILE", "size": 1},
    "garbage",
]


@pytest.fixture
def hostile(tmp_path: Any) -> Iterator[HostileVCenter]:
    with HostileVCenter() as h:
        f = h.fake
        f.stats["/"] = stat_body("DIRECTORY", 4096)
        f.files["/"] = [
            {"filename": "ok.txt", "type": "FILE", "size": 6},
            {"filename": "sub", "type": "DIRECTORY", "size": 4096},
            {"filename": "links", "type": "DIRECTORY", "size": 4096},
            *HOSTILE_NAMES,
        ]
        f.stats["/ok.txt"] = stat_body("FILE", 6)
        f.contents["/ok.txt"] = b"hello\n"
        f.stats["/sub"] = stat_body("DIRECTORY", 4096)
        f.files["/sub"] = [{"filename": "ok.txt", "type": "FILE", "size": 6}]
        f.stats["/sub/ok.txt"] = stat_body("FILE", 6)
        f.contents["/sub/ok.txt"] = b"hello\n"
        f.stats["/links"] = stat_body("DIRECTORY", 4096)
        links = {
            "abs": "/etc/passwd",
            "climb": "../../../../../etc/passwd",
            "up": "..",
            "upup": "../..",
            "via-up": "up/..",  # a chain: "up" is clamped to the root, then ".." again
            "via-up2": "up/../..",
            "loop-a": "loop-b",
            "loop-b": "loop-a",
            "self": "self",
        }
        f.files["/links"] = [{"filename": n, "type": "SYMLINK", "size": 1} for n in links]
        for n, t in links.items():
            f.stats[f"/links/{n}"] = symlink_stat(t)
        yield h


def _mount(h: HostileVCenter, mnt: str, *extra: str) -> Any:
    return mounted(h, mnt, "--no-prefetch", "--timeout", "5", *extra, vm="web")


def test_hostile_listing_is_filtered(hostile: HostileVCenter, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt) as m:
        names = sorted(os.listdir(mnt))
        assert names == ["links", "ok.txt", "sub"], names
        with open(m.path("ok.txt"), "rb") as f:
            assert f.read() == b"hello\n"
        res = subprocess.run(["find", mnt], capture_output=True, text=True, timeout=30)
        assert "passwd" not in res.stdout and "nul" not in res.stdout
        for bad in ("neg", "huge", "x" * 255, "a", "nul"):
            assert not os.path.lexists(os.path.join(mnt, bad)), bad
        with pytest.raises(OSError) as ei:
            os.stat(os.path.join(mnt, "x" * 256))
        assert ei.value.errno in (errno.ENAMETOOLONG, errno.ENOENT)
        text = m.stderr_text()
    assert "skipped" in text  # one log line, not one per entry
    assert text.count("skipped") == 1, text


def test_symlinks_never_resolve_outside(hostile: HostileVCenter, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt):
        real_mnt = os.path.realpath(mnt)
        for n in ("abs", "climb", "up", "upup", "loop-a", "self"):
            p = os.path.join(mnt, "links", n)
            target = os.readlink(p)
            resolved = os.path.realpath(p)
            assert resolved == real_mnt or resolved.startswith(real_mnt + "/"), (n, target)
        with pytest.raises(OSError) as ei:
            open(os.path.join(mnt, "links", "loop-a")).close()
        assert ei.value.errno in (errno.ELOOP, errno.ENOENT)


def test_symlink_chain_does_not_escape(hostile: HostileVCenter, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt):
        real_mnt = os.path.realpath(mnt)
        for n in ("via-up", "via-up2"):
            resolved = os.path.realpath(os.path.join(mnt, "links", n))
            assert resolved == real_mnt or resolved.startswith(real_mnt + "/"), (n, resolved)


@pytest.mark.parametrize(
    ("url", "insecure_ok"),
    [
        ("https://evil.example.com/guestFile?id=1&token=UrLtOkEnXyZ", True),
        ("http://198.51.100.7:80/guestFile?id=1&token=UrLtOkEnXyZ", True),
    ],
    ids=["foreign-host", "foreign-http"],
)
def test_untrusted_transfer_url_refused(
    hostile: HostileVCenter, tmp_path: Any, url: str, insecure_ok: bool
) -> None:
    async def evil(req: Any) -> Any:
        import httpx

        return httpx.Response(201, json=url)

    hostile.fake.hooks["transfer.create"] = evil
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt) as m:
        with pytest.raises(OSError) as ei, open(m.path("ok.txt"), "rb") as f:
            f.read()
        assert ei.value.errno in (errno.EACCES, errno.EIO)
        text = m.stderr_text()
    assert "UrLtOkEnXyZ" not in text
    assert "--esx-host" in text or "refused" in text.lower() or "trusted" in text.lower(), text


def test_redirect_from_transfer_host_refused(hostile: HostileVCenter, tmp_path: Any) -> None:
    async def redirect(req: Any) -> Any:
        import httpx

        return httpx.Response(302, headers={"location": "http://198.51.100.7/x"})

    hostile.fake.hooks["esx.get"] = redirect
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt) as m:
        with pytest.raises(OSError) as ei, open(m.path("ok.txt"), "rb") as f:
            f.read()
        assert ei.value.errno in (errno.EACCES, errno.EIO)
        assert "redirect" in m.stderr_text()


def _windows_stat(ftype: str, size: int) -> dict[str, Any]:
    b = stat_body(ftype, size)
    b["attributes"]["filesystem_family"] = "WINDOWS"
    del b["attributes"]["posix_attributes"]
    b["attributes"]["win_attributes"] = {
        "hidden": False, "read_only": False, "created": "2024-01-02T03:04:05Z",
    }  # fmt: skip
    return b


def test_windows_names_with_backslash_or_colon_are_filtered(tmp_path: Any) -> None:
    """Issue 10 item 15: joined with "\\", a listed "..\\Secret\\sam.txt" in C:\\Users named
    C:\\Secret\\sam.txt under a false name; "D:evil" listed, then gave ENOENT."""
    with HostileVCenter() as h:
        f = h.fake
        f.stats["C:\\"] = _windows_stat("DIRECTORY", 0)
        f.files["C:\\"] = [{"filename": "Users", "type": "DIRECTORY", "size": 0}]
        f.stats["C:\\Users"] = _windows_stat("DIRECTORY", 0)
        f.files["C:\\Users"] = [
            {"filename": "ok.txt", "type": "FILE", "size": 6},
            {"filename": "..\\Secret\\sam.txt", "type": "FILE", "size": 7},
            {"filename": "D:evil", "type": "FILE", "size": 7},
        ]
        f.stats["C:\\Users\\ok.txt"] = _windows_stat("FILE", 6)
        f.contents["C:\\Users\\ok.txt"] = b"hello\n"
        f.stats["C:\\Secret\\sam.txt"] = _windows_stat("FILE", 7)
        f.contents["C:\\Secret\\sam.txt"] = b"secret\n"
        mnt = str(tmp_path / "m")
        with _mount(h, mnt, "--guest-root", "C:\\") as m:
            assert sorted(os.listdir(m.path("Users"))) == ["ok.txt"]
            with open(m.path("Users", "ok.txt"), "rb") as fh:
                assert fh.read() == b"hello\n"
            for bad in ("..\\Secret\\sam.txt", "D:evil"):
                assert not os.path.lexists(m.path("Users", bad)), bad
            text = m.stderr_text()
        assert text.count("skipped") == 1, text


def test_symlink_target_beyond_path_max_is_enametoolong(tmp_path: Any) -> None:
    """Issue 10 item 17: a target that is longer than PATH_MAX once rewritten gave EIO and
    a pyfuse3 error line."""
    long_target = "/" + "/".join(["d" * 203] * 20) + "/" + "e" * 13  # 4094 bytes
    # Rewritten relative to /a/b: "../../" + 4093 bytes, beyond PATH_MAX (4096 with NUL).
    with HostileVCenter() as h:
        f = h.fake
        f.stats["/"] = stat_body("DIRECTORY", 4096)
        f.files["/"] = [{"filename": "a", "type": "DIRECTORY", "size": 4096}]
        f.stats["/a"] = stat_body("DIRECTORY", 4096)
        f.files["/a"] = [{"filename": "b", "type": "DIRECTORY", "size": 4096}]
        f.stats["/a/b"] = stat_body("DIRECTORY", 4096)
        f.files["/a/b"] = [{"filename": "long", "type": "SYMLINK", "size": 1}]
        f.stats["/a/b/long"] = symlink_stat(long_target)
        mnt = str(tmp_path / "m")
        with _mount(h, mnt) as m:
            with pytest.raises(OSError) as ei:
                os.readlink(m.path("a", "b", "long"))
            assert ei.value.errno == errno.ENAMETOOLONG
            text = m.stderr_text()
        assert "ERROR" not in text and "error" not in text.lower(), text

"""Hostile vim25 answers end to end, over VI/JSON and over SOAP (tests/hostile_vim_server.py):
crafted listings, symlinks, endless pages, bombs and malformed bodies, foreign transfer
URLs, through a real mount. Nothing may crash the daemon, show a name that is not a plain
file name, let a path resolve outside the mount, or loop without end."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from guestfs_mount.testing import mounted
from tests.hostile_vim_server import HostileVim, posix_file

pytestmark = pytest.mark.fuse

APIS = ["vi-json", "soap"]


def hostile_names(api: str) -> list[Any]:
    def f(name: Any, **kw: Any) -> dict[str, Any]:
        e = posix_file("placeholder", **kw)
        e["path"] = name
        return e

    out: list[Any] = [
        f(""),
        f(".", ftype="directory"),
        f(".."),
        f("../../etc/passwd"),
        f("a/b"),
        f("x" * 256),
        f("ok.txt", size=2),  # a duplicate of the real one
        f("neg", size=-5),
        f("huge", size=2**70),
        f("weird", ftype="bogus"),
    ]
    if api == "vi-json":  # XML cannot carry a NUL, nor a number that is not text
        out += [f("nul\x00name"), f(42), "garbage"]
    return out


@pytest.fixture(params=APIS)
def hostile(request: Any) -> Iterator[HostileVim]:
    with HostileVim(request.param) as h:
        f = h.fake
        f.dirs["/"] = [
            posix_file("ok.txt", size=6),
            posix_file("sub", "directory", 4096, 0o40755),
            posix_file("links", "directory", 4096, 0o40755),
            posix_file("endless", "directory", 4096, 0o40755),
            posix_file("samepage", "directory", 4096, 0o40755),
            posix_file("bomb", "directory", 4096, 0o40755),
            posix_file("big.txt", size=6),
            *hostile_names(request.param),
        ]
        h.add_file("/ok.txt", b"hello\n")
        h.add_file("/big.txt", b"hello\n")
        f.dirs["/sub"] = [posix_file("ok.txt", size=6)]
        h.add_file("/sub/ok.txt", b"hello\n")
        links = {
            "abs": "/etc/passwd",
            "climb": "../../../../../etc/passwd",
            "up": "..",
            "upup": "../..",
            "loop-a": "loop-b",
            "loop-b": "loop-a",
            "self": "self",
        }
        f.dirs["/links"] = [
            posix_file(n, "symlink", len(t), 0o120777, target=t) for n, t in links.items()
        ]
        # remaining never reaches 0 and no entry ever comes
        h.lists["/endless"] = lambda a: {
            "_typeName": "GuestListFileInfo", "files": [], "remaining": 1000}  # fmt: skip
        # the same page, whatever index is asked for
        h.lists["/samepage"] = lambda a: {
            "_typeName": "GuestListFileInfo",
            "files": [posix_file("same.txt")], "remaining": 1000}  # fmt: skip
        yield h


def _mount(h: HostileVim, mnt: str, *extra: str) -> Any:
    return mounted(h, mnt, "--no-prefetch", "--timeout", "5", *extra, vm="web")


def test_hostile_listing_is_filtered(hostile: HostileVim, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt) as m:
        names = sorted(os.listdir(mnt))
        assert names == sorted(
            ["big.txt", "bomb", "endless", "links", "ok.txt", "samepage", "sub"]
        ), names
        assert os.stat(m.path("ok.txt")).st_size == 6  # the first of the duplicates
        with open(m.path("ok.txt"), "rb") as fh:
            assert fh.read() == b"hello\n"
        for bad in ("neg", "huge", "weird", "x" * 255, "a", "nul", "42", "garbage"):
            assert not os.path.lexists(os.path.join(mnt, bad)), bad
        with pytest.raises(OSError) as ei:
            os.stat(os.path.join(mnt, "x" * 256))
        assert ei.value.errno in (errno.ENAMETOOLONG, errno.ENOENT)
        text = m.stderr_text()
    assert text.count("skipped") == 1, text  # one log line, not one per entry


def test_symlinks_stay_contained(hostile: HostileVim, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt):
        real_mnt = os.path.realpath(mnt)
        for n in ("abs", "climb", "up", "upup", "self"):
            resolved = os.path.realpath(os.path.join(mnt, "links", n))
            assert resolved == real_mnt or resolved.startswith(real_mnt + "/"), (n, resolved)
        assert not os.path.exists(os.path.join(mnt, "links", "abs"))  # no /etc/passwd
        with pytest.raises(OSError) as ei:
            open(os.path.join(mnt, "links", "loop-a")).close()
        assert ei.value.errno == errno.ELOOP


@pytest.mark.parametrize("d", ["endless", "samepage"])
def test_endless_listing_ends_in_eio(hostile: HostileVim, tmp_path: Any, d: str) -> None:
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt) as m:
        with pytest.raises(OSError) as ei:
            os.listdir(m.path(d))
        assert ei.value.errno == errno.EIO
        assert hostile.calls_per_path[f"/{d}"] <= 10, hostile.calls_per_path
        assert sorted(os.listdir(m.path("sub"))) == ["ok.txt"]  # the mount still works


def _listing_with_doctype(doctype: str) -> httpx.Response:
    """A one-file ListFilesInGuest answer whose file name is the entity ``&x;``,
    defined by ``doctype``: a parser that expands entities shows it as a name."""
    body = (
        '<?xml version="1.0"?>' + doctype
        + '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        '<soapenv:Body><ListFilesInGuestResponse xmlns="urn:vim25"><returnval>'
        "<remaining>0</remaining><files><path>&x;</path><type>file</type><size>1</size>"
        "</files></returnval></ListFilesInGuestResponse></soapenv:Body></soapenv:Envelope>"
    )  # fmt: skip
    return httpx.Response(200, content=body.encode(), headers={"content-type": "text/xml"})


def _entity_bomb() -> httpx.Response:
    nested = "".join(
        f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
        for p, c in zip("abcdefgh", "bcdefghx", strict=True)
    )
    return _listing_with_doctype(f'<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">{nested}]>')


def _xxe() -> httpx.Response:
    return _listing_with_doctype('<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>')


def _entity() -> httpx.Response:
    # harmless on its face: a stdlib parser would expand it and list "injected.txt"
    return _listing_with_doctype('<!DOCTYPE r [<!ENTITY x "injected.txt">]>')


def _bad_json() -> httpx.Response:
    return httpx.Response(
        200, content=b'{"_typeName": "GuestListFileInfo", "files": [{"path": "x"',
        headers={"content-type": "application/json"},
    )  # fmt: skip


def _huge(api: str) -> httpx.Response:
    # a well-formed page padded past the reply cap (8 MiB): only the cap refuses it
    pad = " " * (9 << 20)
    if api == "vi-json":
        page = {"_typeName": "GuestListFileInfo", "files": [posix_file("padded.txt")],
                "remaining": 0}  # fmt: skip
        text = json.dumps(page)
        return httpx.Response(200, content=(text[:-1] + pad + "}").encode(),
                              headers={"content-type": "application/json"})  # fmt: skip
    body = (
        '<?xml version="1.0"?>'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        '<soapenv:Body><ListFilesInGuestResponse xmlns="urn:vim25"><returnval>'
        "<remaining>0</remaining><files><path>padded.txt</path><type>file</type>"
        "<size>1</size></files>" + pad + "</returnval></ListFilesInGuestResponse>"
        "</soapenv:Body></soapenv:Envelope>"
    )  # fmt: skip
    return httpx.Response(200, content=body.encode(), headers={"content-type": "text/xml"})


@pytest.mark.parametrize("kind", ["bomb", "xxe", "entity", "malformed", "huge"])
def test_bad_body_gives_eio_and_mount_keeps_working(
    hostile: HostileVim, tmp_path: Any, kind: str
) -> None:
    if kind in ("bomb", "xxe", "entity") and hostile.api != "soap":
        pytest.skip("XML entity tricks are a SOAP matter")
    answers = {"bomb": _entity_bomb, "xxe": _xxe, "entity": _entity, "malformed": _bad_json}
    answer = answers.get(kind, lambda: _huge(hostile.api))
    hostile.raw["/bomb"] = answer  # a listing
    hostile.raw["/big.txt"] = answer  # an open
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt) as m:
        with pytest.raises(OSError) as ei:
            os.listdir(m.path("bomb"))
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError) as ei, open(m.path("big.txt"), "rb") as fh:
            fh.read()
        assert ei.value.errno == errno.EIO
        assert sorted(os.listdir(m.path("sub"))) == ["ok.txt"]
        with open(m.path("ok.txt"), "rb") as fh:
            assert fh.read() == b"hello\n"
        text = m.stderr_text()
    assert "Traceback" not in text
    assert "root:" not in text  # the XXE target never read


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/guestFile?id=1&token=UrLtOkEnXyZ",
        "http://198.51.100.7:80/guestFile?id=1&token=UrLtOkEnXyZ",
        "http://*:22/guestFile?id=1&token=UrLtOkEnXyZ",
    ],
    ids=["foreign-host", "foreign-http", "untrusted-port"],
)
def test_untrusted_transfer_url_refused(hostile: HostileVim, tmp_path: Any, url: str) -> None:
    hostile.transfer_url["/ok.txt"] = url
    mnt = str(tmp_path / "m")
    with _mount(hostile, mnt) as m:
        with pytest.raises(OSError) as ei, open(m.path("ok.txt"), "rb") as fh:
            fh.read()
        assert ei.value.errno == errno.EACCES
        with open(m.path("sub", "ok.txt"), "rb") as fh:
            assert fh.read() == b"hello\n"
        text = m.stderr_text()
    assert "UrLtOkEnXyZ" not in text

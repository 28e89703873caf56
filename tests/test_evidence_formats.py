# mypy: disable-error-code="union-attr, operator"
# (ElementTree.find() is Optional; a missing element fails these tests with AttributeError.)
"""The export writers, from plain records, with hostile guest names; checked by the tools
that read each format (hashdeep's own header, mactime, xmllint with the DFXML schema)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from guestfs_mount.evidence import formats
from guestfs_mount.evidence.ledger import Ledger
from guestfs_mount.model import FileType, GuestStat
from guestfs_mount.paths import PosixPaths

S = 1_000_000_000
XSD = os.path.join(os.path.dirname(__file__), "data", "dfxml", "dfxml.xsd")
BAD = os.fsdecode(b"bad-\xff|%\x01name")


def _records() -> list[dict]:
    led = Ledger(root="/", paths=PosixPaths())
    led.saw("/", GuestStat(FileType.DIRECTORY, 4096, 10 * S, 11 * S, owner=0, group=0,
                           permissions=0o755))  # fmt: skip
    led.saw("/etc/hosts", GuestStat(FileType.FILE, 20, 1_500_000_000 * S, 1_600_000_000 * S,
                                    owner=0, group=0, permissions=0o644))  # fmt: skip
    led.saw(f"/odd/{BAD}", GuestStat(FileType.FILE, 0, 1_400_000_000 * S, 1_400_000_000 * S))
    led.saw("/odd/new\nline", GuestStat(FileType.FILE, 0, 1_400_000_000 * S, 1_400_000_000 * S))
    led.saw("/link", GuestStat(FileType.SYMLINK, 10, 5 * S, 5 * S, symlink_target="etc/hosts"))
    led.fetched("/etc/hosts", 20, 1_500_000_000 * S, "a" * 64, "b" * 32, 1_700_000_000.0)
    return list(led.records())


def _ctx() -> formats.Context:
    head = {"mountpoint": "/cases/m", "vcenter": "vc:443", "vm": "vm-42", "vm_name": "web01",
            "guest_root": "/", "case": {"case": "4711", "examiner": "Ann\nB", "notes": None}}  # fmt: skip
    return formats.Context(head, "guestfs-mount", "0.1.0", "guestfs-mount evidence /cases/m",
                           1_700_000_000.0, cwd="/cases")  # fmt: skip


def _write(fmt: str) -> tuple[bytes, formats.Skipped]:
    out, skipped = io.BytesIO(), formats.Skipped()
    formats.WRITERS[fmt](out, _ctx(), _records(), skipped)
    return out.getvalue(), skipped


def test_hashdeep_header_paths_and_skips():
    data, skipped = _write("hashdeep")
    lines = data.split(b"\n")
    assert lines[:2] == [b"%%%% HASHDEEP-1.0", b"%%%% size,md5,sha256,filename"]
    assert b"## Invoked from: /cases" in lines and b"## case: 4711" in lines
    assert b"## examiner: Ann B" in lines  # a newline in metadata cannot start a fake entry
    body = [x for x in lines if x and not x.startswith((b"%", b"#"))]
    assert body[0] == b"20," + b"b" * 32 + b"," + b"a" * 64 + b",/cases/m/etc/hosts"
    # Empty files hash to the digest of nothing; a name with a line break cannot be listed.
    assert body[1].endswith(os.fsencode(f"/cases/m/odd/{BAD}")) and len(body) == 2
    assert any("line break" in s for s in skipped)


def test_bodyfile_fields_and_escapes():
    data, _ = _write("bodyfile")
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    assert len(lines) == 5 and all(len(x.split("|")) == 11 for x in lines)
    hosts = next(x for x in lines if "/etc/hosts" in x).split("|")
    assert hosts == ["b" * 32, "/etc/hosts", "0", "r/rrw-r--r--", "0", "0", "20",
                     "1600000000", "1500000000", "0", "0"]  # fmt: skip
    assert any(x.split("|")[1] == "/odd/bad-\udcff%7C%25%5Cx01name" for x in lines)
    assert any(x.split("|")[1] == "/odd/new%5Cx0aline" for x in lines)
    link = next(x for x in lines if x.split("|")[1].startswith("/link"))
    assert link.split("|")[1] == "/link -> etc/hosts" and link.split("|")[3] == "l/l---------"


def test_bodyfile_timeline_from_mactime(tmp_path):
    data, _ = _write("bodyfile")
    body = tmp_path / "body.txt"
    body.write_bytes(data)
    res = subprocess.run(["mactime", "-b", str(body), "-z", "UTC", "-d", "2010-01-01"],
                         capture_output=True, check=True)  # fmt: skip
    out = res.stdout.decode("utf-8", "replace")
    # 1500000000 = 2017-07-14 02:40:00 UTC (mtime), 1600000000 = 2020-09-13 12:26:40 (atime)
    assert "Fri Jul 14 2017 02:40:00,20,m...,r/rrw-r--r--,0,0,0,\"/etc/hosts\"" in out
    assert "Sun Sep 13 2020 12:26:40,20,.a..,r/rrw-r--r--,0,0,0,\"/etc/hosts\"" in out
    assert '"/odd/new\\x0aline"' in out and '"/odd/bad-\ufffd|%\\x01name"' in out


def test_dfxml_is_schema_valid_with_hostile_names(tmp_path):
    data, _ = _write("dfxml")
    f = tmp_path / "out.dfxml"
    f.write_bytes(data)
    res = subprocess.run(["xmllint", "--noout", "--schema", XSD, str(f)], capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    ns = {"d": formats.DFXML_NS, "gm": formats.GM_NS}
    root = ET.fromstring(data)
    assert root.get("version") == formats.DFXML_VERSION
    assert root.find("d:metadata/gm:case", ns).text == "4711"
    assert root.find("d:creator/d:program", ns).text == "guestfs-mount"
    assert root.find("d:source", ns).get(f"{{{formats.GM_NS}}}vm") == "vm-42"
    objs = {o.find("d:filename", ns).text: o for o in root.findall("d:fileobject", ns)}
    hosts = objs["/etc/hosts"]
    assert hosts.find("d:hashdigest[@type='SHA256']", ns).text == "a" * 64
    assert hosts.find("d:mtime", ns).text == "2017-07-14T02:40:00Z"
    assert hosts.find("d:mtime", ns).get("prec") == "1"
    assert hosts.find("d:mode", ns).text == str(0o644)
    assert objs["/link"].find("d:link_target", ns).text == "etc/hosts"
    assert "/odd/bad-\\xff|%\\x01name" in objs
    assert objs["/"].find("d:hashdigest", ns) is None


def test_jsonl_is_exact():
    data, _ = _write("jsonl")
    docs = [json.loads(x) for x in data.splitlines()]
    assert docs[0]["type"] == "header" and docs[0]["case"] == "4711"
    names = {d["guest_path"] for d in docs[1:]}
    assert f"/odd/{BAD}" in names and "/odd/new\nline" in names  # guest bytes round-trip


@pytest.mark.parametrize("mode,want", [(0o104755, "r/rrwsr-xr-x"), (0o40700, "d/drwx------")])
def test_mode_string(mode, want):
    t = "DIRECTORY" if mode & 0o40000 else "FILE"
    assert formats.mode_string({"type": t, "mode": mode}) == want

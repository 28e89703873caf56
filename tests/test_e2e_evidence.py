# mypy: disable-error-code="union-attr, operator"
# (ElementTree.find() is Optional; a missing element fails these tests with AttributeError.)
"""``guestfs-mount evidence`` through the kernel: each export read by its real consumer
(hashdeep's audit, Sleuth Kit's mactime, xmllint with the DFXML schema), and the audit
log's chain checked after real mounts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from guestfs_mount.evidence import formats
from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import mounted
from tests import trees

pytestmark = pytest.mark.fuse

XSD = os.path.join(os.path.dirname(__file__), "data", "dfxml", "dfxml.xsd")
CASE = ["--case", "4711", "--examiner", "Ann Smith", "--evidence-id", "E-01", "--notes", "web01"]


def evidence(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guestfs_mount.cli", "evidence", *args],
                          capture_output=True, text=True, errors="replace")  # fmt: skip


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_hashdeep_manifest_audits_the_mount(sim, source, tmp_path):
    manifest = str(tmp_path / "manifest.hashdeep")
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt, *CASE) as m:
        with open(m.path("etc/hosts"), "rb") as f:
            f.read()
        res = evidence(mnt, "etc", "data", "--walk", "--format", "hashdeep", "-o", manifest)
        assert res.returncode == 0, res.stderr
        assert "files not fetched (--fetch reads them)" in res.stderr
        text = open(manifest).read()
        assert text.startswith("%%%% HASHDEEP-1.0\n%%%% size,md5,sha256,filename\n")
        assert "## case: 4711" in text and "## examiner: Ann Smith" in text
        # Only what was read has a hash (and an empty file: the digest of nothing).
        entries = [x for x in text.splitlines() if not x.startswith(("%", "#"))]
        real = os.path.realpath(mnt)
        assert {e.rsplit(",", 1)[1] for e in entries} == {f"{real}/etc/hosts", f"{real}/data/empty"}
        sim.reset_stats()
        res = evidence(mnt, "etc", "data", "--walk", "--fetch", "--format", "hashdeep",
                       "-o", manifest)  # fmt: skip
        assert res.returncode == 0, res.stderr
        fetched = sim.stats()["transfers"]["by_path"]
        assert "/etc/hosts" not in fetched and fetched.get("/data/one-mib.bin") == 1
        for rel in ("etc", "data"):
            audit = subprocess.run(["hashdeep", "-a", "-k", manifest, "-r", m.path(rel)],
                                   capture_output=True, text=True)  # fmt: skip
            assert audit.returncode != 0  # half the manifest is not under one directory
        audit = subprocess.run(["hashdeep", "-a", "-vv", "-k", manifest, "-r", m.path("etc"),
                                m.path("data")], capture_output=True, text=True)  # fmt: skip
        assert audit.returncode == 0 and "Audit passed" in audit.stdout + audit.stderr, audit.stdout
        # From inside the mount too (hashdeep makes the paths absolute).
        audit = subprocess.run(["hashdeep", "-a", "-k", manifest, "-r", "etc", "data"],
                               capture_output=True, text=True, cwd=mnt)  # fmt: skip
        assert audit.returncode == 0, audit.stdout
    line = next(x for x in open(manifest).read().splitlines() if x.endswith("/data/odd-size.bin"))
    size, md5, sha, _ = line.split(",", 3)
    with open(os.path.join(source, "data/odd-size.bin"), "rb") as f:
        data = f.read()
    assert (int(size), md5, sha) == (len(data), hashlib.md5(data).hexdigest(), _sha(f.name))


def test_walk_bodyfile_gives_the_guest_timeline_without_transfers(sim, tmp_path):
    body = str(tmp_path / "body.txt")
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt) as m:
        sim.reset_stats()
        res = evidence(mnt, m.path("data"), "--walk", "--format", "bodyfile", "-o", body)
        assert res.returncode == 0, res.stderr
        assert sim.stats()["transfers"]["by_path"] == {}  # metadata only
    lines = open(body, "rb").read().decode().splitlines()
    names = {x.split("|")[1] for x in lines}
    assert {"/data", "/data/nested/a.txt", "/data/nested/deeper/b.txt", "/data/empty"} <= names
    assert not any(n.startswith("/etc") for n in names)
    a = next(x for x in lines if x.split("|")[1] == "/data/nested/a.txt").split("|")
    assert a[0] == "0" and a[3:7] == ["r/rrw-r-----", "1234", "5678", "6"]
    out = subprocess.run(["mactime", "-b", body, "-z", "UTC", "-d", "2000-01-01"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    # small.txt: atime 1600000000.12, mtime 1500000000.98 in the guest
    assert 'Fri Jul 14 2017 02:40:00,120,m...,r/rrw-r--r--,0,0,0,"/data/small.txt"' in out
    assert 'Sun Sep 13 2020 12:26:40,120,.a..,r/rrw-r--r--,0,0,0,"/data/small.txt"' in out


def test_dfxml_validates_and_names_its_source(sim, source, tmp_path):
    out = str(tmp_path / "out.dfxml")
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt, *CASE) as m:
        with open(m.path("data/small.txt"), "rb") as f:
            f.read()
        res = evidence(mnt, "--walk", "--format", "dfxml", "-o", out)
        assert res.returncode == 0, res.stderr
    lint = subprocess.run(["xmllint", "--noout", "--schema", XSD, out], capture_output=True,
                          text=True)  # fmt: skip
    assert lint.returncode == 0, lint.stderr
    ns = {"d": formats.DFXML_NS, "gm": formats.GM_NS}
    root = ET.parse(out).getroot()
    assert root.find("d:metadata/gm:evidence_id", ns).text == "E-01"
    assert "--format dfxml" in root.find("d:creator/d:execution_environment/d:command_line",
                                         ns).text  # fmt: skip
    src = root.find("d:source", ns)
    assert src.get(f"{{{formats.GM_NS}}}vm") == sim.vms[0]["vm"]
    assert src.get(f"{{{formats.GM_NS}}}guest_root") == "/"
    objs = {o.find("d:filename", ns).text: o for o in root.findall("d:fileobject", ns)}
    small = objs["/data/small.txt"]
    assert small.find("d:hashdigest[@type='SHA256']", ns).text == _sha(
        os.path.join(source, "data/small.txt"))
    assert small.find("d:mtime", ns).text == "2017-07-14T02:40:00Z"
    assert objs["/data/one-mib.bin"].find("d:hashdigest", ns) is None  # never read
    assert objs["/links/relative"].find("d:link_target", ns).text == "../etc/hosts"
    assert objs["/data/nested/a.txt"].find("d:uid", ns).text == "1234"


def test_jsonl_and_errors(sim, tmp_path):
    mnt = str(tmp_path / "m")
    # REST: the only transport that carries non-UTF-8 names (vim25 answers are XML/JSON).
    with mounted(sim, mnt, "--api", "rest", *CASE):
        res = evidence(mnt, "names", "--walk", "--format", "jsonl")
        assert res.returncode == 0, res.stderr
        docs = [json.loads(x) for x in res.stdout.splitlines()]
        assert docs[0]["case"] == "4711" and docs[0]["vm"] == sim.vms[0]["vm"]
        names = {d["guest_path"] for d in docs[1:]}
        assert {"/names/" + n for n in trees.ODD_NAMES} <= names
        res = evidence(mnt, "/elsewhere", "--format", "jsonl")
        assert res.returncode == 2 and "not on the mount" in res.stderr
    res = evidence(mnt, "--format", "jsonl")
    assert res.returncode == 2 and "no running mount" in res.stderr


def test_audit_log_chain_over_two_mounts_and_tampering(sim, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    with mounted(sim, str(tmp_path / "m1"), "--audit-log", audit, *CASE) as m1, \
            mounted(sim, str(tmp_path / "m2"), "--audit-log", audit, "--case", "4712") as m2:
        for m in (m1, m2, m1):
            for rel in ("etc/hosts", "data/small.txt", "data/nested/a.txt"):
                with open(m.path(rel), "rb") as f:
                    f.read()
    res = evidence("--verify-log", audit)
    assert res.returncode == 0, res.stdout
    assert "in 2 chain(s)" in res.stdout and res.stdout.count(", closed;") == 2
    lines = open(audit, "rb").read().splitlines(keepends=True)
    head = json.loads(lines[0])
    assert head["type"] == "header" and head["case"] in ("4711", "4712")
    n = next(i for i, x in enumerate(lines) if b'"path":"/data/small.txt"' in x)
    edited = list(lines)
    edited[n] = edited[n].replace(b'"result":"ok"', b'"result":"ok" ')
    with open(audit, "wb") as f:
        f.writelines(edited)
    res = evidence("--verify-log", audit)
    assert res.returncode == 1 and f"its 'prev' is not the SHA-256 of line {n + 1}" in res.stdout
    with open(audit, "wb") as f:
        f.writelines(lines[:n] + lines[n + 1 :])
    res = evidence("--verify-log", audit)
    assert res.returncode == 1 and "lines were removed" in res.stdout


def test_hashdeep_lists_symlinks_to_files_as_hashdeep_follows_them(sim, tmp_path):
    manifest = str(tmp_path / "links.hashdeep")
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt) as m:
        res = evidence(mnt, "links", "etc", "--walk", "--fetch", "--format", "hashdeep",
                       "-o", manifest)  # fmt: skip
        assert res.returncode == 0, res.stderr
        names = {x.rsplit(",", 1)[1] for x in open(manifest).read().splitlines()
                 if not x.startswith(("%", "#"))}  # fmt: skip
        real = os.path.realpath(mnt)
        assert names == {f"{real}/{p}" for p in ("etc/hosts", "etc/shadow", "links/relative",
                                                  "links/absolute", "links/climbing")}  # fmt: skip
        files = ["etc/hosts", "etc/shadow", "links/relative", "links/absolute", "links/climbing"]
        audit = subprocess.run(["hashdeep", "-a", "-k", manifest, *files], capture_output=True,
                               text=True, cwd=m.path())  # fmt: skip
        assert audit.returncode == 0, audit.stdout + audit.stderr


def test_windows_guest_exports_birth_times_and_drive_paths(tmp_path):
    drive = tmp_path / "c-drive"
    (drive / "Users" / "Admin").mkdir(parents=True)
    (drive / "Users" / "Admin" / "Report.TXT").write_bytes(b"quarterly numbers\n")
    body, manifest = str(tmp_path / "win.body"), str(tmp_path / "win.hashdeep")
    with run_simulator("--windows-vm", f"win={drive}") as sim:
        mnt = str(tmp_path / "m")
        with mounted(sim, mnt, "--guest-root", sim.guest_root("win"), vm="win") as m:
            res = evidence(mnt, "Users", "--walk", "--format", "bodyfile", "-o", body)
            assert res.returncode == 0, res.stderr
            res = evidence(mnt, "Users", "--fetch", "--format", "hashdeep", "-o", manifest)
            assert res.returncode == 0, res.stderr
            audit = subprocess.run(["hashdeep", "-a", "-k", manifest, "-r", m.path("Users")],
                                   capture_output=True, text=True)  # fmt: skip
            assert audit.returncode == 0, audit.stdout + audit.stderr
    report = next(x.split("|") for x in open(body).read().splitlines() if "Report" in x)
    assert report[1] == "C:\\Users\\Admin\\Report.TXT"
    assert report[4:6] == ["0", "0"]  # no owners on Windows
    assert int(report[10]) > 0  # crtime: Windows reports a creation time
    assert int(report[9]) == 0  # ctime: never reported


def test_large_file_hashed_on_the_hash_threads(sim, tmp_path):
    big = os.path.join(sim.root(), "data", "big.bin")
    trees.write_random_file(big, 20 << 20)  # above the size hashed on threads of its own
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt):
        res = evidence(mnt, "data/big.bin", "--walk", "--fetch", "--format", "jsonl")
        assert res.returncode == 0, res.stderr
    (rec,) = [json.loads(x) for x in res.stdout.splitlines()[1:]]
    with open(big, "rb") as f:
        data = f.read()
    assert (rec["md5"], rec["sha256"]) == (hashlib.md5(data).hexdigest(), _sha(big))

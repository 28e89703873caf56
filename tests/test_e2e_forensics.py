"""Forensic workflow end to end: audit log, hash xattrs, --frozen, status."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from guestfs_mount.testing import mounted
from tests import trees

pytestmark = pytest.mark.fuse


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_audit_log_records_each_transfer_with_its_hash(sim, source, tmp_path):
    audit = tmp_path / "audit.jsonl"
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt, "--audit-log", str(audit)) as m:
        for rel in ("etc/hosts", "data/one-mib.bin", "data/nested/a.txt"):
            with open(m.path(rel), "rb") as f:
                f.read()
        with open(m.path("etc/hosts"), "rb") as f:  # cached: no second transfer
            f.read()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[-1]["type"] == "end"
    lines = [rec for rec in lines if rec["type"] == "transfer"]
    by_path = {rec["path"]: rec for rec in lines}
    assert len(lines) == 3 and set(by_path) == {"/etc/hosts", "/data/one-mib.bin", "/data/nested/a.txt"}
    for path, rec in by_path.items():
        src = os.path.join(source, path.lstrip("/"))
        assert rec["result"] == "ok"
        assert rec["sha256"] == _sha(src)
        assert rec["md5"] == hashlib.md5(open(src, "rb").read()).hexdigest()
        assert rec["size"] == rec["bytes"] == os.path.getsize(src)
        assert rec["vm"] == sim.vms[0]["vm"] and rec["vm_name"] == sim.vms[0]["name"]
        assert rec["time"].endswith("Z") and rec["mtime"].endswith("Z")
    assert oct(os.stat(audit).st_mode & 0o777) == "0o600"


def test_audit_log_records_failures(sim, tmp_path):
    audit = tmp_path / "audit.jsonl"
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt, "--audit-log", str(audit)) as m:
        sim.faults(abort_after={"bytes": 1000, "count": 1})
        with pytest.raises(OSError), open(m.path("data/one-mib.bin"), "rb") as f:
            f.read()
        sim.reset_faults()
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    recs = [rec for rec in recs if rec["type"] == "transfer"]
    assert recs[0]["result"] == "error" and recs[0]["sha256"] is None and "error" in recs[0]


def test_sha256_xattrs_match_sha256sum(sim, source, tmp_path):
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt) as m:
        p = m.path("data/odd-size.bin")
        out = subprocess.run(["sha256sum", p], capture_output=True, text=True, check=True).stdout
        assert os.getxattr(p, "user.guestfs.sha256").decode() == out.split()[0]
        assert out.split()[0] == _sha(os.path.join(source, "data/odd-size.bin"))
        assert os.getxattr(p, "user.guestfs.guest_path") == b"/data/odd-size.bin"
        when = os.getxattr(p, "user.guestfs.transfer_time").decode()
        assert when.endswith("Z") and when.startswith("20")
        names = set(os.listxattr(p))
        assert {"user.guestfs.sha256", "user.guestfs.guest_path", "user.guestfs.transfer_time"} <= names
        # Before any read there is no hash to show, only the path.
        q = m.path("data/small.txt")
        assert "user.guestfs.sha256" not in os.listxattr(q)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_keeps_first_view(sim, source, tmp_path, frozen):
    mnt = str(tmp_path / "m")
    extra = ["--metadata-ttl", "0.5"] + (["--frozen"] if frozen else [])
    with mounted(sim, mnt, *extra) as m:
        with open(m.path("data/small.txt"), "rb") as f:
            before = f.read()
        listing_before = sorted(os.listdir(m.path("data")))
        with open(os.path.join(source, "data/small.txt"), "wb") as f:
            f.write(b"changed in the guest, longer than before\n" * 5)
        with open(os.path.join(source, "data/added.txt"), "wb") as f:
            f.write(b"new")
        time.sleep(1.5)
        with open(m.path("data/small.txt"), "rb") as f:
            after = f.read()
        listing_after = sorted(os.listdir(m.path("data")))
    if frozen:
        assert after == before and listing_after == listing_before
    else:
        assert after != before and "added.txt" in listing_after


def test_status_shows_mount_and_transfer_in_flight(sim, tmp_path):
    mnt = str(tmp_path / "m")
    big = os.path.join(sim.root(), "data", "status.bin")
    trees.write_random_file(big, 32 << 20)
    sim.faults(bandwidth=4 << 20)
    try:
        with mounted(sim, mnt) as m:
            t = threading.Thread(target=lambda: open(m.path("data/status.bin"), "rb").read(),
                                 daemon=True)
            t.start()
            deadline = time.monotonic() + 20
            docs = []
            while time.monotonic() < deadline:
                res = subprocess.run([sys.executable, "-m", "guestfs_mount.cli", "status", "--json", mnt],
                                     capture_output=True, text=True)
                assert res.returncode == 0, res.stderr
                docs = json.loads(res.stdout)
                if docs and docs[0]["transfers"]:
                    break
                time.sleep(0.2)
            doc = docs[0]
            assert doc["mountpoint"] == os.path.realpath(mnt)
            assert doc["vm"] == sim.vms[0]["vm"]
            tr = doc["transfers"][0]
            assert tr["path"] == "/data/status.bin" and tr["total"] == 32 << 20
            assert 0 <= tr["done"] < tr["total"]
            human = subprocess.run([sys.executable, "-m", "guestfs_mount.cli", "status"],
                                   capture_output=True, text=True).stdout
            assert ("/data/status.bin" in human and "demo" in human) or sim.vms[0]["name"] in human
            sim.reset_faults()
            t.join(timeout=30)
    finally:
        sim.reset_faults()
    res = subprocess.run([sys.executable, "-m", "guestfs_mount.cli", "status", mnt],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "no running mount" in res.stderr

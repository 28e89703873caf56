"""``guestfs-mount status`` as a person reads it: aligned, human units, no Python reprs."""

from __future__ import annotations

import json

from guestfs_mount import status
from guestfs_mount.units import duration, size

NOW = 1_700_000_000.0
DOC = {
    "mountpoint": "/mnt/web01",
    "vcenter": "vc.example.com:443",
    "transport": "soap",
    "transport_reason": "auto: VMware ESXi 8.0.2 (standalone ESXi host) answers SOAP at /sdk\n",
    "vm": "vm-42",
    "vm_name": "web01",
    "guest_root": "/",
    "pid": 4242,
    "started": NOW - 3725,
    "frozen": True,
    "transfers": [
        {"path": "/var/log/big.log", "done": 512 << 20, "received": 512 << 20,
         "total": 1 << 30, "bytes_per_second": 100 << 20, "eta_seconds": 5.2,
         "readers": 2, "prefetch": False, "started": NOW - 5},
        {"path": "/evil\n\x1b[2Jname", "done": 0, "received": 0, "total": 64 << 20,
         "bytes_per_second": 0, "eta_seconds": None, "readers": 1, "prefetch": False,
         "started": NOW - 1},
    ],
    "cache": {
        "dir": "/tmp/guestfs-mount-x",
        "usage": 3 << 30,
        "max_bytes": 8 << 30,
        "stats": {"hits": 17, "joins": 1, "misses": 40, "downloads": 38, "failures": 2,
                  "cancelled": 0, "evictions": 0, "bytes_downloaded": 3 << 30,
                  "prefetches": 0, "prefetch_used": 0, "prefetch_refused": 0},
    },
    "api": {"calls": {"stat": 100, "list": 20, "transfer": 40},
            "errors": {"ResourceBusy": 3}, "retries": 3, "relogins": 0,
            "bytes_downloaded": 3 << 30, "downloads": 40},
    "metadata": {"stat_calls": 100, "list_calls": 20, "stat_hits": 300, "list_hits": 60},
    "inodes": 512,
}  # fmt: skip


def test_render_for_a_person():
    text = status.render(DOC, now=NOW)
    lines = text.splitlines()
    assert lines[0] == "/mnt/web01"
    assert "{" not in text and "'" not in text  # no dict or string reprs
    fields = dict(line.split(None, 1) for line in lines[1:] if line.startswith("  ") and not line.startswith("    "))
    assert fields["vm"] == "web01 (vm-42) on vc.example.com:443"
    assert "pid 4242, up 1h 02m, frozen" in fields["daemon"]
    assert fields["cache"].startswith("3.0 GiB of 8.0 GiB, 38 downloads (3.0 GiB), 17 served from cache, 2 failed")
    assert fields["api"] == "160 calls, 3 errors (ResourceBusy 3), 3 retries"
    assert fields["metadata"] == "100 stats and 20 listings fetched, 75% answered from cache"
    assert fields["transfers"] == "2 in flight"
    assert fields["transport"] == (
        "soap (auto: VMware ESXi 8.0.2 (standalone ESXi host) answers SOAP at /sdk\\x0a)"
    )
    column = len("  guest root  ")  # every value starts in the same column
    assert all(line[column - 1] == " " != line[column] for line in lines[1:8])
    rows = [line for line in lines if line.startswith("    ")]
    assert rows[0].split() == ["/var/log/big.log", "512.0", "MiB", "/", "1.0", "GiB", "50%",
                               "100.0", "MiB/s", "eta", "5s", "2", "readers"]
    assert "\x1b" not in text and "/evil\\x0a\\x1b[2Jname" in rows[1]  # guest names escaped
    assert "eta ?" in rows[1]


def test_render_idle_mount():
    doc = dict(DOC, transfers=[], frozen=False, api={"calls": {}, "errors": {}})
    text = status.render(doc, now=NOW)
    assert "transfers   none in flight" in text
    assert "0 calls, no errors" in text and "frozen" not in text
    # a daemon that has not chosen yet (or an older one) says so, not "None"
    old = {k: v for k, v in doc.items() if not k.startswith("transport")}
    assert "transport   ?" in status.render(old, now=NOW)


def test_json_prints_everything(monkeypatch, capsys):
    monkeypatch.setattr(status, "sockets", lambda: iter(["/nonexistent.sock"]))
    monkeypatch.setattr(status, "ask", lambda path: DOC)
    assert status.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [DOC]
    assert status.main([]) == 0
    assert capsys.readouterr().out.startswith("/mnt/web01\n  vm ")


def test_units():
    assert [size(n) for n in (0, 1023, 1024, 1536 << 20, 5 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "5.0 TiB"]  # fmt: skip
    assert [duration(s) for s in (0, 59.9, 61, 3725, 90000)] == [
        "0s", "59s", "1m 01s", "1h 02m", "1d 01h"]  # fmt: skip

"""`guestfs-mount status` of a fleet mount: one line per VM that was used."""

from __future__ import annotations

from guestfs_mount.status import render


def test_fleet_status_lists_used_vms_and_why_one_failed():
    doc = {
        "mountpoint": "/mnt/vc",
        "vcenter": "vc:443",
        "fleet": {
            "vms": [
                {"dir": "web", "vm": "vm-1", "state": "ready", "roots": ["/"],
                 "guest_user": "root"},
                {"dir": "db", "vm": "vm-2", "state": "failed", "errno": "EACCES",
                 "error": "guest login refused: \x1b[31mbad"},
                {"dir": "idle", "vm": "vm-3", "state": "untouched"},
            ]
        },
    }  # fmt: skip
    out = render(doc, now=0)
    assert "3 VMs (1 failed, 1 ready, 1 untouched) on vc:443" in out
    assert "web (vm-1): ready, / as root" in out
    assert "db (vm-2): EACCES: guest login refused:" in out
    assert "\x1b" not in out
    assert "idle" not in out

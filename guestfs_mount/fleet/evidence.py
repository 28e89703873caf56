"""``guestfs-mount evidence`` on a fleet mount: every opened VM's ledger as one export.

Each VM keeps its own ledger (:attr:`FleetVm.ledger`, from its first access on); a record
of the fleet is that VM's record with ``path`` below the mount point (the VM's directory
first: ``web-01/etc/hosts``, ``win/C/Users``) and the VM named in ``vm``, ``vm_name`` and
``vm_dir``, so an export never leaves two VMs' ``/etc/passwd`` indistinguishable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .vm import FleetVm

__all__ = ["fleet_head", "fleet_records", "vm_relative"]


def vm_relative(vm: FleetVm, guest_path: str) -> str:
    """Guest ``path`` of ``vm`` as the fleet shows it below the VM's directory, '/'-
    separated ("" for its root): Linux ``/etc/hosts`` -> ``etc/hosts``, Windows
    ``C:\\Users`` -> ``C/Users`` (drives are the directory's entries)."""
    if not vm.windows:
        return guest_path.strip("/")
    drive, _, rest = guest_path.partition(":")
    rest = rest.replace("\\", "/").strip("/")
    return drive.upper() + ("/" + rest if rest else "")


def _opened(vms: Iterable[FleetVm]) -> list[FleetVm]:
    return sorted((v for v in vms if v.ledger is not None), key=lambda v: (v.dirname, v.vm))


def fleet_records(vms: Iterable[FleetVm]) -> Iterator[dict[str, Any]]:
    """The records of every VM that was opened, in mount-path order, built as consumed."""
    for vm in _opened(vms):
        assert vm.ledger is not None
        for rec in vm.ledger.records():
            rel = vm_relative(vm, rec["guest_path"])
            rec["path"] = f"{vm.dirname}/{rel}" if rel else vm.dirname
            rec.update(vm=vm.vm, vm_name=vm.name, vm_dir=vm.dirname)
            yield rec


def fleet_head(vms: Iterable[FleetVm]) -> dict[str, Any]:
    """What the export header says of the VMs: one entry per VM that was opened."""
    opened = _opened(vms)
    return {
        "vm": "*",
        "vm_name": f"all VMs ({len(opened)} opened)",
        "guest_root": "-",
        "vms": [
            {"vm": v.vm, "vm_name": v.name, "vm_dir": v.dirname, "guest_roots": sorted(v.roots)}
            for v in opened
        ],
        "dropped": sum(v.ledger.dropped for v in opened if v.ledger is not None),
    }

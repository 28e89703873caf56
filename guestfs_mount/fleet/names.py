"""Directory names for VMs: a VM name is guest-controlled text (whoever may rename a VM
in vCenter chooses it), so it is shown only when it is one safe, unique entry.

A name is kept as it is when it passes :func:`guestfs_mount.paths.name_problem`, holds
no control character, is not a name the fleet root uses itself (``.by-id``), is unique
in the inventory, and does not end the way generated names do (``~`` and a VM id of the
inventory). Any other VM is shown as ``NAME~ID``: the name with each unsafe character
replaced by ``_``, cut to fit ``NAME_MAX`` bytes, and the VM's id. Ids are unique and
hold no ``~``, so generated names are unique and never equal a kept one. The same
inventory always gives the same names; ``.by-id/ID`` is stable whatever happens to the
names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

from ..paths import NAME_MAX, name_problem

__all__ = ["BY_ID", "is_safe_id", "names_by_dir", "vm_dir_names"]

BY_ID = ".by-id"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/]")


def is_safe_id(vm: str) -> bool:
    """A VM id usable as a name and a suffix: vCenter's ``vm-42`` form, no ``~``."""
    return bool(_ID.match(vm))


def _clean(name: str) -> str:
    text = _UNSAFE.sub("_", name)
    return text.encode("utf-8", "replace").decode("utf-8", "replace")


def _generated(name: str, vm: str) -> str:
    suffix = "~" + vm
    room = NAME_MAX - len(suffix.encode())
    base = _clean(name)
    raw = base.encode("utf-8")[:room]
    # A cut inside a multi-byte character drops that character, never makes bad UTF-8.
    base = raw.decode("utf-8", "ignore")
    if base in ("", ".", ".."):
        base = "_" if base == "" else base.replace(".", "_")
    return base + suffix


def _plain_ok(name: str) -> bool:
    if name_problem(name) is not None or name == BY_ID:
        return False
    return not _UNSAFE.search(name) and not any(0x80 <= ord(c) < 0xA0 for c in name)


def vm_dir_names(vms: Iterable[tuple[str, str]]) -> dict[str, str]:
    """VM id -> its directory name, for ``(id, name)`` pairs with unique, safe ids."""
    pairs = list(vms)
    counts = Counter(name for _, name in pairs)
    ids = {vm for vm, _ in pairs}
    out: dict[str, str] = {}
    for vm, name in pairs:
        tail = name.rsplit("~", 1)[-1] if "~" in name else None
        if _plain_ok(name) and counts[name] == 1 and tail not in ids:
            out[vm] = name
        else:
            out[vm] = _generated(name, vm)
    return out


def names_by_dir(ids_to_names: Mapping[str, str]) -> dict[str, str]:
    """The inverse map (directory name -> VM id); names are unique by construction."""
    return {name: vm for vm, name in ids_to_names.items()}

"""The fleet's inode space: one number per (VM, guest path), stable for the mount.

Each VM's :class:`~guestfs_mount.fs.Operations` keeps using an inode table of its own
(:class:`VmInodes`), but its numbers come from here, so the numbers of all VMs never
collide and the fleet's FUSE layer finds the VM of any inode. The fleet root, its
``.by-id`` directory and its links belong to owner ``""``; a VM's directory is
``(vm, "")`` until the VM is opened, and then also its guest root (Linux ``/``).
"""

from __future__ import annotations

from ..inodes import ROOT_INODE, InodeTable

__all__ = ["FLEET", "InodeSpace", "VmInodes"]

FLEET = ""  # the owner of the fleet's own entries


class InodeSpace:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], int] = {(FLEET, "/"): ROOT_INODE}
        self._by_ino: dict[int, tuple[str, str]] = {ROOT_INODE: (FLEET, "/")}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def inode(self, owner: str, path: str) -> int:
        ino = self._by_key.get((owner, path))
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_key[(owner, path)] = ino
            self._by_ino[ino] = (owner, path)
        return ino

    def alias(self, owner: str, path: str, ino: int) -> None:
        """``(owner, path)`` is also inode ``ino`` (a Linux VM's directory is its ``/``)."""
        self._by_key[(owner, path)] = ino
        self._by_ino[ino] = (owner, path)

    def key(self, ino: int) -> tuple[str, str] | None:
        return self._by_ino.get(ino)


class VmInodes(InodeTable):
    """One VM's view of the space, in the shape :class:`~guestfs_mount.fs.Operations`
    uses (paths of that VM only; lookup counts kept per VM as before)."""

    def __init__(self, space: InodeSpace, vm: str) -> None:
        super().__init__()
        self._space = space
        self._vm = vm

    def __len__(self) -> int:
        return len(self._space)

    def inode(self, path: str) -> int:
        return self._space.inode(self._vm, path)

    def path(self, ino: int) -> str | None:
        key = self._space.key(ino)
        return key[1] if key is not None and key[0] == self._vm and key[1] else None

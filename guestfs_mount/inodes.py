"""Inode numbers: one per guest path, stable for the life of the mount.

A path keeps its number even after the kernel forgets it, so ``ls -i``, ``find
-inum`` and ``tar``/``rsync`` hard-link detection see consistent values; the cost is
one small dict entry per path ever seen. Lookup counts are tracked so the per-inode
state that *can* be dropped (the last content key) is dropped when the kernel forgets.
"""

from __future__ import annotations

ROOT_INODE = 1


class InodeTable:
    def __init__(self, root_path: str = "/") -> None:
        self._by_path: dict[str, int] = {root_path: ROOT_INODE}
        self._by_ino: dict[int, str] = {ROOT_INODE: root_path}
        self._lookups: dict[int, int] = {}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def inode(self, path: str) -> int:
        ino = self._by_path.get(path)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_path[path] = ino
            self._by_ino[ino] = path
        return ino

    def path(self, ino: int) -> str | None:
        return self._by_ino.get(ino)

    def add_lookup(self, ino: int, n: int = 1) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + n

    def forget(self, ino: int, n: int) -> bool:
        """Drop ``n`` lookups; True when the kernel holds no more references."""
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return False
        self._lookups.pop(ino, None)
        return True

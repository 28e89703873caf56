"""In-memory guests for the unit tests of the metadata cache and of read-ahead."""

from __future__ import annotations

from collections.abc import Callable

import trio

from guestfs_mount.errors import ListingStopped, NotFound, ResourceBusy
from guestfs_mount.model import DirEntry, FileType, GuestStat


class FakeGuest:
    def __init__(self, tree: dict[str, list[DirEntry]], delay: float = 0.01) -> None:
        self.tree = tree
        self.delay = delay
        self.stat_calls: list[str] = []
        self.list_calls: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self.fail: set[str] = set()
        self.page_size: int | None = None  # None: every listing in one page
        self.pages: dict[str, int] = {}

    async def list_dir(
        self, path: str, more: Callable[[int], bool] | None = None
    ) -> list[DirEntry]:
        """Served in pages of ``page_size`` (``pages`` counts them), one ``delay`` each,
        asking ``more`` between pages as the client's pager does."""
        self.list_calls.append(path)
        entries = self.tree.get(path)
        size = self.page_size or max(1, len(entries or ()))
        got: list[DirEntry] = []
        while True:
            await trio.sleep(self.delay)
            self.pages[path] = self.pages.get(path, 0) + 1
            if entries is None:
                raise NotFound("no such directory", path=path)
            got += entries[len(got) : len(got) + size]
            if len(got) >= len(entries):
                return got
            if more is not None and not more(len(got)):
                raise ListingStopped(f"list {path}: stopped after {len(got)} entries")

    async def stat(self, path: str) -> GuestStat:
        self.stat_calls.append(path)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.sleep(self.delay)
            if path in self.fail:
                raise ResourceBusy("busy", path=path)
            if path in self.tree:
                return GuestStat(FileType.DIRECTORY, 4096, 0, 0)
            parent, _, name = path.rpartition("/")
            for e in self.tree.get(parent or "/", []):
                if e.name == name:
                    return GuestStat(e.type, e.size, 10**9, 10**9, permissions=0o640)
            raise NotFound("nope", path=path)
        finally:
            self.in_flight -= 1


def big_tree(n: int = 100) -> dict[str, list[DirEntry]]:
    return {
        "/": [DirEntry("d", FileType.DIRECTORY, 0)]
        + [DirEntry(f"f{i}", FileType.FILE, i) for i in range(n)],
        "/d": [DirEntry("sub1", FileType.DIRECTORY, 0), DirEntry("sub2", FileType.DIRECTORY, 0)],
        "/d/sub1": [DirEntry("x", FileType.FILE, 1)],
        "/d/sub2": [DirEntry("y", FileType.FILE, 2)],
    }

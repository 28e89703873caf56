"""Background work has a budget per user request (issue 10 item 5), through the kernel.

A hostile server with 32 directories of 200,000 files (tests/hostile_server.py,
``WideVCenter``); ``ls; ls wide0``. The opendir of wide0 lists its 31 siblings ahead, which
nobody reads: before the early stop, the listings in flight when the entries budget ran
out ran to their last page (2 x 200 pages), after it they stop within the budget.
The pages the server served are counted once they stop growing.

A tree of 8 directories x 5,000 files; ``ls -l /srv; ls /srv/d0`` on a fresh mount. Before
the budget the mount made 41 list calls and 35,009 stat calls within 60 s over REST: the
``ls`` of d0 listed its 7 sibling directories ahead (list-ahead) and stat'ed their 35,000
entries ahead (stat-ahead), none of which the user asked for. Guest calls are counted on
the simulator (``/_sim/stats``) once they stop growing; no timing is asserted.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.meta import Budget
from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mounted
from tests.hostile_server import WideVCenter
from tests.hostile_vim_server import HostileVim, posix_file

pytestmark = pytest.mark.fuse

DIRS, FILES = 8, 5_000
PAGE = 1_000  # the client's REST page size (ClientConfig.list_page_size)
PAGES = -(-(FILES + 2) // PAGE)  # REST pages of one directory: its files, "." and ".."


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("wide")
    for d in range(DIRS):
        sub = root / "srv" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(FILES):
            (sub / f"f{f:04d}").write_bytes(b"x")
    with run_simulator("--root", str(root)) as s:
        yield s


def _calls(sim: Any, api: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for vm in sim.stats()["vms"].values():
        for kind, n in vm["calls_by_transport"].get(api, {}).items():
            out[kind] = out.get(kind, 0) + n
    return out


def _settled(sim: Any, api: str, limit: float = 60.0) -> dict[str, int]:
    """The guest calls once background work has stopped (no change for 2 s), or at
    ``limit`` seconds, whichever comes first: what the commands cost in total."""
    deadline = time.monotonic() + limit
    last = _calls(sim, api)
    while time.monotonic() < deadline:
        time.sleep(2)
        now = _calls(sim, api)
        if now == last:
            break
        last = now
    return last


@pytest.mark.parametrize("api", ["rest", "vi-json"])
def test_ls_l_then_ls_costs_what_the_two_commands_need(wide: Any, tmp_path: Any, api: str) -> None:
    with mounted(ViaApi(wide, api), str(tmp_path / "m")) as m:
        wide.reset_stats()
        srv = m.path("srv")
        out = subprocess.run(["ls", "-l", srv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.count("\nd") == DIRS, out.stderr
        names = os.listdir(m.path("srv", "d0"))
        assert len(names) == FILES
        calls = _settled(wide, api)
    lists, stats = calls.get("files.list", 0), calls.get("files.get", 0)
    print(f"{api}: ls -l /srv; ls /srv/d0: {lists} list calls, {stats} stat calls: {calls}")
    # What the two commands need: /srv looked up and listed, and its 8 entries stat'ed;
    # /srv/d0 listed. The simulator serves pages of at most 1,000 entries (both APIs), so
    # a directory of 5,000 files, "." and ".." is 6 pages. Over REST: 1 + 6 listings,
    # 8 + 1 stats (/srv itself). vim25 lists with attributes and has no stat call: "/" is
    # listed to stat /srv, so 2 + 6 listings and no stat.
    need_lists = 1 + PAGES if api == "rest" else 2 + PAGES
    need_stats = DIRS + 1 if api == "rest" else 0
    # The budget allows on top: listings ahead up to the entries budget (5,000 unread
    # entries, listings in flight included: 5 pages of 1,000), plus the page each of
    # those in flight may fetch past it; and one window of 64 unread background results
    # (the stat-ahead of what they listed; over vim25 the listings carried the stats).
    b = Budget()
    extra_lists = b.entries // PAGE + b.lists_in_flight
    assert lists <= need_lists + extra_lists, calls
    assert stats <= need_stats + 64, calls
    assert sum(calls.values()) <= need_lists + need_stats + extra_lists + 64, calls


class _WideVim(HostileVim):
    """WideVCenter's tree over vim25 (``remaining`` paging): ``pages`` per directory."""

    def __init__(self, api: str, dirs: int = 32, files: int = 200_000) -> None:
        super().__init__(api)
        self.dirs, self.files = dirs, files
        self.pages: dict[str, int] = {}
        self.fake.dirs["/"] = [
            posix_file(f"wide{i}", "directory", 4096, 0o40755) for i in range(dirs)
        ]
        for i in range(dirs):
            self.lists[f"/wide{i}"] = functools.partial(self._page, f"/wide{i}")

    def _page(self, path: str, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("matchPattern"):  # the stat of one entry: not a page of the listing
            return {"_typeName": "GuestListFileInfo", "files": [], "remaining": 0}
        self.pages[path] = self.pages.get(path, 0) + 1
        start, size = int(args.get("index") or 0), int(args.get("maxResults") or 50)
        stop = min(start + size, self.files)
        files = [posix_file(f"f{j:06d}", size=1) for j in range(start, stop)]
        return {"_typeName": "GuestListFileInfo", "files": files, "remaining": self.files - stop}

    def pages_served(self) -> int:
        return sum(self.pages.values())


def _wide(api: str) -> Any:
    return WideVCenter() if api == "rest" else _WideVim(api)


def _settled_pages(h: Any, limit: float = 120.0) -> int:
    """The list pages served once background work has stopped (as ``_settled``)."""
    deadline = time.monotonic() + limit
    last = h.pages_served()
    while time.monotonic() < deadline:
        time.sleep(3)
        now = h.pages_served()
        if now == last:
            break
        last = now
    return last


@pytest.mark.parametrize("api", ["rest", "vi-json"])
def test_listing_ahead_of_a_huge_directory_stops_within_the_budget(tmp_path: Any, api: str) -> None:
    h = _wide(api)
    with h, mounted(h, str(tmp_path / "m"), "--no-prefetch", "--timeout", "30", vm="web") as m:
        assert len(os.listdir(m.path())) == h.dirs  # the opendir of wide0 lists ahead
        out = subprocess.run(["ls", m.path("wide0")], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert out.returncode == 0 and out.stdout.count("\n") == h.files, out.stderr
        pages = _settled_pages(h)
        ahead = {d: n for d, n in h.pages.items() if d != "/wide0"}
        # A user ls of a directory whose listing ahead was stopped lists it whole.
        assert len(os.listdir(m.path("wide1"))) == h.files
    print(f"{api}: ls; ls wide0: {pages} list pages, {h.pages['/wide0']} wide0's; ahead: {ahead}")
    # wide0's own pages: REST pages of 1,000; vim25 asks for what "remaining" says is left
    # after the first page, up to ClientConfig.max_list_page (5,000)
    need = -(-h.files // PAGE) if api == "rest" else 1 + -(-(h.files - PAGE) // 5_000)
    assert h.pages["/wide0"] == need
    # Ahead: the unread entries budget in pages of 1,000 (vim25 pages are larger: fewer),
    # plus the page each listing in flight may fetch past it; the listings stopped are not
    # started again.
    b = Budget()
    assert sum(ahead.values()) <= b.entries // PAGE + b.lists_in_flight, ahead

"""Which transport a mount uses, and what each command costs over vim25, end to end.

``--api auto`` against the four kinds of server a user meets (a vCenter with VI/JSON, one
with SOAP only, a standalone ESXi host, a vCenter whose /sdk is off), as ``guestfs-mount
status`` reports it; then the guest calls of ``ls -lR``, ``find -ls``, ``du -s``,
``grep -r``, ``stat`` and ``cat`` on a Debian-root-like tree, counted on the simulator
(``/_sim/stats``, per VM and transport), each command on a fresh mount.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mounted
from tests import trees

pytestmark = pytest.mark.fuse

VIM = ("vi-json", "soap")


def _status(mnt: str) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "status", "--json", mnt],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    docs = json.loads(res.stdout)
    assert len(docs) == 1
    return dict(docs[0])


def _human_status(mnt: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "status", mnt],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return res.stdout


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("small"))
    trees.build(root)
    return root


@pytest.mark.parametrize(
    ("sim_args", "want", "says"),
    [
        ((), "vi-json", "VI/JSON"),
        (("--no-vi-json",), "soap", "vCenter"),
        (("--as-esxi",), "soap", "standalone ESXi host"),
        (("--no-vi-json", "--no-soap"), "rest", "no vim25 endpoint"),
    ],
    ids=["vcenter", "vcenter-without-vi-json", "esxi", "no-sdk"],
)
def test_auto_picks_the_cheapest_transport(
    small: str, tmp_path: Any, sim_args: tuple[str, ...], want: str, says: str
) -> None:
    # As a user types it: `guestfs-mount HOST VMNAME MNT` (for --as-esxi the host is the
    # ESXi host itself: no vCenter anywhere).
    with run_simulator("--root", small, *sim_args) as sim, mounted(sim, str(tmp_path / "m")) as m:
        with open(m.path("etc/hosts"), "rb") as f:
            assert f.read() == b"127.0.0.1 localhost\n"
        doc = _status(m.mnt)
        assert doc["transport"] == want
        assert doc["transport_reason"].startswith("auto: ") and says in doc["transport_reason"]
        assert f"transport   {want} (auto: " in _human_status(m.mnt)
        used = {t for v in sim.stats()["vms"].values() for t in v["calls_by_transport"]}
        assert used == {want}  # every guest call went the chosen way


def test_the_log_says_which_transport_and_why(small: str, tmp_path: Any) -> None:
    with (
        run_simulator("--root", small, "--no-vi-json") as sim,
        mounted(sim, str(tmp_path / "m")) as m,
    ):
        os.listdir(m.mnt)
        log = m.stderr_text()
    assert "vCenter API: soap (auto: " in log and "but not VI/JSON" in log


# --- what each command costs --------------------------------------------------------------


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    root = str(tmp_path_factory.mktemp("debian"))
    return root, trees.build_debian_like(root, dirs=300, files=3000)


@pytest.fixture(scope="module")
def debian_sim(debian: tuple[str, dict[str, int]]) -> Iterator[Any]:
    with run_simulator("--root", debian[0]) as s:
        yield s


def _guest_calls(sim: Any, api: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for vm in sim.stats()["vms"].values():
        for kind, n in vm["calls_by_transport"].get(api, {}).items():
            out[kind] = out.get(kind, 0) + n
    return out


def _cost(sim: Any, api: str, tmp_path: Any, *cmd: str) -> dict[str, int]:
    """Guest calls of ``cmd`` (run on the mount point) on a fresh mount, after start-up."""
    with mounted(ViaApi(sim, api), str(tmp_path / "m")) as m:
        sim.reset_stats()
        argv = [m.mnt if a == "MNT" else a for a in cmd]
        res = subprocess.run(argv, capture_output=True, timeout=300)
        assert res.returncode in (0, 1), res.stderr[-2000:]  # grep: 1 = no match
        calls = _guest_calls(sim, api)
    return calls


@pytest.mark.parametrize("api", VIM)
@pytest.mark.parametrize(
    "cmd",
    [("ls", "-lR", "MNT"), ("find", "MNT", "-ls"), ("du", "-s", "MNT")],
    ids=["ls-lR", "find-ls", "du-s"],
)
def test_walks_cost_one_listing_per_directory(
    debian: tuple[str, dict[str, int]], debian_sim: Any, tmp_path: Any, api: str,
    cmd: tuple[str, ...],
) -> None:  # fmt: skip
    dirs = debian[1]["dirs"]
    calls = _cost(debian_sim, api, tmp_path, *cmd)
    total = sum(calls.values())
    print(f"{api} {' '.join(cmd)}: {total} guest calls for {dirs} directories: {calls}")
    assert calls.get("files.list", 0) >= dirs  # it did walk the whole tree
    assert total <= 1.2 * dirs, calls


@pytest.mark.parametrize("api", VIM)
def test_grep_r_costs_one_call_per_file(
    debian: tuple[str, dict[str, int]], debian_sim: Any, tmp_path: Any, api: str
) -> None:
    root, made = debian
    files = sum(
        1 for d, _, names in os.walk(root) for n in names if not os.path.islink(os.path.join(d, n))
    )
    calls = _cost(debian_sim, api, tmp_path, "grep", "-r", "-c", "no-such-string", "MNT")
    total = sum(calls.values())
    print(f"{api} grep -r: {total} guest calls for {files} files, {made['dirs']} dirs: {calls}")
    assert calls.get("transfer.create", 0) >= 0.9 * files  # it did read the files
    assert total <= 1.2 * files, calls


@pytest.mark.parametrize("api", VIM)
def test_open_is_one_call_and_a_path_not_listed_costs_its_listings(
    small: str, tmp_path: Any, api: str
) -> None:
    with run_simulator("--root", small) as sim, mounted(ViaApi(sim, api), str(tmp_path / "m")) as m:
        sim.reset_stats()
        st = os.stat(m.path("data/nested/a.txt"))  # nothing listed yet
        assert (st.st_uid, st.st_gid, st.st_size) == (1234, 5678, 6)
        walked = _guest_calls(sim, api)
        # one listing per directory on the way (/, /data, /data/nested), no stat call
        assert walked == {"files.list": 3}, walked
        sim.reset_stats()
        for name in os.listdir(m.path("data/nested")):
            os.lstat(m.path("data/nested", name))  # listed with their attributes: no call
        assert _guest_calls(sim, api) == {}
        with open(m.path("data/nested/a.txt"), "rb") as f:
            assert f.read() == b"alpha\n"
        assert _guest_calls(sim, api) == {"transfer.create": 1}

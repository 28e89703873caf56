"""A kept cache (``--cache-dir DIR --keep-cache``) through the kernel: what an earlier mount
of the same VM fetched is served again with no transfer (counted on the simulator), and only
while its SHA-256 still matches; a changed guest file, a corrupt cache file, another VM with
the same name and id, a SIGKILLed daemon and a concurrent second mount are each handled."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mount_argv, mount_env, mounted, unmount, wait_for_mount

pytestmark = pytest.mark.fuse


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _transfers(sim: Any) -> dict[str, int]:
    by_path: dict[str, int] = sim.stats()["transfers"]["by_path"]
    return by_path


def _audit(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def _kept_files(cache: str) -> list[str]:
    return sorted(n for n in os.listdir(cache) if n.startswith("c"))


FILES = ("etc/hosts", "data/small.txt", "data/one-mib.bin")


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
def test_second_mount_reads_kept_files_without_transfers(sim, source, tmp_path, api, frozen):
    cache = str(tmp_path / "cache")
    log1, log2 = str(tmp_path / "audit1.jsonl"), str(tmp_path / "audit2.jsonl")
    opts = ["--cache-dir", cache, "--keep-cache", *(["--frozen"] if frozen else [])]
    via = ViaApi(sim, api)
    with mounted(via, str(tmp_path / "m1"), *opts, "--audit-log", log1) as m:
        first = {f: _read(m.path(f)) for f in FILES}
    assert {f: _read(os.path.join(source, f)) for f in FILES} == first
    sim.reset_stats()
    with mounted(via, str(tmp_path / "m2"), *opts, "--audit-log", log2) as m:
        again = {f: _read(m.path(f)) for f in FILES}
        xattr = os.getxattr(m.path("data/one-mib.bin"), "user.guestfs.sha256").decode()
    assert again == first
    assert _transfers(sim) == {}  # not one transfer: every byte came from the kept cache
    assert xattr == hashlib.sha256(first["data/one-mib.bin"]).hexdigest()
    fetched = {x["path"]: x for x in _audit(log1) if x.get("result") == "ok"}
    reused = {x["path"]: x for x in _audit(log2) if x.get("result") == "cached"}
    assert set(reused) == {"/" + f for f in FILES}
    for path, line in reused.items():
        assert line["sha256"] == fetched[path]["sha256"] == hashlib.sha256(
            first[path[1:]]).hexdigest()  # fmt: skip
        assert line["md5"] == fetched[path]["md5"]
        # The original transfer's time, not this mount's.
        assert fetched[path]["started"] <= line["transfer_time"] < _audit(log2)[0]["time"]
    check = subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "evidence", "--verify-log", log2],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.one_transport
def test_changed_guest_file_is_fetched_again(sim, source, tmp_path):
    cache = str(tmp_path / "cache")
    opts = ("--cache-dir", cache, "--keep-cache")
    with mounted(sim, str(tmp_path / "m1"), *opts) as m:
        _read(m.path("etc/hosts"))
        _read(m.path("data/small.txt"))
    with open(os.path.join(source, "etc/hosts"), "ab") as f:
        f.write(b"10.0.0.7 changed\n")
    sim.reset_stats()
    with mounted(sim, str(tmp_path / "m2"), *opts) as m:
        assert _read(m.path("etc/hosts")) == b"127.0.0.1 localhost\n10.0.0.7 changed\n"
        assert _read(m.path("data/small.txt")) == b"hello guest\n" * 10
    assert _transfers(sim) == {"/etc/hosts": 1}
    assert len(_kept_files(cache)) == 2  # the old version of /etc/hosts is gone


@pytest.mark.one_transport
def test_corrupt_kept_file_is_fetched_again_not_served(sim, source, tmp_path):
    cache = str(tmp_path / "cache")
    opts = ("--cache-dir", cache, "--keep-cache")
    with mounted(sim, str(tmp_path / "m1"), *opts) as m:
        good = _read(m.path("data/one-mib.bin"))
    [name] = _kept_files(cache)
    with open(os.path.join(cache, name), "r+b") as f:
        f.seek(4096)
        f.write(bytes([good[4096] ^ 0xFF]))  # same length, one byte changed
    sim.reset_stats()
    with mounted(sim, str(tmp_path / "m2"), *opts) as m:
        assert _read(m.path("data/one-mib.bin")) == good
        log = m.stderr_text()
    assert _transfers(sim) == {"/data/one-mib.bin": 1}
    assert "does not match its recorded SHA-256" in log
    with open(os.path.join(cache, _kept_files(cache)[0]), "rb") as f:
        assert f.read() == good


@pytest.mark.one_transport
def test_another_vm_with_the_same_name_and_id_gets_nothing(source, tmp_path):
    cache = str(tmp_path / "cache")
    opts = ("--cache-dir", cache, "--keep-cache")
    for i, uuid in enumerate(("4211aaaa-0000-4000-8000-000000000001",
                              "4211aaaa-0000-4000-8000-000000000002")):  # fmt: skip
        config = tmp_path / f"sim{i}.json"
        vm = {"name": "web", "vm": "vm-42", "root": source, "instance_uuid": uuid}
        config.write_text(json.dumps({"vms": [vm]}))
        with run_simulator("--config", str(config)) as sim:
            assert sim.vms[0]["instance_uuid"] == uuid
            with mounted(sim, str(tmp_path / f"m{i}"), *opts) as m:
                _read(m.path("etc/hosts"))
            assert _transfers(sim) == {"/etc/hosts": 1}  # the VM's a new one: fetched again


@pytest.mark.one_transport
def test_sigkill_mid_download_leaves_a_usable_cache(sim, source, tmp_path):
    cache = str(tmp_path / "cache")
    opts = ("--cache-dir", cache, "--keep-cache")
    mnt = str(tmp_path / "m1")
    os.mkdir(mnt)
    errlog = open(tmp_path / "m1.log", "wb")
    proc = subprocess.Popen(
        mount_argv(sim, mnt, "--foreground", *opts), env=mount_env(sim),
        stdout=errlog, stderr=errlog,
    )  # fmt: skip
    try:
        wait_for_mount(mnt, proc, 30)
        small = _read(os.path.join(mnt, "data/small.txt"))
        index = os.path.join(cache, "index")
        while not [n for n in os.listdir(index) if n.endswith(".json")]:
            assert proc.poll() is None
            time.sleep(0.01)  # the record is written just after the read returns
        before = _kept_files(cache)
        sim.faults(stall_body_after={"bytes": 2 << 20, "count": 1})
        reader = subprocess.Popen(["cat", os.path.join(mnt, "data/odd-size.bin")],
                                  stdout=subprocess.DEVNULL, stderr=errlog)  # fmt: skip
        while not [n for n in set(_kept_files(cache)) - set(before)
                   if os.path.getsize(os.path.join(cache, n)) > 0]:  # fmt: skip
            assert proc.poll() is None and reader.poll() is None, (tmp_path / "m1.log").read_text()
            time.sleep(0.01)  # until the download's first bytes are in its cache file
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.kill()
        reader.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sim.reset_faults()
        unmount(mnt, lazy=True)
        errlog.close()
    sim.reset_stats()
    with mounted(sim, str(tmp_path / "m2"), *opts) as m:
        assert _read(m.path("data/small.txt")) == small
        assert _read(m.path("data/odd-size.bin")) == _read(os.path.join(source, "data/odd-size.bin"))
    assert _transfers(sim) == {"/data/odd-size.bin": 1}  # the complete one was kept
    assert len(_kept_files(cache)) == 2  # the partial download was swept, not kept


@pytest.mark.one_transport
def test_second_concurrent_mount_on_the_same_cache_dir_is_refused(sim, tmp_path):
    cache = str(tmp_path / "cache")
    opts = ("--cache-dir", cache, "--keep-cache")
    with mounted(sim, str(tmp_path / "m1"), *opts) as m:
        _read(m.path("etc/hosts"))
        mnt2 = str(tmp_path / "m2")
        os.mkdir(mnt2)
        res = subprocess.run(mount_argv(sim, mnt2, "--foreground", *opts), env=mount_env(sim),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode != 0 and not os.path.ismount(mnt2)
        assert "in use by another mount that keeps its cache" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert _read(m.path("etc/hosts")) == b"127.0.0.1 localhost\n"  # the first one is fine


def test_frozen_mount_reproduces_the_earlier_view_of_what_was_fetched(sim, source, tmp_path, api):
    cache = str(tmp_path / "cache")
    # No prefetch: opening etc/hosts of a listed etc/ may fetch its next siblings, which
    # this test, counting transfers of etc/hosts alone, is not about.
    opts = ("--cache-dir", cache, "--keep-cache", "--frozen", "--no-prefetch")
    via = ViaApi(sim, api)
    old = b"127.0.0.1 localhost\n"
    with mounted(via, str(tmp_path / "m1"), *opts) as m:
        assert _read(m.path("etc/hosts")) == old
    with open(os.path.join(source, "etc/hosts"), "ab") as f:
        f.write(b"10.0.0.7 added since\n")
    os.utime(os.path.join(source, "etc/hosts"), ns=(1_700_000_000 * 10**9,) * 2)
    sim.reset_stats()
    with mounted(via, str(tmp_path / "m2"), *opts) as m:
        listed = {e.name: e.stat().st_size for e in os.scandir(m.path("etc"))}
        st = os.stat(m.path("etc/hosts"))
        assert _read(m.path("etc/hosts")) == old
    assert listed["hosts"] == st.st_size == len(old) and st.st_mtime_ns != 1_700_000_000 * 10**9
    assert "/etc/hosts" not in _transfers(sim)
    # Without --frozen the mount shows the guest as it is now.
    with mounted(via, str(tmp_path / "m3"), *opts[:3], "--no-prefetch") as m:
        assert _read(m.path("etc/hosts")) == old + b"10.0.0.7 added since\n"
    assert _transfers(sim) == {"/etc/hosts": 1}

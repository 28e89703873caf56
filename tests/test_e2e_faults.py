"""The fault matrix, end to end: a real kernel mount against the simulator with faults
injected through its admin API. Every test checks what a user sees: the errno of the
syscall, how long it blocked, and that no byte that differs from the guest ever shows.

Each test gets a fresh mount (``--no-prefetch`` so that faults hit the read under test,
``--timeout 5`` so that blocked syscalls are bounded quickly). Files are named per test:
the simulator's tree is shared by the module.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mounted, unmount

pytestmark = pytest.mark.fuse

MiB = 1 << 20
TIMEOUT = 5  # --timeout of every mount here
SLACK = 4  # scheduling slack on 2 busy cores
SIZE = 3 * MiB + 7  # bigger than the client's 1 MiB sink chunk: a cut comes after data


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("guest"))
    for d in ("f", "slow", "dirs"):
        os.makedirs(os.path.join(root, d))
    for i in range(40):
        with open(os.path.join(root, "f", f"{i:02d}.bin"), "wb") as f:
            f.write(os.urandom(SIZE))
    for i in range(6):
        with open(os.path.join(root, "slow", f"{i}.bin"), "wb") as f:
            f.write(os.urandom(16 * MiB))
    for i in range(20):
        d = os.path.join(root, "dirs", f"d{i:02d}")
        os.makedirs(d)
        with open(os.path.join(d, "x.txt"), "wb") as f:
            f.write(f"x{i}\n".encode())
    return root


@pytest.fixture(scope="module")
def server(source: str) -> Iterator[Any]:
    with run_simulator("--root", source) as s:
        yield s


@pytest.fixture(scope="module")
def sim(server: Any, api: str) -> Any:
    """The simulator as the module's mounts see it: through ``api``."""
    return ViaApi(server, api)


@pytest.fixture(autouse=True)
def _clean_sim(sim: Any) -> Iterator[None]:
    yield
    vm = sim.vm_id()
    sim.reset_faults()
    sim.power(vm, "POWERED_ON")
    sim.tools(vm, True)


class Files:
    """Hands out guest files no earlier test has read (the simulator tree is shared)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.used: set[str] = set()

    def fresh(self, sub: str = "f") -> str:
        for name in sorted(os.listdir(os.path.join(self.source, sub))):
            rel = f"{sub}/{name}"
            if rel not in self.used:
                self.used.add(rel)
                return rel
        raise RuntimeError(f"no unused file left in {sub}")

    def data(self, rel: str) -> bytes:
        with open(os.path.join(self.source, rel), "rb") as f:
            return f.read()


@pytest.fixture(scope="module")
def files(source: str, api: str) -> Files:  # per transport: each has its own mounts
    return Files(source)


@pytest.fixture
def mnt(sim: Any, tmp_path: Any) -> Iterator[Any]:
    with mounted(sim, str(tmp_path / "m"), "--no-prefetch", "--timeout", str(TIMEOUT)) as m:
        try:
            yield m
        finally:  # a stalled server would hold the unmount up
            sim.reset_faults()


def read_all(path: str, chunk: int = 128 * 1024) -> tuple[bytes, int | None]:
    """Read with os.read until EOF or an error: (bytes got, errno or None)."""
    got = bytearray()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return bytes(got), exc.errno
    try:
        while True:
            try:
                b = os.read(fd, chunk)
            except OSError as exc:
                return bytes(got), exc.errno
            if not b:
                return bytes(got), None
            got += b
    finally:
        try:
            os.close(fd)
        except OSError:  # ENOTCONN once the daemon is gone
            pass


def in_thread(fn: Callable[[], Any], timeout: float) -> tuple[Any, float]:
    """Run ``fn`` in a daemon thread; (result, seconds). Fails if it is still blocked."""
    box: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["result"] = exc
        box["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"syscall still blocked after {timeout}s"
    return box["result"], box["seconds"]


def assert_clean_failure(got: bytes, err: int | None, want: bytes, allowed: set[int]) -> None:
    """An error was reported, and every byte delivered before it was right."""
    assert err in allowed, (
        f"expected one of {sorted(errno.errorcode[e] for e in allowed)}, got {err and errno.errorcode.get(err)} after {len(got)} bytes"
    )
    assert got == want[: len(got)], "wrong bytes delivered before the error"
    assert len(got) < len(want)


def assert_reads_back(m: Any, rel: str, files: Files) -> None:
    got, err = read_all(m.path(rel))
    assert err is None, errno.errorcode.get(err or 0)
    assert got == files.data(rel)
    assert os.stat(m.path(rel)).st_size == len(got)


# --- transfer body faults -------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    "fault",
    [
        {"abort_after": {"bytes": 3 * MiB // 2}},
        {"abort_after": {"bytes": 1000}},
        {"truncate": {"bytes": 2 * MiB}},
        {"pad": {"bytes": 10}},
        {"pad": {"bytes": 2 * MiB}},
    ],
    ids=["cut-1.5M", "cut-1k", "short", "long-10", "long-2M"],
)
def test_body_fault_is_eio_never_partial(
    sim: Any, mnt: Any, files: Files, fault: dict[str, Any], chunked: bool
) -> None:
    rel = files.fresh()
    want = files.data(rel)
    sim.faults(omit_content_length=chunked, **fault)
    (got, err), secs = in_thread(lambda: read_all(mnt.path(rel)), TIMEOUT + SLACK)
    assert_clean_failure(got, err, want, {errno.EIO})
    # the kernel's idea of the size did not shrink (a short read would have done that)
    assert os.stat(mnt.path(rel)).st_size == len(want)
    sim.reset_faults()
    assert_reads_back(mnt, rel, files)  # the next open downloads again


def test_fault_on_concurrent_readers_of_one_file(sim: Any, mnt: Any, files: Files) -> None:
    """Several readers share one download: all of them see the error, none a short file."""
    rel = files.fresh()
    want = files.data(rel)
    sim.faults(abort_after={"bytes": 2 * MiB}, bandwidth=4 * MiB)
    results: list[tuple[bytes, int | None]] = []
    threads = [
        threading.Thread(target=lambda: results.append(read_all(mnt.path(rel))), daemon=True)
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + SLACK)
        assert not t.is_alive()
    assert len(results) == 4
    for got, err in results:
        if err is None:  # a reader that opened after the failure got a fresh download
            assert got == want
        else:
            assert_clean_failure(got, err, want, {errno.EIO})
    assert any(err is not None for _, err in results)
    sim.reset_faults()
    assert_reads_back(mnt, rel, files)


# --- the VM's state ------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["POWERED_OFF", "SUSPENDED"])
def test_power_off_during_read(sim: Any, mnt: Any, files: Files, state: str) -> None:
    vm = sim.vm_id()
    rel = files.fresh("slow")
    want = files.data(rel)
    other = files.fresh()
    sim.faults(bandwidth=4 * MiB)  # 16 MiB: still running when the VM goes away
    box: dict[str, Any] = {}

    def reader() -> None:
        box["res"] = read_all(mnt.path(rel))
        box["t"] = time.monotonic()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(1.0)
    t_off = time.monotonic()
    sim.power(vm, state)
    t.join(TIMEOUT + SLACK)
    assert not t.is_alive(), "reader blocked after the VM went away"
    got, err = box["res"]
    assert_clean_failure(got, err, want, {errno.EIO})
    assert box["t"] - t_off < 3.0, "the error was not prompt"
    # while off: a new file fails promptly too (not retried: the state will not change soon)
    (got2, err2), secs = in_thread(lambda: read_all(mnt.path(other)), TIMEOUT + SLACK)
    assert err2 == errno.EIO and got2 == b""
    assert secs < 3.0
    sim.power(vm, "POWERED_ON")
    sim.reset_faults()
    assert_reads_back(mnt, rel, files)  # no remount needed
    assert_reads_back(mnt, other, files)


def test_session_expiry_is_transparent(sim: Any, mnt: Any, files: Files) -> None:
    a, b, c = files.fresh(), files.fresh(), files.fresh("slow")
    assert_reads_back(mnt, a, files)
    sim.expire_sessions()
    assert sorted(os.listdir(mnt.path("dirs", "d00"))) == ["x.txt"]
    assert_reads_back(mnt, b, files)
    # expiry in the middle of a download: the transfer URL does not depend on the session
    sim.faults(bandwidth=8 * MiB)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", read_all(mnt.path(c))), daemon=True)
    t.start()
    time.sleep(0.7)
    sim.expire_sessions()
    os.stat(mnt.path("dirs", "d01", "x.txt"))  # a metadata call meanwhile: relogin
    t.join(10 + SLACK)
    assert not t.is_alive()
    got, err = box["r"]
    assert err is None and got == files.data(c)
    assert "Traceback" not in mnt.stderr_text()


def test_session_expiry_right_after_login(sim: Any, mnt: Any, files: Files) -> None:
    assert_reads_back(mnt, files.fresh(), files)
    sim.expire_sessions()  # e.g. vCenter restarted a second after we logged in
    assert sorted(os.listdir(mnt.path("dirs", "d11"))) == ["x.txt"]
    assert_reads_back(mnt, files.fresh(), files)


@pytest.mark.parametrize("kind", ["busy_next", "unavailable_next"])
def test_busy_few_calls_retried(sim: Any, mnt: Any, files: Files, kind: str) -> None:
    rel = files.fresh()
    before = sim.stats()["calls"]
    sim.faults(**{kind: 3})
    t0 = time.monotonic()
    assert_reads_back(mnt, rel, files)
    assert time.monotonic() - t0 < TIMEOUT
    assert sim.faults()[kind] == 0  # all three were hit and retried
    after = sim.stats()["calls"]
    if sim.api == "rest":  # the global counts are /api's; vim25 rejections are not in them
        assert sum(after.values()) - sum(before.values()) >= 5


def test_tools_briefly_not_running(sim: Any, files: Files, tmp_path: Any) -> None:
    """Tools off for 1 s. With --timeout 10 the retry budget is 5 s: more than the 2 s
    backoff cap past the outage. (With --timeout 5 the budget is 2.5 s and retry_call gives
    up when one jittered delay would end past it, though time is left: flaky.)"""
    vm = sim.vm_id()
    rel = files.fresh()
    with mounted(sim, str(tmp_path / "m"), "--no-prefetch", "--timeout", "10") as mnt:
        sim.tools(vm, False)
        timer = threading.Timer(1.0, sim.tools, (vm, True))
        timer.start()
        try:
            (got, err), secs = in_thread(lambda: read_all(mnt.path(rel)), 10 + SLACK)
        finally:
            timer.join()
    assert err is None and got == files.data(rel)
    assert secs >= 0.9  # it did wait for the tools


def test_busy_beyond_budget_fails_within_timeout(sim: Any, mnt: Any, files: Files) -> None:
    rel = files.fresh()
    sim.faults(busy_next=100_000)
    (got, err), secs = in_thread(lambda: read_all(mnt.path(rel)), TIMEOUT + SLACK)
    assert err in (errno.EAGAIN, errno.EIO, errno.ETIMEDOUT) and got == b""
    assert secs <= TIMEOUT + 1
    sim.reset_faults()
    assert_reads_back(mnt, rel, files)


# --- the server stops answering -------------------------------------------------------------


def _warm_dirs(m: Any, n: int) -> None:
    """List dirs/ so that lookups of dirs/dNN need no API call (known from the listing)."""
    assert len(os.listdir(m.path("dirs"))) >= n


def test_vcenter_stops_answering_then_recovers(sim: Any, mnt: Any, files: Files) -> None:
    """Every kind of blocked syscall returns within --timeout; then the mount recovers."""
    _warm_dirs(mnt, 20)
    rels = [files.fresh() for _ in range(2)]
    assert os.listdir(mnt.path("f"))  # f/ listed: opening f/NN needs a stat and a transfer
    sim.faults(stall_api=True)
    calls: list[Callable[[], Any]] = [
        lambda: read_all(mnt.path(rels[0])),  # open -> stat -> create transfer
        lambda: os.stat(mnt.path("dirs", "d12", "x.txt")),  # lookup in a new directory
        lambda: os.listdir(mnt.path("dirs", "d13")),  # opendir -> list
    ]
    outs: list[tuple[Any, float]] = []
    threads = [
        threading.Thread(target=lambda f=f: outs.append(in_thread(f, TIMEOUT + SLACK)))
        for f in calls
    ]
    for t in threads:  # concurrently: different directories, so the kernel runs them in parallel
        t.start()
    for t in threads:
        t.join(TIMEOUT + SLACK + 1)
    assert len(outs) == len(calls), "a syscall stayed blocked"
    for res, secs in outs:
        if isinstance(res, tuple):
            got, err = res
            assert got == b"" and err in (errno.ETIMEDOUT, errno.EIO), err
        else:
            assert isinstance(res, OSError), res
            assert res.errno in (errno.ETIMEDOUT, errno.EIO), res
        assert secs <= TIMEOUT + 1.5, f"blocked {secs:.1f}s with --timeout {TIMEOUT}"
    sim.reset_faults()
    deadline = time.monotonic() + 15
    while True:
        got, err = read_all(mnt.path(rels[1]))
        if err is None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert err is None and got == files.data(rels[1]), "no recovery after vCenter came back"
    assert sorted(os.listdir(mnt.path("dirs", "d13"))) == ["x.txt"]
    assert_reads_back(mnt, rels[0], files)


def test_breaker_fails_fast_while_vcenter_down(sim: Any, mnt: Any) -> None:
    _warm_dirs(mnt, 20)
    sim.faults(stall_api=True)
    # six timeouts at once (six directories: the kernel runs them in parallel), more than
    # the breaker's threshold of five consecutive transport failures
    outs: list[tuple[Any, float]] = []
    threads = [
        threading.Thread(
            target=lambda i=i: outs.append(
                in_thread(lambda: read_all(mnt.path("dirs", f"d{i:02d}", "x.txt")), 9)
            )
        )
        for i in range(14, 20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(outs) == 6 and all(r[1] in (errno.ETIMEDOUT, errno.EIO) for r, _ in outs)
    (got, err), secs = in_thread(lambda: read_all(mnt.path("dirs", "d11", "x.txt")), 9)
    assert err in (errno.EIO, errno.ETIMEDOUT)
    assert secs < 1.0, f"no fail-fast while vCenter stays down: blocked {secs:.1f}s"


def test_concurrent_lookups_in_one_directory_bounded(sim: Any, mnt: Any) -> None:
    sim.faults(stall_api=True)
    outs: list[tuple[Any, float]] = []
    names = ["nope-a", "nope-b"]
    threads = [
        threading.Thread(
            target=lambda n=n: outs.append(in_thread(lambda: read_all(mnt.path(n)), 3 * TIMEOUT))
        )
        for n in names
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * TIMEOUT + 1)
    assert len(outs) == 2
    assert max(secs for _, secs in outs) <= TIMEOUT + 1.5, [round(s, 1) for _, s in outs]


def test_esxi_stalls_mid_body(sim: Any, mnt: Any, files: Files) -> None:
    rel = files.fresh()
    want = files.data(rel)
    sim.faults(stall_body_after={"bytes": 3 * MiB // 2})
    (got, err), secs = in_thread(lambda: read_all(mnt.path(rel)), TIMEOUT + SLACK + 2)
    assert_clean_failure(got, err, want, {errno.EIO, errno.ETIMEDOUT})
    assert secs <= TIMEOUT + 2, f"blocked {secs:.1f}s with --timeout {TIMEOUT}"
    sim.reset_faults()  # unstalls the body; the daemon gave up on it already
    assert_reads_back(mnt, rel, files)


def test_simulator_restart_recovers(sim: Any, mnt: Any, files: Files) -> None:
    a, b, c = files.fresh(), files.fresh(), files.fresh("slow")
    assert_reads_back(mnt, a, files)
    sim.restart()  # sessions and transfer URLs gone
    assert sorted(os.listdir(mnt.path("dirs", "d10"))) == ["x.txt"]
    assert_reads_back(mnt, b, files)
    # restart during a download: that read fails cleanly, the next one works
    sim.faults(bandwidth=8 * MiB)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", read_all(mnt.path(c))), daemon=True)
    t.start()
    time.sleep(0.7)
    sim.restart()
    t.join(TIMEOUT + SLACK)
    assert not t.is_alive()
    got, err = box["r"]
    want = files.data(c)
    if err is not None:
        assert_clean_failure(got, err, want, {errno.EIO})
    else:
        assert got == want
    sim.reset_faults()
    assert_reads_back(mnt, c, files)


# --- the local cache disk fills up ------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Any) -> Iterator[str]:
    d = str(tmp_path / "cache-fs")
    os.mkdir(d)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", d], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode(errors='replace')}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True)


@pytest.mark.one_transport
def test_cache_disk_full(sim: Any, files: Files, small_tmpfs: str, tmp_path: Any) -> None:
    """--cache-size larger than the disk: the disk fills before the accounting says so."""
    cache = os.path.join(small_tmpfs, "cache")
    rels = [files.fresh() for _ in range(3)]
    with mounted(
        sim, str(tmp_path / "m"), "--no-prefetch", "--timeout", str(TIMEOUT),
        "--cache-dir", cache, "--cache-size", "1G",
    ) as m:  # fmt: skip
        held = []
        for rel in rels[:2]:  # two open files hold 6 MiB of the 8 MiB
            f = open(m.path(rel), "rb")
            held.append(f)
            assert f.read() == files.data(rel)
        (got, err), _ = in_thread(lambda: read_all(m.path(rels[2])), TIMEOUT + SLACK)
        # EFBIG: refused at open, as it cannot fit beside the files held (issue 10 item 9)
        assert_clean_failure(got, err, files.data(rels[2]), {errno.EIO, errno.ENOSPC, errno.EFBIG})
        for f in held:
            f.close()
        # the files nobody holds are evicted to make room; the read now works
        got, err = read_all(m.path(rels[2]))
        if err is not None:  # at most one more clean failure while eviction happens
            assert_clean_failure(got, err, files.data(rels[2]), {errno.EIO, errno.ENOSPC})
            got, err = read_all(m.path(rels[2]))
        assert err is None and got == files.data(rels[2])
        assert_reads_back(m, rels[0], files)


# --- stopping while readers are blocked -------------------------------------------------------


@pytest.mark.one_transport
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_readers_blocked(sim: Any, files: Files, tmp_path: Any, sig: int) -> None:
    mp = str(tmp_path / "m")
    rels = [files.fresh() for _ in range(3)]
    sim.faults(stall_body_after={"bytes": 3 * MiB // 2, "count": 3})
    # --timeout longer than the test allows: the grace period alone must end the readers
    with mounted(sim, mp, "--no-prefetch", "--timeout", "120") as m:
        outs: dict[str, tuple[bytes, int | None]] = {}
        threads = [
            threading.Thread(
                target=lambda r=r: outs.__setitem__(r, read_all(m.path(r))), daemon=True
            )
            for r in rels
        ]
        for t in threads:
            t.start()
        time.sleep(1.5)
        t0 = time.monotonic()
        m.proc.send_signal(sig)
        try:
            m.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            unmount(mp, lazy=True)
            raise
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads), "a reader is still blocked"
        assert m.proc.returncode == 0
        assert elapsed < 10, f"exit took {elapsed:.1f}s"
        assert not os.path.ismount(mp)
        assert len(outs) == len(rels)
        for rel, (got, err) in outs.items():
            assert err is not None, "a reader saw a clean EOF on a cut file"
            assert got == files.data(rel)[: len(got)]

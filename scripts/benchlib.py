"""Helpers for scripts/bench: test trees, timing, mounts (ours and rclone's), rows.

Everything here runs only loopback servers and cleans up what it starts (by pid).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

C = TypeVar("C")

MiB = 1 << 20
GiB = 1 << 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_FETCH = os.path.join(REPO, "scripts", "baseline_fetch")


# -- rows ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Row:
    """One line of the results table (and of the JSON file): a measured figure against
    its baseline and target. Built by name only: twelve fields in order are unreadable."""

    scenario: str
    measured: float | None
    unit: str  # "MiB/s", "s", "calls", "MiB", "x"
    baseline: float | None = None
    baseline_desc: str = ""
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None  # None: informational
    runs: str = ""
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    api: str = ""  # the mount's --api ("" = the default, auto)
    guest: GuestOps | None = None  # the guest lane during the measured command
    base_guest: GuestOps | None = None  # ... during the sequential baseline
    per: str = ""  # what guest.per_unit divides by ("directory", "file", "")
    units: int = 0  # how many of those

    @property
    def result(self) -> str:
        return "info" if self.ok is None else ("pass" if self.ok else "MISS")


@dataclass(kw_only=True)
class GuestOps:
    """One VM's guest lane over one window (a command), from /_sim/stats reset at its
    start: guest operations by kind, transfer packets, lane busy seconds, deepest queue,
    rejections. ``wall`` is the window's length, so ``busy_fraction`` is the share of it
    the VM's one channel was working, and ``mean_queue`` (the queue integral over the
    window / ``wall``) the calls waiting for it on average over the command (None: the
    simulator did not report the integral, or the figures are summed over VMs)."""

    wall: float
    calls: dict[str, int]
    packets: int = 0
    packet_bytes: int = 0
    busy_s: float = 0.0
    max_queue: int = 0
    rejections: int = 0
    scale: float = 1.0  # > 1: a sampled baseline, figures extrapolated by this factor
    queue_s: float | None = None  # waiting calls x seconds over the window (lane_queue_s)
    mean_queue: float | None = None  # queue_s / wall: kept as a field so the JSON has it

    @classmethod
    def from_stats(cls, stats: dict[str, Any], wall: float, scale: float = 1.0) -> GuestOps:
        vms = stats.get("vms") or {}
        vm: dict[str, Any] = next(iter(vms.values())) if vms else {}
        return cls(
            wall=wall,
            calls={k: int(v) for k, v in (vm.get("calls") or {}).items()},
            packets=int(vm.get("packets", 0)),
            packet_bytes=int(vm.get("packet_bytes", 0)),
            busy_s=float(vm.get("lane_busy_s", 0.0)),
            max_queue=int(vm.get("max_queue", 0)),
            rejections=int(vm.get("rejections", 0)),
            scale=scale,
            queue_s=float(vm["lane_queue_s"]) if "lane_queue_s" in vm else None,
        )._averaged()

    def extrapolate(self, wall: float) -> None:
        """A sampled baseline: stretch the lane's figures to the whole run of ``wall``
        seconds (``ops`` extrapolates the calls itself)."""
        self.wall = wall
        self.busy_s *= self.scale
        self.packets = round(self.packets * self.scale)
        if self.queue_s is not None:
            self.queue_s *= self.scale
        self._averaged()

    def _averaged(self) -> GuestOps:
        self.mean_queue = (None if self.queue_s is None
                           else self.queue_s / self.wall if self.wall > 0 else 0.0)
        return self

    @property
    def ops(self) -> int:
        """Guest operations (lane uses other than body packets); a sampled baseline did
        every listing and a share of the rest, so only the rest is extrapolated."""
        lists = sum(v for k, v in self.calls.items() if "list" in k.lower())
        return lists + round((sum(self.calls.values()) - lists) * self.scale)

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.wall if self.wall > 0 else 0.0

    @property
    def busy_queue(self) -> float | None:
        """The mean queue while the lane worked (calls only wait while it does)."""
        if self.queue_s is None:
            return None
        return self.queue_s / self.busy_s if self.busy_s > 0 else 0.0

    def queue_brief(self) -> str:
        """``mean queue X over the command (Y while busy)``, or "" when not measured."""
        if self.mean_queue is None or self.busy_queue is None:
            return ""
        return (f"mean queue {self.mean_queue:.2f} over the command "
                f"({self.busy_queue:.2f} while busy)")

    def brief(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.calls.items()))
        x = f" (x{self.scale:.3g} extrapolated)" if self.scale != 1.0 else ""
        q = self.queue_brief()
        return (f"{self.ops} ops [{kinds}]{x}, {self.packets} packets, lane busy "
                f"{self.busy_s:.2f} s of {self.wall:.2f} s ({self.busy_fraction:.2f}), "
                f"deepest queue {self.max_queue}{', ' + q if q else ''}, "
                f"rejections {self.rejections}")


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit in ("MiB/s", "MiB"):
        return f"{v:,.0f} {unit}" if v >= 10 else f"{v:.1f} {unit}"
    if unit == "calls":
        return f"{int(v)} calls"
    return f"{v:.3g} {unit}"


def table(rows: list[Row]) -> str:
    head = ["scenario", "measured", "baseline", "ratio", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base = fmt(r.baseline, r.unit) if r.baseline is not None else ""
        if r.baseline_desc:
            base = f"{base} ({r.baseline_desc})" if base else r.baseline_desc
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}x"
        lines.append(
            f"| {r.scenario} | {fmt(r.measured, r.unit)} | {base} | {ratio} | {r.target} "
            f"| {r.result} |"
        )
    return "\n".join(lines)


def guest_table(rows: list[Row]) -> str:
    """The guest-lane view of the rows that have one: wall time, guest operations (per
    directory / file where the row says), the lane's busy fraction, the deepest queue and
    rejections, for the command and for its sequential baseline."""
    head = ["scenario", "api", "wall", "guest ops", "per unit", "lane busy", "deepest queue",
            "mean queue", "rejections", "baseline wall", "baseline ops", "baseline busy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = r.guest
        if g is None:
            continue
        per = f"{g.ops / r.units:.2f} per {r.per}" if r.per and r.units else ""
        bg = r.base_guest
        bw = bo = bb = ""
        if bg is not None:
            bw = fmt(bg.wall, "s") + (" (extrapolated)" if bg.scale != 1.0 else "")
            bo = f"{bg.ops:,}"
            bb = f"{bg.busy_fraction:.2f}"
        mq = "-" if g.mean_queue is None else f"{g.mean_queue:.2f}"
        lines.append(
            f"| {r.scenario} | {r.api or 'auto'} | {fmt(g.wall, 's')} | {g.ops:,} | {per} "
            f"| {g.busy_fraction:.2f} | {g.max_queue} | {mq} | {g.rejections} | {bw} | {bo} "
            f"| {bb} |"
        )
    return "\n".join(lines)


def run_scenarios(
    scenarios: Mapping[str, Callable[[C], None]], ctx: C, names: list[str], label: str,
    on_error: Callable[[str, Exception], None],
) -> None:
    """Each named scenario in turn, timed; one that fails is reported and the rest go on."""
    for name in names:
        t0 = time.monotonic()
        print(f"== {name} ({label})", flush=True)
        try:
            scenarios[name](ctx)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            on_error(name, exc)
        print(f"   ({time.monotonic() - t0:.1f} s)", flush=True)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# -- processes -------------------------------------------------------------------------


def run(cmd: str, env: dict[str, str], timeout: float = 600) -> tuple[float, str, str]:
    """Run ``bash -c cmd``; return (wall seconds, stdout, stderr). Raise on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(
        ["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=timeout,
        errors="replace",
    )
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {cmd}\n{p.stderr[-2000:]}")
    return dt, p.stdout, p.stderr


def last_json(stderr: str) -> dict[str, Any]:
    for line in reversed(stderr.strip().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"no JSON summary in: {stderr[-500:]}")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def abort_fuse_connection(mnt: str) -> None:
    """Abort the FUSE connection of the mount on ``mnt`` (ours) through fusectl."""
    dev = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[4] == os.fsencode(mnt):
                dev = parts[2].decode()
    if dev is None:
        return
    ctl = "/sys/fs/fuse/connections"
    if not os.listdir(ctl):
        subprocess.run(["mount", "-t", "fusectl", "none", ctl], check=False)
    print(f"!! mount on {mnt} hung (no FUSE INIT reply?): aborting connection {dev}", flush=True)
    with contextlib.suppress(OSError), open(f"{ctl}/{dev.split(':')[1]}/abort", "w") as f:
        f.write("1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def py_spy(pid: int, out: str | None) -> Iterator[None]:
    """Sample ``pid`` with py-spy (collapsed stacks in ``out``) while the body runs."""
    if not out:
        yield
        return
    exe = os.path.join(REPO, ".venv", "bin", "py-spy")
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--idle",
         "--output", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        stop(proc, signal.SIGINT, timeout=30)


def top_frames(raw_file: str, n: int = 12) -> list[tuple[str, float]]:
    """Self-time share of the leaf frames of a py-spy raw (collapsed) profile."""
    leaf: dict[str, int] = {}
    total = 0
    with open(raw_file) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            c = int(count)
            total += c
            frame = stack.split(";")[-1]
            leaf[frame] = leaf.get(frame, 0) + c
    return [(k, v / total) for k, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:n]]


# -- rclone peer -----------------------------------------------------------------------


@contextlib.contextmanager
def rclone_http_server(tree: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["rclone", "serve", "http", tree, "--addr", f"127.0.0.1:{port}", "--read-only",
         # the tree grows while the suite runs (parts are built lazily): no stale listings
         "--dir-cache-time", "1s", "--config", "/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("rclone serve http did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        stop(proc)


@dataclass
class RcloneMount:
    mnt: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def rclone_mounted(url: str, mnt: str) -> Iterator[RcloneMount]:
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.Popen(
        ["rclone", "mount", ":http:", mnt, "--http-url", url, "--read-only",
         "--config", "/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rclone mount did not come up")
            time.sleep(0.05)
        # rclone answers before its first listing works; wait for the root to list
        while not os.listdir(mnt):
            if time.monotonic() > deadline:
                raise RuntimeError("rclone mount lists nothing")
            time.sleep(0.05)
        yield RcloneMount(mnt, proc)
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True, check=False)
        stop(proc)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, check=False)


# -- test trees ------------------------------------------------------------------------


@dataclass
class Sizes:
    big: int  # the "1 GiB" file
    mid: int  # the "64 MiB" file
    par_n: int  # files read in parallel
    par_size: int
    huge: int  # RSS while streaming
    ls_n: int  # entries of the ls -l directory
    src_dirs: int  # grep tree: dirs x files of 1-64 KiB
    src_per_dir: int
    find_dirs: int  # find tree: dirs x files
    find_per_dir: int
    wide_n: int  # the 100,000-entry directory

    @classmethod
    def full(cls) -> Sizes:
        return cls(GiB, 64 * MiB, 16, 64 * MiB, 4 * GiB, 2000, 20, 100, 500, 39, 100_000)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(256 * MiB, 64 * MiB, 16, 16 * MiB, GiB, 500, 5, 60, 100, 39, 20_000)


def _random_file(path: str, size: int) -> None:
    with open(path + ".tmp", "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    os.replace(path + ".tmp", path)


def _marker(tree: str, name: str, spec: int | str) -> str:
    return os.path.join(tree, f".bench-{name.replace('/', '_')}-{spec}")


class Tree:
    """The bench's guest tree, built lazily (each part once; reusable via --tree-dir)."""

    def __init__(self, root: str, sizes: Sizes) -> None:
        self.root = root
        self.s = sizes
        os.makedirs(root, exist_ok=True)

    def _once(self, name: str, spec: int | str) -> bool:
        return not os.path.exists(_marker(self.root, name, spec))

    def _done(self, name: str, spec: int | str) -> None:
        open(_marker(self.root, name, spec), "w").close()

    def file(self, name: str, size: int, sparse: bool = False) -> str:
        path = os.path.join(self.root, name)
        if self._once(name, size):
            if sparse:
                with open(path, "wb") as f:
                    f.truncate(size)
            else:
                _random_file(path, size)
            self._done(name, size)
        return path

    def big(self) -> str:
        return self.file("big.bin", self.s.big)

    def mid(self) -> str:
        return self.file("mid.bin", self.s.mid)

    def huge(self) -> str:
        return self.file("huge.bin", self.s.huge, sparse=True)

    def par(self) -> list[str]:
        d = os.path.join(self.root, "par")
        os.makedirs(d, exist_ok=True)
        return [
            self.file(os.path.join("par", f"p{i:02d}.bin"), self.s.par_size)
            for i in range(self.s.par_n)
        ]

    def dir_ls(self) -> str:
        d = os.path.join(self.root, "dir_ls")
        if self._once("dir_ls", self.s.ls_n):
            os.makedirs(d, exist_ok=True)
            for i in range(self.s.ls_n):
                with open(os.path.join(d, f"file-{i:05d}.txt"), "wb") as f:
                    f.write(b"x" * (100 + i % 900))
            self._done("dir_ls", self.s.ls_n)
        return d

    def src(self) -> str:
        d = os.path.join(self.root, "src")
        spec = f"{self.s.src_dirs}x{self.s.src_per_dir}"
        if self._once("src", spec):
            rng = random.Random(42)
            for j in range(self.s.src_dirs):
                sub = os.path.join(d, f"pkg{j:02d}")
                os.makedirs(sub, exist_ok=True)
                for i in range(self.s.src_per_dir):
                    size = rng.randint(1024, 64 * 1024)
                    text = base64.encodebytes(os.urandom(size * 3 // 4 + 3))[:size]
                    with open(os.path.join(sub, f"mod{i:03d}.txt"), "wb") as f:
                        f.write(text)
            self._done("src", spec)
        return d

    def find_tree(self) -> str:
        d = os.path.join(self.root, "tree")
        spec = f"{self.s.find_dirs}x{self.s.find_per_dir}"
        if self._once("tree", spec):
            rng = random.Random(7)
            for j in range(self.s.find_dirs):
                sub = os.path.join(d, f"d{j:03d}")
                os.makedirs(sub, exist_ok=True)
                for i in range(self.s.find_per_dir):
                    with open(os.path.join(sub, f"f{i:02d}"), "wb") as f:
                        f.truncate(rng.randint(0, 1 << 20))  # sparse: sizes only
            self._done("tree", spec)
        return d

    def wide(self) -> str:
        d = os.path.join(self.root, "wide")
        if self._once("wide", self.s.wide_n):
            os.makedirs(d, exist_ok=True)
            for i in range(self.s.wide_n):
                os.close(os.open(os.path.join(d, f"entry-{i:06d}"), os.O_CREAT | os.O_WRONLY))
            self._done("wide", self.s.wide_n)
        return d

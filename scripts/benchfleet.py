"""scripts/bench --cost-model realistic --only fleet_grep: issue 13's fleet-wide grep.

A simulator of its own (``guestfs-sim --fleet N``, realistic cost model: ~80 ms of
control plane per call in parallel, then one guest operation at a time per VM) and a
fleet mount (``--all-vms``) with one ``[[guest_credentials]]`` rule per guest account.
Three measurements, each on a fresh mount (or a fresh script):

* ``grep -l`` of ``/root/.ssh/authorized_keys`` in one VM (``web-01``);
* the same over every VM: ``grep -l NEEDLE "$MNT"/*/root/.ssh/authorized_keys``
  (the shell expands the glob; Windows and failing VMs simply do not match);
* a sequential script doing what a user loops over VMs today: for each powered-on VM a
  vCenter login, then stat + transfer create + GET of the same file over REST
  (``scripts/baseline_fetch``'s client, one call at a time).

Each reports the wall time and the guest operations of every VM summed (from
/_sim/stats reset at the start); "lane busy" is summed over the VMs too.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from benchlib import BASELINE_FETCH, GuestOps, Row, abort_fuse_connection, run, run_scenarios

from guestfs_mount.sim.testing import Sim, run_simulator
from guestfs_mount.testing import Mounted, mount_argv, mounted

if TYPE_CHECKING:
    from bench import Bench

NEEDLE = "attacker@evil"  # the fleet simulator's compromised VMs carry this key
FILE = "root/.ssh/authorized_keys"
ONE_VM = "web-01"  # the fleet's first VM: Linux, powered on, the default account
_NO_VM = "\0no-vm\0"  # mount_argv's VM slot, removed: --all-vms takes SERVER MOUNTPOINT


@dataclass
class FleetSizes:
    vms: int
    seed: int = 1

    @classmethod
    def full(cls) -> FleetSizes:
        return cls(100)

    @classmethod
    def quick(cls) -> FleetSizes:
        return cls(20)


def fleet_ops(stats: dict[str, Any], wall: float) -> GuestOps:
    """Every VM's lane over one window, summed (the deepest queue: the deepest of any)."""
    calls: dict[str, int] = {}
    g = GuestOps(wall=wall, calls=calls)
    for vm in (stats.get("vms") or {}).values():
        for k, v in (vm.get("calls") or {}).items():
            calls[k] = calls.get(k, 0) + int(v)
        g.packets += int(vm.get("packets", 0))
        g.packet_bytes += int(vm.get("packet_bytes", 0))
        g.busy_s += float(vm.get("lane_busy_s", 0.0))
        g.max_queue = max(g.max_queue, int(vm.get("max_queue", 0)))
        g.rejections += int(vm.get("rejections", 0))
    return g


# Guest operations, whichever API carried them; every other counted call is vCenter's own
# (sessions, inventory, guest identity, power and Tools state, ...).
_GUEST_CALLS = frozenset({
    "files.list", "files.get", "transfer.create", "transfer.preview",
    "ListFilesInGuest", "InitiateFileTransferFromGuest", "ValidateCredentialsInGuest",
})  # fmt: skip


def vcenter_calls(stats: dict[str, Any]) -> dict[str, int]:
    """The calls to vCenter that are not guest operations (REST and vim25), by name."""
    both = {**(stats.get("calls") or {}), **(stats.get("vim_calls") or {})}
    return {k: int(v) for k, v in both.items()
            if v and k.rpartition(".")[2] not in _GUEST_CALLS and k not in _GUEST_CALLS}  # fmt: skip


def _brief(calls: dict[str, int]) -> str:
    return f"{sum(calls.values())} [" + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) + "]"


def vms_touched(stats: dict[str, Any]) -> int:
    return sum(1 for vm in (stats.get("vms") or {}).values() if vm.get("calls"))


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def credentials_toml(sim: Sim, secrets: str) -> str:
    """One rule per non-default account naming its VMs (name and family: the fleet has
    a Windows "dup" beside two Linux ones), then the default account for the rest."""
    by_id = {v["vm"]: v for v in sim.vms}
    rules = []
    default = None
    for acct in sim.fleet["accounts"]:
        pw = os.path.join(secrets, f"{acct['key']}.pw")
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(acct["password"] + "\n")
        if acct["key"] == "default":
            default = (acct["user"], pw)
            continue
        for vm_id in acct["vms"]:
            vm = by_id[vm_id]
            family = "windows" if vm.get("family") == "WINDOWS" else "linux"
            rules.append(
                f"[[guest_credentials]]\nvms = [{json.dumps(_glob_escape(vm['name']))}]\n"
                f'family = "{family}"\nguest_user = {json.dumps(acct["user"])}\n'
                f"guest_password_file = {json.dumps(pw)}\n"
            )
    if default is not None:
        rules.append(
            f"[[guest_credentials]]\nguest_user = {json.dumps(default[0])}\n"
            f"guest_password_file = {json.dumps(default[1])}\n"
        )
    return "\n".join(rules)


def _baseline_client() -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader("baseline_fetch", BASELINE_FETCH)
    spec = importlib.util.spec_from_loader("baseline_fetch", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class Fleet:
    """One fleet simulator and the mounts of it; ``b`` is the suite's Bench."""

    def __init__(self, b: Bench, sim: Sim, sizes: FleetSizes, work: str) -> None:
        self.b = b
        self.sim = sim
        self.s = sizes
        self.mnt = os.path.join(work, "mnt-fleet")
        secrets = os.path.join(work, "secrets")
        os.makedirs(secrets, mode=0o700, exist_ok=True)
        self.config = os.path.join(work, "fleet.toml")
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(credentials_toml(sim, secrets))
        self.env = {k: v for k, v in b.env.items() if not k.startswith("GUESTFS_")}
        self.env.update(GUESTFS_USER=sim.user, GUESTFS_PASSWORD=sim.password, MNT=self.mnt,
                        PYTHONUNBUFFERED="1")
        self.api = (b.a.api or ["auto"])[0]
        self.runs = b.a.runs or (1 if b.a.quick else 3)

    def argv(self, *extra: str) -> list[str]:
        api = ["--api", self.api] if self.api != "auto" else []
        argv = mount_argv(self.sim, self.mnt, "--foreground", "--all-vms", "--config",
                          self.config, *api, *self.b.a.mount_arg, *extra, vm=_NO_VM)
        argv.remove(_NO_VM)
        return argv

    @contextlib.contextmanager
    def mount(self) -> Iterator[Mounted]:
        dog = threading.Timer(45.0, abort_fuse_connection, [self.mnt])
        dog.start()
        try:
            with mounted(self.sim, self.mnt, argv=self.argv(), env=self.env) as m:
                dog.cancel()
                yield m
        finally:
            dog.cancel()

    def measure(self, cmd: str) -> Measured:
        """``cmd`` on a fresh mount, counters reset just before it: (wall, ops, stdout,
        VMs that saw a guest call, vCenter calls that are no guest operation, CPU
        seconds of the daemon and of the simulator during the command)."""
        with self.mount() as m:
            self.sim.reset_stats()
            c0, s0 = cpu_seconds(m.pid), cpu_seconds(self.sim.proc.pid)
            dt, out, _ = run(cmd, self.env, timeout=1800)
            cpu = (cpu_seconds(m.pid) - c0, cpu_seconds(self.sim.proc.pid) - s0)
            stats = self.sim.stats()
        return dt, fleet_ops(stats, dt), out, vms_touched(stats), vcenter_calls(stats), cpu

    def sequential(self) -> tuple[float, GuestOps, int, list[str]]:
        """The per-VM script: (wall, ops, VMs read, VMs whose file holds the needle)."""
        bf = _baseline_client()
        accounts = {vm: a for a in self.sim.fleet["accounts"] for vm in a["vms"]}
        shown = [v for v in self.sim.vms if v.get("power_state", "POWERED_ON") == "POWERED_ON"]
        self.sim.reset_stats()
        t0 = time.perf_counter()
        read = 0
        hits: list[str] = []
        for v in shown:
            a = accounts[v["vm"]]
            creds = {"user": self.sim.user, "password": self.sim.password,
                     "guest_user": a["user"], "guest_password": a["password"]}
            try:
                c = bf.Client(self.sim.vcenter_url, v["vm"], self.sim.ca_file, creds)
            except Exception:
                continue
            try:
                c.stat("/" + FILE)
                sink = _Sink()
                c.get(c.create_url("/" + FILE), sink)
                read += 1
                if NEEDLE.encode() in sink.data:
                    hits.append(v["vm"])
            except Exception:  # a Windows VM, Tools down: the next VM
                continue
            finally:
                c.http.close()
        dt = time.perf_counter() - t0
        return dt, fleet_ops(self.sim.stats(), dt), read, hits


Measured = tuple[float, GuestOps, str, int, dict[str, int], tuple[float, float]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/PID/stat``): what a command
    cost the daemon, less dependent on the machine's load than its wall time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(x: Measured) -> str:
    return f"CPU daemon {x[5][0]:.2f} s, simulator {x[5][1]:.2f} s"


def _median(xs: list[Measured]) -> Measured:
    return sorted(xs, key=lambda x: x[0])[len(xs) // 2]


def _samples(xs: list[Measured]) -> str:
    return ", ".join(f"{x[0]:.2f}" for x in xs) + " s"


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)


def _add(b: Bench, row: Row) -> None:
    b.add(row)
    if row.guest is not None:
        print(f"     guest: {row.guest.brief()}", flush=True)
    if row.base_guest is not None:
        print(f"     baseline: {row.base_guest.wall:.1f} s, {row.base_guest.brief()}", flush=True)


def sc_fleet_grep(f: Fleet) -> None:
    n = len(f.sim.vms)
    shown = sum(1 for v in f.sim.vms if v.get("power_state", "POWERED_ON") == "POWERED_ON")
    one_cmd = f'grep -l -s {NEEDLE} "$MNT/{ONE_VM}/{FILE}"; [ $? -le 1 ]'
    all_cmd = f'grep -l -s {NEEDLE} "$MNT"/*/{FILE}; [ $? -le 1 ]'
    # Each on a fresh mount, ``runs`` times: the median (this machine is shared).
    ones = [f.measure(one_cmd) for _ in range(f.runs)]
    t1, g1, _, _, v1, _ = one = _median(ones)
    print(f"     one VM: {t1:.2f} s ({_samples(ones)}), {g1.brief()}; vCenter calls"
          f" {_brief(v1)}; {_cpu(one)}", flush=True)
    alls = [f.measure(all_cmd) for _ in range(f.runs)]
    tn, gn, out, touched, vn, _ = every = _median(alls)
    found = len(out.splitlines())
    print(f"     {n} VMs: {tn:.2f} s ({found} matches, {touched} VMs called), {gn.brief()};"
          f" vCenter calls {_brief(vn)}; {_cpu(every)}", flush=True)
    ts, gs, read, hits = f.sequential()
    print(f"     sequential script: {ts:.2f} s ({read} files read, {len(hits)} matches), "
          f"{gs.brief()}", flush=True)
    label = f"{n} VMs ({shown} powered on; {read} Linux VMs hold the file)"
    ratio = tn / t1
    common = [
        f"fleet simulator: guestfs-sim --fleet {f.s.vms} --fleet-seed {f.s.seed} "
        f"--cost-model realistic --seed 1",
        f"one VM: {t1:.2f} s (median of {_samples(ones)}), {g1.brief()}; "
        f"vCenter calls besides guest operations: {_brief(v1)}; {_cpu(one)}",
        f"{n} VMs: {tn:.2f} s (median of {_samples(alls)}), {gn.brief()}; "
        f"{touched} VMs saw a guest call; "
        f"{found} files matched (the script found {len(hits)}); "
        f"vCenter calls besides guest operations: {_brief(vn)}; {_cpu(every)}",
        f"sequential script: {ts:.2f} s, {gs.brief()}",
    ]
    mount_cmd = " ".join(f.argv()).replace(f.mnt, "$MNT")
    _add(f.b, Row(
        scenario=f"fleet `grep -l` of one small file in each of {label} vs one VM",
        measured=tn, unit="s", baseline=t1, baseline_desc="the same grep on one VM",
        ratio=ratio, target="<= 3x", ok=ratio <= 3, runs=f"median of {f.runs}", api=f.api,
        guest=gn,
        base_guest=g1, per="VM", units=n,
        commands=[f"(fresh mount) {mount_cmd}", f"(fresh mount) {one_cmd}",
                  f"(fresh mount) {all_cmd}"],
        notes=common,
    ))
    _add(f.b, Row(
        scenario=f"fleet `grep -l` over {label} vs a sequential per-VM script",
        measured=tn, unit="s", baseline=ts,
        baseline_desc="login + stat + transfer create + GET, VM after VM (REST)",
        ratio=tn / ts, target="< 1x", ok=tn < ts, runs=f"median of {f.runs}, baseline 1 run",
        api=f.api, guest=gn,
        base_guest=gs, per="VM", units=n,
        commands=[f"(fresh mount) {all_cmd}",
                  "baseline: for each powered-on VM: baseline_fetch's Client (vCenter "
                  f"login), stat /{FILE}, create transfer, GET (scripts/benchfleet.py)"],
        notes=common,
    ))


SCENARIOS: dict[str, Callable[[Fleet], None]] = {
    "fleet_grep": sc_fleet_grep,
}


def run_all(b: Bench, names: list[str], quick: bool,
            on_error: Callable[[str, Exception], None]) -> None:
    sizes = FleetSizes.quick() if quick else FleetSizes.full()
    args = ["--fleet", str(sizes.vms), "--fleet-seed", str(sizes.seed),
            "--cost-model", "realistic", "--seed", "1"]
    if b.a.no_tls:
        args.append("--no-tls")
    with tempfile.TemporaryDirectory(prefix="guestfs-bench-fleet-") as work, \
            run_simulator(*args, timeout=120) as sim:
        f = Fleet(b, sim, sizes, work)
        print(f"fleet simulator: {sim.vcenter_url}, {len(sim.vms)} VMs", flush=True)
        run_scenarios(SCENARIOS, f, names, f"realistic, fleet of {sizes.vms}", on_error)

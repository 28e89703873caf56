"""--all-vms end to end: a vCenter of several VMs as one tree, through the kernel."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mount_argv, mounted

pytestmark = pytest.mark.fuse

ATTACKER = "ssh-ed25519 AAAAC3attackerkey attacker@evil"
LONG = "long-" + "x" * 295  # 300 bytes: more than a name may hold
HOSTILE = ["a/b", "..", "esc\x1b[31mred", LONG, ".by-id"]
_NO_VM = "\0no-vm\0"  # mount_argv's VM slot, removed: --all-vms takes SERVER MOUNTPOINT


def _toml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    out = {}
    for name, key in (("web", ATTACKER), ("db", "ssh-ed25519 AAAAgood admin@corp")):
        root = base / name
        (root / "root" / ".ssh").mkdir(parents=True)
        (root / "root" / ".ssh" / "authorized_keys").write_text(key + "\n")
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text(name + "\n")
        out[name] = root
    for name in ("locked", "notools", "off", "hostile"):
        root = base / name
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "hostname").write_text(name + "\n")
        out[name] = root
    c, d = base / "win-c", base / "win-d"
    (c / "Users" / "Admin").mkdir(parents=True)
    (c / "Users" / "Admin" / "notes.txt").write_bytes(b"windows notes\r\n")
    (d / "data").mkdir(parents=True)
    (d / "data" / "report.csv").write_bytes(b"a,b\r\n")
    out["win-c"], out["win-d"] = c, d
    return base, out


@pytest.fixture(scope="module")
def sim(trees):
    base, t = trees
    vms = [
        ("web", t["web"], ""),
        ("db", t["db"], ""),
        ("locked", t["locked"], ""),
        ("notools", t["notools"], "tools_running = false\n"),
        ("off", t["off"], 'power_state = "POWERED_OFF"\n'),
        ("win", t["win-c"], f'family = "WINDOWS"\ndrives = {{ D = {_toml_str(str(t["win-d"]))} }}\n'),
    ]
    text = '[[guest_accounts]]\nuser = "alice"\npassword = "pw-alice"\n'
    for name, root, extra in vms:
        text += f"\n[[vms]]\nname = {_toml_str(name)}\nroot = {_toml_str(str(root))}\n{extra}"
    for i, name in enumerate(HOSTILE):
        text += f"\n[[vms]]\nname = {_toml_str(name)}\nroot = {_toml_str(str(t['hostile']))}\n"
        text += f'vm = "vm-{900 + i}"\n'
    cfg = base / "sim.toml"
    cfg.write_text(text)
    with run_simulator("--config", str(cfg)) as s:
        yield s


@pytest.fixture(scope="module")
def mount_config(sim, trees):
    """[[guest_credentials]]: a wrong password for "locked", alice for "db", the
    simulator's root account for every other VM (first match wins)."""
    base, _ = trees
    secrets = base / "secrets"
    secrets.mkdir(mode=0o700)
    for name, value in (("wrong", "not-the-password"), ("alice", "pw-alice"),
                        ("root", sim.guest_password)):  # fmt: skip
        (secrets / name).write_text(value + "\n")
        os.chmod(secrets / name, 0o600)
    cfg = base / "mount.toml"
    cfg.write_text(
        f"""
[[guest_credentials]]
vms = ["locked"]
guest_user = "root"
guest_password_file = "{secrets / "wrong"}"

[[guest_credentials]]
vms = ["db", "nothing-*"]
guest_user = "alice"
guest_password_file = "{secrets / "alice"}"

[[guest_credentials]]
guest_user = {_toml_str(sim.guest_user)}
guest_password_file = "{secrets / "root"}"
"""
    )
    os.chmod(cfg, 0o600)
    return str(cfg)


def fleet_argv(sim, mnt, mount_config, *extra):
    argv = mount_argv(sim, mnt, "--foreground", "--all-vms", "--config", mount_config,
                      *extra, vm=_NO_VM)  # fmt: skip
    argv.remove(_NO_VM)
    return argv


def fleet_env(sim):
    # No guest secret in the environment: a fleet mount takes its accounts from the rules.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTFS_")}
    env.update(GUESTFS_USER=sim.user, GUESTFS_PASSWORD=sim.password, PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def mnt(sim, api, mount_config, tmp_path_factory):
    mp = str(tmp_path_factory.mktemp("mnt"))
    via = ViaApi(sim, api)
    argv = fleet_argv(via, mp, mount_config, "--metadata-ttl", "0.5")
    with mounted(via, mp, argv=argv, env=fleet_env(sim)) as m:
        yield m


def _dirs(sim):
    return {vm["name"]: vm["vm"] for vm in sim.vms}


def test_root_lists_powered_on_vms_by_name(mnt, sim):
    names = set(os.listdir(mnt.mnt))
    assert {"web", "db", "locked", "notools", "win", ".by-id"} <= names
    assert "off" not in names  # --vm-filter powered-on is the default
    for name in names:
        assert os.path.isdir(mnt.path(name))
    ids = _dirs(sim)
    assert os.readlink(mnt.path(".by-id", ids["web"])) == "../web"
    assert os.path.samefile(mnt.path(".by-id", ids["db"]), mnt.path("db"))


@pytest.mark.one_transport
def test_listing_the_fleet_costs_no_guest_call(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    with mounted(sim, mp, argv=fleet_argv(sim, mp, mount_config), env=fleet_env(sim)) as m:
        sim.reset_stats()
        subprocess.run(["ls", "-la", m.mnt, m.path(".by-id")], check=True, capture_output=True)
        for name in os.listdir(m.mnt):
            os.stat(m.path(name))
            os.listxattr(m.path(name))
        assert sim.stats()["vms"] == {}  # no VM saw a guest call
        with open(m.path("web", "etc", "hostname")) as f:
            assert f.read() == "web\n"
        assert list(sim.stats()["vms"]) == [_dirs(sim)["web"]]  # only the VM opened


def test_fleet_wide_grep(mnt):
    # The shell expands the glob over every VM; the failing ones only print errors.
    proc = subprocess.run(
        f"grep -l attacker@evil {mnt.mnt}/*/root/.ssh/authorized_keys",
        shell=True, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.stdout.splitlines() == [mnt.path("web", "root", ".ssh", "authorized_keys")]


def test_each_vm_logs_in_with_its_rule(mnt, sim):
    with open(mnt.path("db", "root", ".ssh", "authorized_keys")) as f:
        assert "admin@corp" in f.read()
    assert os.getxattr(mnt.path("db"), "user.guestfs.state") == b"ready"
    doc = _status(mnt)
    by_dir = {v["dir"]: v for v in doc["fleet"]["vms"]}
    assert by_dir["db"]["guest_user"] == "alice"
    assert by_dir["web"]["guest_user"] == sim.guest_user


def test_wrong_password_fails_alone_and_is_remembered(mnt, sim):
    with pytest.raises(PermissionError):
        os.listdir(mnt.path("locked"))
    reason = os.getxattr(mnt.path("locked"), "user.guestfs.error").decode()
    assert "guest login refused" in reason
    locked = _dirs(sim)["locked"]
    seen = sim.stats()["vms"][locked]["calls"]
    for _ in range(5):  # a shell, a find, a grep: no new login attempt
        with pytest.raises(PermissionError):
            os.stat(mnt.path("locked", "etc", "hostname"))
    assert sim.stats()["vms"][locked]["calls"] == seen
    with open(mnt.path("web", "etc", "hostname")) as f:  # the others keep working
        assert f.read() == "web\n"


def test_vm_without_tools_fails_alone_with_ehostdown(mnt):
    with pytest.raises(OSError) as info:
        os.listdir(mnt.path("notools"))
    assert info.value.errno == errno.EHOSTDOWN
    assert b"Tools" in os.getxattr(mnt.path("notools"), "user.guestfs.error")
    assert os.listdir(mnt.path("db", "etc")) == ["hostname"]


def test_windows_and_linux_side_by_side(mnt):
    assert os.listdir(mnt.path("win")) == ["C"]
    with open(mnt.path("win", "C", "Users", "Admin", "notes.txt"), "rb") as f:
        assert f.read() == b"windows notes\r\n"
    with open(mnt.path("win", "c", "users", "admin", "NOTES.TXT"), "rb") as f:
        assert f.read() == b"windows notes\r\n"
    with open(mnt.path("win", "D", "data", "report.csv"), "rb") as f:
        assert f.read() == b"a,b\r\n"
    assert sorted(os.listdir(mnt.path("win"))) == ["C", "D"]  # a drive looked up is listed
    assert not os.path.exists(mnt.path("win", "Q"))
    assert os.getxattr(mnt.path("win", "D", "data"), "user.guestfs.guest_path") == b"D:\\data"
    with open(mnt.path("web", "etc", "hostname")) as f:
        assert f.read() == "web\n"


def test_status_shows_each_vm(mnt):
    proc = subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "status", mnt.mnt],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    with pytest.raises(PermissionError):
        os.listdir(mnt.path("locked"))
    proc = subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "status", mnt.mnt],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = proc.stdout
    assert "vms" in out
    locked = next(line for line in out.splitlines() if line.strip().startswith("locked "))
    assert "EACCES" in locked and "guest login refused" in locked


def test_writes_are_refused(mnt):
    with pytest.raises(OSError) as info:
        open(mnt.path("web", "etc", "new"), "w")
    assert info.value.errno == errno.EROFS


@pytest.mark.one_transport
def test_hostile_vm_names_are_safe_unique_and_linked(sim, mnt):
    names = os.listdir(mnt.mnt)
    ids = {vm["name"]: vm["vm"] for vm in sim.vms}
    for name in HOSTILE:
        vm = ids[name]
        shown = [n for n in names if n.endswith("~" + vm)]
        assert len(shown) == 1, (name, names)
        assert len(os.fsencode(shown[0])) <= 255
        assert "/" not in shown[0] and "\x1b" not in shown[0]
        assert os.readlink(mnt.path(".by-id", vm)) == "../" + shown[0]
        assert os.getxattr(mnt.path(shown[0]), "user.guestfs.vm") == vm.encode()
    assert ".." not in names and "a" not in names
    assert len(names) == len(set(names))
    hostile = next(n for n in names if n.endswith("~" + ids[".."]))
    with open(mnt.path(hostile, "etc", "hostname")) as f:
        assert f.read() == "hostile\n"


@pytest.mark.one_transport
def test_inventory_refresh_shows_new_and_hides_gone_vms(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    argv = fleet_argv(sim, mp, mount_config, "--inventory-ttl", "0.5")
    off = _dirs(sim)["off"]
    web = _dirs(sim)["web"]
    with mounted(sim, mp, argv=argv, env=fleet_env(sim)) as m:
        assert "off" not in os.listdir(m.mnt)
        sim.power(off, "POWERED_ON")
        sim.power(web, "POWERED_OFF")
        try:
            names = _wait_for(m.mnt, lambda n: "off" in n and "web" not in n)
            assert "db" in names
            with open(m.path("off", "etc", "hostname")) as f:
                assert f.read() == "off\n"
        finally:
            sim.power(off, "POWERED_OFF")
            sim.power(web, "POWERED_ON")


@pytest.mark.one_transport
def test_vm_filter_all_shows_powered_off_vms_failing_alone(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    argv = fleet_argv(sim, mp, mount_config, "--vm-filter", "all", "--vms", "o*", "--vms", "db")
    with mounted(sim, mp, argv=argv, env=fleet_env(sim)) as m:
        assert sorted(os.listdir(m.mnt)) == [".by-id", "db", "off"]
        with pytest.raises(OSError) as info:
            os.listdir(m.path("off"))
        assert info.value.errno == errno.EHOSTDOWN
        assert b"powered off" in os.getxattr(m.path("off"), "user.guestfs.error")
        assert os.listdir(m.path("db", "etc")) == ["hostname"]


@pytest.mark.one_transport
def test_audit_log_names_the_vm_of_each_transfer(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    log_path = tmp_path / "audit.jsonl"
    argv = fleet_argv(sim, mp, mount_config, "--audit-log", str(log_path))
    with mounted(sim, mp, argv=argv, env=fleet_env(sim)) as m:
        for vm in ("web", "db"):
            with open(m.path(vm, "etc", "hostname")) as f:
                f.read()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    transfers = [line for line in lines if line.get("path") == "/etc/hostname"]
    assert sorted(t["vm_name"] for t in transfers) == ["db", "web"]
    assert {t["vm"] for t in transfers} == {_dirs(sim)["web"], _dirs(sim)["db"]}


def _status(m):
    proc = subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "status", "--json", m.mnt],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout)[0]


def _wait_for(mnt, done, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        names = os.listdir(mnt)
        if done(names) or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


@pytest.mark.one_transport
def test_unknown_folder_is_a_start_up_error(sim, mount_config, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    argv = fleet_argv(sim, str(mp), mount_config, "--folder", "no/such/folder")
    proc = subprocess.run(argv, env=fleet_env(sim), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--folder 'no/such/folder'" in proc.stderr
    assert not os.path.ismount(mp)


# ---- fleet read-ahead (issue 13: a glob over every VM costs about one VM) ------------------


def _calls(sim):
    return {vm: dict(c["calls"]) for vm, c in sim.stats()["vms"].items() if c["calls"]}


def _settled(sim, timeout=30.0):
    """The guests' call counts once the background work stopped (polled, not timed)."""
    deadline = time.monotonic() + timeout
    last = _calls(sim)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _calls(sim)
        if now == last:
            return now
        last = now
    return last


@pytest.mark.one_transport
def test_same_path_in_two_vms_is_read_ahead_in_the_others(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    ids = _dirs(sim)
    linux_ok = {ids[n] for n in ("web", "db")} | {ids[n] for n in HOSTILE}
    with mounted(sim, mp, argv=fleet_argv(sim, mp, mount_config), env=fleet_env(sim)) as m:
        names = sorted(n for n in os.listdir(m.mnt) if n != ".by-id")
        assert len(names) == 10
        sim.reset_stats()
        for name in names[:2]:  # the same path in the first two VMs of the listing
            assert os.path.exists(m.path(name, "etc", "hostname"))
        ahead = _settled(sim)
        assert linux_ok <= set(ahead)  # every readable VM was opened and read ahead
        assert ahead[ids["locked"]] == {"files.list": 1}  # one refused login, no more
        for name in names[2:]:  # the user goes on: the answers are there already
            os.path.exists(m.path(name, "etc", "hostname"))
        with pytest.raises(PermissionError):
            os.stat(m.path("locked", "etc", "hostname"))
        assert _calls(sim) == ahead  # not one guest call more
        ra = _status(m)["fleet"]["readahead"]
        assert ra["started"] >= 8 and ra["listed"] >= len(linux_ok) - 2, ra


@pytest.mark.one_transport
def test_two_paths_in_two_vms_open_no_third(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    ids = _dirs(sim)
    with mounted(sim, mp, argv=fleet_argv(sim, mp, mount_config), env=fleet_env(sim)) as m:
        os.listdir(m.mnt)
        sim.reset_stats()
        with open(m.path("web", "etc", "hostname")) as f:
            assert f.read() == "web\n"
        with open(m.path("db", "root", ".ssh", "authorized_keys")) as f:
            assert "admin@corp" in f.read()
        assert set(_settled(sim)) == {ids["web"], ids["db"]}  # no walk: nothing ahead


@pytest.mark.one_transport
def test_fleet_grep_costs_each_vm_one_call_per_level(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    ids = _dirs(sim)
    with mounted(sim, mp, argv=fleet_argv(sim, mp, mount_config), env=fleet_env(sim)) as m:
        sim.reset_stats()
        proc = subprocess.run(
            f"grep -l attacker@evil {m.mnt}/*/root/.ssh/authorized_keys",
            shell=True, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.stdout.splitlines() == [m.path("web", "root", ".ssh", "authorized_keys")]
        calls = _settled(sim)
        vcenter = sim.stats()["calls"]
    # vCenter: one guest identity per VM shown (10); only the VM without Tools asks more
    assert vcenter["vm.identity"] <= 10, vcenter
    assert vcenter["vm.get"] <= 1 and vcenter["vm.guest_operations"] <= 1, vcenter
    # The listing of "/" opens the VM and answers the lookup of "root"; then one listing
    # of /root, one of /root/.ssh and one transfer: whoever asked first, user or read-ahead.
    for vm in (ids["web"], ids["db"]):
        assert calls[vm].get("files.list", 0) <= 3, calls[vm]
        assert calls[vm].get("transfer.create", 0) <= 1, calls[vm]
        assert "credentials.validate" not in calls[vm]
    assert calls[ids["locked"]] == {"files.list": 1}  # the refused login, once
    assert ids["notools"] not in calls  # Tools down: known from vCenter, no guest call


@pytest.mark.one_transport
def test_no_such_drive_in_a_windows_vm_costs_no_guest_call(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    with mounted(sim, mp, argv=fleet_argv(sim, mp, mount_config), env=fleet_env(sim)) as m:
        sim.reset_stats()
        assert not os.path.exists(m.path("win", "root", ".ssh"))  # a glob's `*/root`
        assert _calls(sim) == {}  # vCenter told the family: no guest login
        assert os.getxattr(m.path("win"), "user.guestfs.state") == b"untouched"
        with open(m.path("win", "C", "Users", "Admin", "notes.txt"), "rb") as f:
            assert f.read() == b"windows notes\r\n"  # a drive opens it as before

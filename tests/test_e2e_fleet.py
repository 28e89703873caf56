"""--all-vms end to end: a vCenter of several VMs as one tree, through the kernel."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from guestfs_mount.evidence import formats
from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, fuse_connection_dir, mount_argv, mounted

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


# ---- isolation, evidence, --frozen (issue 13 gaps) -------------------------------------
def _blocked_in(call, *args):
    """Start ``call(*args)`` in a thread; its outcome lands in the returned list."""
    out: list[object] = []

    def run():
        try:
            out.append(call(*args))
        except OSError as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _wait_until(done, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("cap", [None, "2"])
def test_one_vms_stall_never_blocks_another(sim, api, mount_config, tmp_path, cap):
    """VM A's guest stops answering (every guest call held) while programs are blocked
    in it: VM B (opened now), the fleet root and .by-id all answer meanwhile. Without a
    small cap a second VM C is stalled while it is being opened; with --max-guest-ops 2
    A's blocked programs are more than the cap (A holds at most half of it)."""
    mp = str(tmp_path / "mnt")
    via = ViaApi(sim, api)
    extra = ("--max-guest-ops", cap) if cap else ()
    argv = fleet_argv(via, mp, mount_config, "--no-prefetch", "--metadata-ttl", "60", *extra)
    ids = _dirs(sim)
    a, c = ids["web"], ids[".."]
    stalled = [a] if cap else [a, c]
    with mounted(via, mp, argv=argv, env=fleet_env(sim)) as m:
        hostile = next(n for n in os.listdir(m.mnt) if n.endswith("~" + c))
        assert "etc" in os.listdir(m.path("web"))  # A is open; nothing below / is cached
        for vm in stalled:
            sim.vm_faults(vm, stall_api=True)
        try:
            blocked = [
                _blocked_in(os.listdir, m.path("web", "etc")),
                _blocked_in(os.listdir, m.path("web", "root")),
                _blocked_in(_read_bytes, m.path("web", "root", ".ssh", "authorized_keys")),
            ]
            if c in stalled:
                blocked.append(_blocked_in(os.listdir, m.path(hostile, "etc")))  # opening
            # the stalled VMs' calls have reached the guest (held there) before B is used
            _wait_until(lambda: all(sim.vm_faults(vm)["held"] > 0 for vm in stalled))
            assert "db" in os.listdir(m.mnt)
            assert os.readlink(m.path(".by-id", ids["db"])) == "../db"
            assert os.listdir(m.path("db", "etc")) == ["hostname"]
            assert os.stat(m.path("db", "root", ".ssh", "authorized_keys")).st_size > 0
            assert b"admin@corp" in _read_bytes(m.path("db", "root", ".ssh", "authorized_keys"))
            still = [t.is_alive() for t, _ in blocked]
            assert still == [True] * len(blocked), [out for _, out in blocked]
        finally:
            sim.reset_faults()
        for t, _ in blocked:
            t.join(90)
        outcomes = [out for _, out in blocked]
        assert all(len(o) == 1 for o in outcomes)
        # once A answers again, the programs blocked in it get their answers
        assert "hostname" in outcomes[0][0] and ".ssh" in outcomes[1][0]
        assert outcomes[2][0] == (ATTACKER + "\n").encode()
        if c in stalled:
            assert outcomes[3][0] == ["hostname"]


def _evidence(*args):
    return subprocess.run([sys.executable, "-m", "guestfs_mount.cli", "evidence", *args],
                          capture_output=True, text=True, errors="replace")  # fmt: skip


@pytest.mark.one_transport
def test_evidence_names_the_vm_of_every_record(sim, mount_config, tmp_path):
    """``guestfs-mount evidence`` on a fleet: each VM's ledger, every record under its VM's
    directory; hashdeep audits one VM's tree, DFXML has a volume per VM."""
    mp = str(tmp_path / "mnt")
    argv = fleet_argv(sim, mp, mount_config, "--case", "4711")
    ids = _dirs(sim)
    with mounted(sim, mp, argv=argv, env=fleet_env(sim)) as m:
        real = os.path.realpath(m.mnt)
        for vm in ("web", "db"):
            assert _read_bytes(m.path(vm, "etc", "hostname")) == f"{vm}\n".encode()
        assert _read_bytes(m.path("win", "C", "Users", "Admin", "notes.txt"))

        # jsonl: the same guest path in two VMs, told apart
        res = _evidence(m.mnt, "--format", "jsonl")
        assert res.returncode == 0, res.stderr
        lines = [json.loads(x) for x in res.stdout.splitlines()]
        head, entries = lines[0], lines[1:]
        assert head["vm"] == "*" and {v["vm_dir"] for v in head["vms"]} == {"web", "db", "win"}
        hosts = {e["path"]: e for e in entries if e["guest_path"] == "/etc/hostname"}
        assert sorted(hosts) == ["db/etc/hostname", "web/etc/hostname"]
        assert {e["vm"] for e in hosts.values()} == {ids["web"], ids["db"]}
        assert hosts["web/etc/hostname"]["sha256"] == hashlib.sha256(b"web\n").hexdigest()
        notes = next(e for e in entries if e["path"] == "win/C/Users/Admin/notes.txt")
        assert notes["guest_path"] == "C:\\Users\\Admin\\notes.txt" and notes["vm_name"] == "win"

        # hashdeep of one VM's /etc, --walk, by its directory and by .by-id
        manifest = str(tmp_path / "web.hashdeep")
        res = _evidence(m.mnt, f".by-id/{ids['web']}/etc", "--walk", "--format", "hashdeep",
                        "-o", manifest)  # fmt: skip
        assert res.returncode == 0, res.stderr
        text = open(manifest).read()
        assert f"## web/: VM {ids['web']} (web)" in text
        entries_hd = [x for x in text.splitlines() if not x.startswith(("%", "#"))]
        assert [e.rsplit(",", 1)[1] for e in entries_hd] == [f"{real}/web/etc/hostname"]
        audit = subprocess.run(["hashdeep", "-a", "-k", manifest, "-r", m.path("web", "etc")],
                               capture_output=True, text=True)  # fmt: skip
        assert audit.returncode == 0, audit.stdout + audit.stderr

        # --walk --fetch inside one VM: only that VM is read
        sim.reset_stats()
        res = _evidence(m.mnt, "db/root", "--walk", "--fetch", "--format", "jsonl")
        assert res.returncode == 0, res.stderr
        got = [json.loads(x) for x in res.stdout.splitlines()[1:]]
        keys = next(e for e in got if e["path"] == "db/root/.ssh/authorized_keys")
        assert keys["sha256"] and keys["vm"] == ids["db"]
        assert all(e["path"].startswith("db/root") for e in got)
        assert list(sim.stats()["vms"]) == [ids["db"]]

        # bodyfile: names carry the VM's directory; mactime reads it
        body = str(tmp_path / "body")
        res = _evidence(m.mnt, "--format", "bodyfile", "-o", body)
        assert res.returncode == 0, res.stderr
        names = {line.split("|")[1] for line in open(body).read().splitlines()}
        assert {"web/etc/hostname", "db/etc/hostname", "win/C:\\Users\\Admin\\notes.txt"} <= names
        timeline = subprocess.run(["mactime", "-b", body, "-d"], capture_output=True, text=True)
        assert timeline.returncode == 0 and "web/etc/hostname" in timeline.stdout

        # DFXML: valid against the schema; a volume per VM holds that VM's fileobjects
        out = str(tmp_path / "fleet.dfxml")
        res = _evidence(m.mnt, "--format", "dfxml", "-o", out)
        assert res.returncode == 0, res.stderr
        xsd = os.path.join(os.path.dirname(__file__), "data", "dfxml", "dfxml.xsd")
        lint = subprocess.run(["xmllint", "--noout", "--schema", xsd, out],
                              capture_output=True, text=True)  # fmt: skip
        assert lint.returncode == 0, lint.stderr
        ns = {"d": formats.DFXML_NS, "gm": formats.GM_NS}
        root = ET.parse(out).getroot()
        images = [e.text for e in root.findall("d:source/d:image_filename", ns)]
        assert any((t or "").endswith(f"/{ids['win']}/C:\\") for t in images), images
        gm_vm = f"{{{formats.GM_NS}}}vm"
        by_vm = {v.get(gm_vm): v for v in root.findall("d:volume", ns)}
        assert set(by_vm) == {ids["web"], ids["db"], ids["win"]}
        web_files = [f.text for f in by_vm[ids["web"]].findall("d:fileobject/d:filename", ns)]
        assert "/etc/hostname" in web_files and "/root/.ssh/authorized_keys" not in web_files

        # paths outside any VM, and a VM that cannot be read: a clear message, no traceback
        for bad in ("nosuchvm/etc", ".by-id", ".by-id/vm-0/etc"):
            res = _evidence(m.mnt, bad, "--format", "jsonl")
            assert res.returncode == 2 and "not inside a VM" in res.stderr, res.stderr
            assert "Traceback" not in res.stderr
        with pytest.raises(PermissionError):
            os.listdir(m.path("locked"))
        res = _evidence(m.mnt, "locked", "--walk", "--format", "jsonl")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert "locked: this VM cannot be read (guest login refused" in res.stderr
        assert res.stdout.count("\n") == 1  # the header alone


def _listings_after(m, n):
    """List the fleet root until the mount has listed the inventory more than ``n`` times."""
    def more():
        os.listdir(m.mnt)
        return _status(m)["fleet"]["inventory_listings"] > n
    _wait_until(more)


@pytest.mark.one_transport
def test_frozen_keeps_the_first_inventory(sim, mount_config, tmp_path):
    """--frozen: the VMs of the first listing stay; a VM added later is not shown, one
    removed keeps its directory and fails with ENXIO and the reason; the others work."""
    ids = _dirs(sim)
    late = sim.add_vm(ids["web"], "late")["vm"]
    mp = str(tmp_path / "mnt")
    argv = fleet_argv(sim, mp, mount_config, "--frozen", "--inventory-ttl", "0.2")
    try:
        with mounted(sim, mp, argv=argv, env=fleet_env(sim)) as m:
            first = sorted(os.listdir(m.mnt))
            assert "late" in first and "off" not in first
            assert _read_bytes(m.path("late", "etc", "hostname")) == b"web\n"
            seen = _status(m)["fleet"]["inventory_listings"]
            sim.remove_vm(late)
            later = sim.add_vm(ids["db"], "later")["vm"]
            sim.power(ids["off"], "POWERED_ON")
            try:
                _listings_after(m, seen + 1)  # at least one listing after the changes
                assert sorted(os.listdir(m.mnt)) == first
                assert later not in os.listdir(m.path(".by-id"))
                # (what the kernel has cached, a stat of etc/hostname, it keeps answering)
                for access, path in ((os.listdir, ("late",)), (os.listdir, ("late", "etc")),
                                     (os.stat, ("late", "never-seen")),
                                     (_read_bytes, ("late", "etc", "hostname"))):  # fmt: skip
                    with pytest.raises(OSError) as info:
                        access(m.path(*path))
                    assert info.value.errno == errno.ENXIO, (access, path)
                reason = os.getxattr(m.path("late"), "user.guestfs.error").decode()
                assert "left the vCenter inventory listing" in reason and "--frozen" in reason
                assert os.getxattr(m.path("late"), "user.guestfs.state") == b"gone"
                assert _read_bytes(m.path("web", "etc", "hostname")) == b"web\n"
                doc = _status(m)["fleet"]
                assert doc["inventory_frozen"] is True and doc["inventory_unshown"] == 2
                row = next(v for v in doc["vms"] if v["vm"] == late)
                assert row["state"] == "gone" and row["errno"] == "ENXIO"
                text = subprocess.run(
                    [sys.executable, "-m", "guestfs_mount.cli", "status", m.mnt],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                assert "inventory frozen (2 new VMs not shown)" in text
            finally:
                sim.power(ids["off"], "POWERED_OFF")
                sim.remove_vm(later)
    finally:
        if late in _dirs(sim):
            sim.remove_vm(late)


def _fuse_waiting(mnt):
    """Requests of the mount sent by the kernel or queued for it, not answered yet."""
    with open(os.path.join(fuse_connection_dir(mnt), "waiting")) as f:
        return int(f.read())


@pytest.mark.one_transport
def test_many_programs_stuck_in_one_vm_leave_the_others_alone(sim, mount_config, tmp_path):
    """More programs blocked in one stalled VM than a single-VM mount serves requests
    at once (64): another VM still answers."""
    mp = str(tmp_path / "mnt")
    argv = fleet_argv(sim, mp, mount_config, "--no-prefetch", "--metadata-ttl", "60")
    a = _dirs(sim)["web"]
    with mounted(sim, mp, argv=argv, env=fleet_env(sim)) as m:
        os.stat(m.path("web", "etc", "hostname"))  # looked up: each open reaches the mount
        sim.vm_faults(a, stall_api=True)
        try:
            blocked = [_blocked_in(_read_bytes, m.path("web", "etc", "hostname"))
                       for _ in range(80)]  # fmt: skip
            _wait_until(lambda: sim.vm_faults(a)["held"] > 0)
            # all 80 are in the kernel's queue: B's requests come after them (FIFO)
            _wait_until(lambda: _fuse_waiting(m.mnt) >= 80)
            t, out = _blocked_in(os.listdir, m.path("db", "etc"))
            t.join(30)
            assert out == [["hostname"]]
            assert sum(t.is_alive() for t, _ in blocked) == 80
        finally:
            sim.reset_faults()
        for t, _ in blocked:
            t.join(90)
        assert all(out == [b"web\n"] for _, out in blocked)


@pytest.mark.one_transport
def test_a_hung_guest_timing_out_does_not_fail_the_others_fast(sim, mount_config, tmp_path):
    """A guest call of VM A that gets no answer within the call deadline opens A's own
    circuit breaker, not vCenter's: VM B (opened after it) still answers."""
    mp = str(tmp_path / "mnt")
    # --timeout 5: a guest call gives up after 2 s (mount.client_deadlines)
    argv = fleet_argv(sim, mp, mount_config, "--no-prefetch", "--timeout", "5")
    a = _dirs(sim)["web"]
    with mounted(sim, mp, argv=argv, env=fleet_env(sim)) as m:
        assert "etc" in os.listdir(m.path("web"))
        sim.vm_faults(a, stall_api=True)
        try:
            with pytest.raises(OSError) as info:
                os.listdir(m.path("web", "root"))  # held by the guest until the deadline
            assert info.value.errno in (errno.EIO, errno.ETIMEDOUT, errno.EHOSTDOWN)
            assert os.listdir(m.path("db", "etc")) == ["hostname"]
            assert b"admin@corp" in _read_bytes(m.path("db", "root", ".ssh", "authorized_keys"))
        finally:
            sim.reset_faults()


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


# ---- the vim25 inventory (issue 13: thousands of VMs, a first open without vCenter calls) --


def _vcenter_calls(sim):
    stats = sim.stats()
    return {k: v for k, v in {**stats["calls"], **stats["vim_calls"]}.items() if v}


@pytest.mark.one_transport
def test_vim25_first_access_in_a_vm_costs_only_its_guest_listing(sim, mount_config, tmp_path):
    mp = str(tmp_path / "mnt")
    ids = _dirs(sim)
    via = ViaApi(sim, "vi-json")
    with mounted(via, mp, argv=fleet_argv(via, mp, mount_config), env=fleet_env(sim)) as m:
        assert _status(m)["fleet"]["inventory_source"] == "vim25"
        os.listdir(m.path("db"))  # the transport's one-time look-ups (managers) happen here
        sim.reset_stats()
        assert os.path.isdir(m.path("web", "etc"))  # opens "web": the lookup of "etc" in "/"
        # family and Tools came with the listing: no identity, power or Tools call, no
        # REST call at all; one guest call, the listing of "/"
        assert _vcenter_calls(sim) == {"vi-json.ListFilesInGuest": 1}
        assert _calls(sim) == {ids["web"]: {"files.list": 1}}
        sim.reset_stats()
        with pytest.raises(OSError) as err:  # Tools down: known from the listing too
            os.listdir(m.path("notools"))
        assert err.value.errno == errno.EHOSTDOWN
        assert _vcenter_calls(sim) == {}


def test_vim25_lists_a_fleet_that_rest_refuses(mount_config, tmp_path):
    # --vm-list-limit lowers REST's 4,000-result refusal: "prod/web" alone holds more
    # than 10 VMs, so no split by folder can list this fleet over REST.
    from guestfs_mount.sim import fleet

    n, seed = 60, 5
    specs = fleet.specs(n, seed)
    assert sum(s.folder_path == "prod/web" for s in specs) > 10
    with run_simulator("--fleet", str(n), "--fleet-seed", str(seed), "--vm-list-limit", "10") as s:
        mp = str(tmp_path / "mnt")
        via = ViaApi(s, "soap")
        with mounted(via, mp, argv=fleet_argv(via, mp, mount_config), env=fleet_env(s)) as m:
            shown = [d for d in os.listdir(m.mnt) if d != ".by-id"]
            by_id = os.listdir(m.path(".by-id"))
            st = _status(m)["fleet"]
    on = [i for i, sp in enumerate(specs) if sp.power_state == "POWERED_ON"]
    assert len(shown) == len(on) and sorted(by_id) == sorted(f"vm-{fleet.FIRST_ID + i}" for i in on)
    assert st["inventory_source"] == "vim25" and st["inventory_error"] is None


def test_a_standalone_esxi_host_is_a_fleet_over_soap(tmp_path):
    # No /api on a host: the vim25 inventory is the only one it has.
    with run_simulator("--as-esxi", "--fleet", "12", "--fleet-seed", "1") as s:
        pw = tmp_path / "pw"
        pw.write_text(s.guest_password + "\n")
        pw.chmod(0o600)
        cfg = tmp_path / "fleet.toml"
        cfg.write_text(f"[[guest_credentials]]\nguest_user = {_toml_str(s.guest_user)}\n"
                       f"guest_password_file = {_toml_str(str(pw))}\n")  # fmt: skip
        cfg.chmod(0o600)
        mp = str(tmp_path / "mnt")
        via = ViaApi(s, "soap")
        with mounted(via, mp, argv=fleet_argv(via, mp, str(cfg)), env=fleet_env(s)) as m:
            assert {"web-01", "db-01", "win-dc-01", "no-tools"} <= set(os.listdir(m.mnt))
            with open(m.path("web-01", "etc", "hostname")) as f:
                assert f.read() == "vm-1000\n"
            calls = _vcenter_calls(s)
    assert calls["soap.CreateContainerView"] == 1 and calls["soap.DestroyView"] == 1
    assert not any(k.startswith(("vm.", "folder.")) for k in calls)  # no REST at all

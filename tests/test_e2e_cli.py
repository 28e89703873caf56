"""Everyday use end to end: a profile from the config file, the fstab form through the
real mount.fuse3 helper, systemd's notify protocol, and the packaged console scripts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import mounted, unmount
from tests import trees

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin, where pip put guestfs-mount
SECRET_ENV = ("GUESTFS_USER", "GUESTFS_PASSWORD", "GUESTFS_GUEST_USER", "GUESTFS_GUEST_PASSWORD")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("guest"))
    trees.build(root)
    with run_simulator("--root", root) as s:
        yield s


@pytest.fixture
def setup(sim, tmp_path):
    """A config file with the simulator as [servers.sim] and [profiles.web], password
    files beside it, and an environment without any GUESTFS_* secret."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "vc").write_text(sim.password + "\n")
    (secrets / "guest").write_text(sim.guest_password + "\n")
    for f in secrets.iterdir():
        f.chmod(0o600)
    esx_ca = getattr(sim, "esx_ca_file", None) or sim.ca_file
    conf = tmp_path / "config.toml"
    conf.write_text(
        f"""
[servers.sim]
server = "{sim.vcenter_url}"
user = "{sim.user}"
password_file = "secrets/vc"
ca_file = "{sim.ca_file}"
esx_ca_file = "{esx_ca}"
esx_hosts = ["127.0.0.1:{sim.esx_port}"]

[profiles.web]
server = "sim"
vm = "{sim.vms[0]["name"]}"
guest_user = "{sim.guest_user}"
guest_password_file = "secrets/guest"
options = {{ frozen = true, metadata_ttl = 120 }}
"""
    )
    conf.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")  # no user config gets in the way
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return {"conf": str(conf), "env": env, "mnt": str(mnt), "tmp": tmp_path}


def _cmdlines():
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    yield f.read()
            except OSError:
                pass


def _wait_gone(mnt, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.fsencode(mnt) in c and b"guestfs" in c for c in _cmdlines()):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.fuse
def test_profile_mount_with_password_files(sim, setup):
    argv = [
        sys.executable, "-m", "guestfs_mount.cli",
        "--config", setup["conf"], "--profile", "web", "--foreground", setup["mnt"],
    ]  # fmt: skip
    with mounted(sim, setup["mnt"], argv=argv, env=setup["env"]) as m:
        with open(m.path("etc/hosts")) as f:
            assert "localhost" in f.read()
        assert not any(
            sim.password.encode() in c or sim.guest_password.encode() in c for c in _cmdlines()
        )
    text = m.stderr_text() if os.path.exists(m.stderr_path) else ""
    assert sim.password not in text and sim.guest_password not in text


@pytest.mark.fuse
def test_profile_config_errors_are_one_line(sim, setup):
    with open(setup["conf"], "a") as f:
        f.write('\n[profiles.bad]\nserver = "sim"\nvm = "x"\noptions = { metadata_tll = 1 }\n')
    res = subprocess.run(
        ["guestfs-mount", "--config", setup["conf"], "--profile", "bad", setup["mnt"]],
        env=setup["env"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"guestfs-mount: error: {setup['conf']}: [profiles.bad] options.metadata_tll: "
        "unknown option"
    ]


@pytest.mark.fuse
@pytest.mark.skipif(shutil.which("mount.fuse3") is None, reason="needs mount.fuse3 (fuse3)")
def test_fstab_form_through_mount_fuse3(sim, setup):
    """What mount(8) does for ``web MNT fuse.guestfs-mount _netdev,allow_other,... 0 0``:
    mount.fuse3 runs ``guestfs-mount web MNT -o OPTS`` (found on $PATH) and returns once
    the daemon is ready."""
    mnt = setup["mnt"]
    opts = f"_netdev,allow_other,frozen,metadata_ttl=30,noauto,nofail,x-systemd.automount,config={setup['conf']}"
    res = subprocess.run(
        ["mount.fuse3", "web", mnt, "-t", "guestfs-mount", "-o", opts],
        env=setup["env"], capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)  # ready when mount.fuse3 returned
        with open(os.path.join(mnt, "etc/hosts")) as f:
            assert "localhost" in f.read()
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if f" {mnt} " in ln)
        assert "allow_other" in line and " ro" in line
    finally:
        unmount(mnt)
    assert _wait_gone(mnt)
    assert not os.path.ismount(mnt)


@pytest.mark.fuse
@pytest.mark.skipif(shutil.which("mount.fuse3") is None, reason="needs mount.fuse3 (fuse3)")
def test_fstab_form_refuses_rw(sim, setup):
    res = subprocess.run(
        ["mount.fuse3", "web", setup["mnt"], "-t", "guestfs-mount", "-o", f"rw,config={setup['conf']}"],
        env=setup["env"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode != 0
    assert "read-only" in res.stderr
    assert not os.path.ismount(setup["mnt"])


@pytest.mark.fuse
def test_sd_notify_ready_and_stopping(sim, setup):
    """Type=notify: READY=1 only once the mount is usable, STOPPING=1 at unmount."""
    mnt = setup["mnt"]
    sockdir = tempfile.mkdtemp(prefix="gfs-notify-", dir="/tmp")  # sun_path is short
    addr = os.path.join(sockdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(60)
    env = dict(setup["env"], NOTIFY_SOCKET=addr)
    err_path = os.path.join(sockdir, "stderr")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            ["guestfs-mount", "--foreground", "--config", setup["conf"], "--profile", "web", mnt],
            env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
        )  # fmt: skip
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.split("\n")
        assert os.path.ismount(mnt)  # usable when READY=1 arrives, not later
        assert "etc" in os.listdir(mnt)
        assert proc.poll() is None
        unmount(mnt)
        msg = sock.recv(4096).decode()
        assert "STOPPING=1" in msg.split("\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        unmount(mnt, lazy=True)
        sock.close()
        with open(err_path) as f:
            text = f.read()
        shutil.rmtree(sockdir)
    assert "Traceback" not in text, text
    assert not os.path.ismount(mnt)


def test_systemd_unit_example():
    unit = os.path.join(ROOT, "docs/systemd/guestfs-mount@.service")
    with open(unit) as f:
        text = f.read()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "KillSignal=SIGTERM",
        "ExecStart=",
        "--foreground --profile %i /mnt/%i",
        "ExecStop=",
        "TimeoutStopSec=",
    ):
        assert line in text, line


@pytest.mark.slow
def test_wheel_has_both_console_scripts(tmp_path):
    """``pip wheel . --no-deps`` builds (offline if the build backend is at hand) a wheel
    whose entry points name both commands; built from a copy so the tree stays clean."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(
        os.path.join(ROOT, "guestfs_mount"),
        src / "guestfs_mount",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = tmp_path / "wheels"
    base = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(out), "-q"]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    res = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    if res.returncode != 0:  # no index reachable for the isolated build: use ours
        res = subprocess.run(
            [*base, "--no-build-isolation"], capture_output=True, text=True, timeout=300, env=env
        )
    if res.returncode != 0:
        pytest.skip(f"pip cannot build a wheel here (offline?): {res.stderr.strip()[-300:]}")
    (wheel,) = out.glob("guestfs_mount-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(ep).decode()
    assert "[console_scripts]" in entry_points
    assert "guestfs-mount = guestfs_mount.cli:main" in entry_points
    assert "guestfs-sim = guestfs_mount.sim.cli:main" in entry_points
    assert "guestfs_mount/config.py" in names
    assert "guestfs_mount/py.typed" in names


@pytest.mark.parametrize("package", ["hypercorn", "starlette", "trustme"])
def test_sim_without_its_extra_says_what_to_install(package):
    """``pip install guestfs-mount`` without ``[sim]``: one line, no traceback."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] == {package!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from guestfs_mount.sim.cli import main\n"
        "sys.exit(main(['--demo']))\n"
    )
    res = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"guestfs-sim: {package} is missing: install the simulator with "
        "pip install 'guestfs-mount[sim]'"
    ]

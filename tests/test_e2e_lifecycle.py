"""Starting, refusing to start, and stopping: what a user sees on the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import (
    fuse_connection_dir,
    mount_argv,
    mount_env,
    mounted,
    unmount,
    wait_for_mount,
)
from tests import trees

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("guest"))
    trees.build(root)
    trees.write_random_file(os.path.join(root, "slow.bin"), 64 << 20)
    return root


@pytest.fixture(scope="module")
def sim(source):
    with run_simulator("--root", source) as s:
        yield s


def _start(sim, mnt, *extra, env=None, vm=None):
    """Daemon mode (the default): returns when mounted or failed."""
    return subprocess.run(
        mount_argv(sim, mnt, *extra, vm=vm),
        env=env or mount_env(sim),
        capture_output=True,
        text=True,
        timeout=90,
    )


def _daemon_pids(mnt):
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"guestfs_mount.cli" in argv and os.fsencode(mnt) in argv:
                pids.append(int(pid))
    return pids


def _assert_refused(res, *words, secrets=()):
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("guestfs-mount: error: ")
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    for s in secrets:
        assert s not in res.stderr and s not in res.stdout


def test_daemon_mode_returns_when_ready_and_unmounts(sim, tmp_path):
    mnt = str(tmp_path / "m")
    os.mkdir(mnt)
    res = _start(sim, mnt)
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)  # ready when the command returned, not later
        with open(os.path.join(mnt, "etc/hosts")) as f:
            assert "localhost" in f.read()
    finally:
        unmount(mnt)
    deadline = time.monotonic() + 15
    while _daemon_pids(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _daemon_pids(mnt)
    assert not os.path.ismount(mnt)


def test_wrong_vcenter_password(sim, tmp_path):
    mnt = str(tmp_path)
    res = _start(sim, mnt, env=mount_env(sim, GUESTFS_PASSWORD="wrong-pass-123"))
    _assert_refused(res, "login", secrets=["wrong-pass-123", sim.password])
    assert not os.path.ismount(mnt)


def test_wrong_guest_password(sim, tmp_path):
    res = _start(sim, str(tmp_path), env=mount_env(sim, GUESTFS_GUEST_PASSWORD="bad-guest-pw"))
    _assert_refused(res, "guest", secrets=["bad-guest-pw", sim.guest_password])


def test_unknown_vm(sim, tmp_path):
    res = _start(sim, str(tmp_path), vm="no-such-vm")
    _assert_refused(res, "no-such-vm", "vm")


def test_vm_powered_off(sim, tmp_path):
    vm = sim.vms[0]["vm"]
    sim.power(vm, "POWERED_OFF")
    try:
        res = _start(sim, str(tmp_path))
    finally:
        sim.power(vm, "POWERED_ON")
    _assert_refused(res, "powered off")


def test_tools_not_running(sim, tmp_path):
    vm = sim.vms[0]["vm"]
    sim.tools(vm, False)
    try:
        res = _start(sim, str(tmp_path))
    finally:
        sim.tools(vm, True)
    _assert_refused(res, "tools")


def test_unreachable_server(sim, tmp_path):
    argv = mount_argv(sim, str(tmp_path))
    argv[3] = "https://127.0.0.1:9"
    res = subprocess.run(argv, env=mount_env(sim), capture_output=True, text=True, timeout=90)
    _assert_refused(res, "127.0.0.1:9")


def test_untrusted_certificate(sim, tmp_path):
    argv = [a for a in mount_argv(sim, str(tmp_path)) if a != sim.ca_file and a != "--ca-file"]
    res = subprocess.run(argv, env=mount_env(sim), capture_output=True, text=True, timeout=90)
    _assert_refused(res, "certificate")


def test_mount_point_missing(sim, tmp_path):
    res = _start(sim, str(tmp_path / "nope"))
    _assert_refused(res, "does not exist")


def test_mount_point_not_empty(sim, tmp_path):
    (tmp_path / "file").write_text("x")
    res = _start(sim, str(tmp_path))
    _assert_refused(res, "not empty")


def test_mount_point_already_mounted(sim, tmp_path):
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt):
        res = _start(sim, mnt)
        _assert_refused(res, "already")
        assert os.path.ismount(mnt)


def test_sigterm_during_active_read_unmounts(sim, tmp_path):
    mnt = str(tmp_path / "m")
    sim.faults(bandwidth=2 << 20)  # 64 MiB at 2 MiB/s: the read is still running
    outcome: dict[str, object] = {}
    try:
        with mounted(sim, mnt) as m:

            def reader():
                try:
                    with open(os.path.join(mnt, "slow.bin"), "rb") as f:
                        while f.read(1 << 20):
                            pass
                    outcome["done"] = True
                except OSError as exc:
                    outcome["errno"] = exc.errno

            t = threading.Thread(target=reader, daemon=True)
            t.start()
            time.sleep(1.5)
            t0 = time.monotonic()
            m.proc.send_signal(signal.SIGTERM)
            m.proc.wait(timeout=30)
            elapsed = time.monotonic() - t0
            t.join(timeout=30)
            assert not t.is_alive(), "reader still blocked after the daemon exited"
            assert m.proc.returncode == 0
            assert not os.path.ismount(mnt)
            assert "errno" in outcome  # an error, not a silently short file
            assert elapsed < 20
    finally:
        sim.reset_faults()


def test_an_aborted_connection_ends_the_daemon_cleanly(sim, tmp_path):
    # An admin's abort through fusectl leaves the mount in place and libfuse skips the
    # unmount (it finds the device errored): the daemon must still leave no dead mount
    # behind (ENOTCONN for every later access) and exit 0, the mount being over.
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt) as m:
        assert os.listdir(os.path.join(mnt, "etc"))
        conn = fuse_connection_dir(mnt)
        if not os.path.exists(conn):
            pytest.skip("no fusectl connection directory")
        with open(os.path.join(conn, "abort"), "w") as f:
            f.write("1")
        m.proc.wait(timeout=30)
        assert m.proc.returncode == 0, m.stderr_text()
        assert not os.path.ismount(mnt)
        assert "Traceback" not in m.stderr_text()


def test_stale_mount_is_cleaned(sim, tmp_path):
    mnt = str(tmp_path / "m")
    os.mkdir(mnt)
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(
            mount_argv(sim, mnt, "--foreground"), env=mount_env(sim), stdout=devnull, stderr=devnull
        )
    try:
        wait_for_mount(mnt, proc, 30)
        proc.kill()
        proc.wait()
        with pytest.raises(OSError):
            os.listdir(mnt)  # "Transport endpoint is not connected"
        res = _start(sim, mnt)
        assert res.returncode == 0, res.stderr
        assert "stale" in res.stderr
        assert os.path.exists(os.path.join(mnt, "etc/hosts"))
    finally:
        unmount(mnt)
        unmount(mnt, lazy=True)


def _pin(url: str) -> str:
    import hashlib
    import ssl
    from urllib.parse import urlsplit

    u = urlsplit(url)
    assert u.hostname and u.port
    pem = ssl.get_server_certificate((u.hostname, u.port))
    return f"{u.hostname}:{u.port}=" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def test_thumbprint_pins_replace_the_ca(sim, tmp_path):
    mnt = str(tmp_path / "m")
    base = [a for a in mount_argv(sim, mnt) if a not in (sim.ca_file, "--ca-file")]
    base = [a for a in base if a not in (getattr(sim, "esx_ca_file", None), "--esx-ca-file")]
    esx = _pin(sim.esx_url)
    pins = ["--thumbprint", _pin(sim.vcenter_url), "--thumbprint", esx]
    os.mkdir(mnt)
    with mounted(sim, mnt, argv=[*base, "--foreground", *pins]) as m:
        assert "localhost" in open(m.path("etc/hosts")).read()
    wrong = esx.rsplit("=", 1)[0] + "=" + "00" * 32
    bad = [*base, "--thumbprint", _pin(sim.vcenter_url), "--thumbprint", wrong]
    with mounted(sim, mnt, argv=[*bad, "--foreground"]) as m, pytest.raises(OSError):
        open(m.path("etc/hosts")).read()  # the ESXi host's certificate is not the pinned one


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_bad_guest_root_is_a_usage_error(sim, tmp_path, foreground):
    """Found only once connected, but the user's input all the same: exit status 2."""
    extra = ["--guest-root", "/no/such/dir", *(["--foreground"] if foreground else [])]
    res = _start(sim, str(tmp_path), *extra)
    _assert_refused(res, "guest root '/no/such/dir'")
    assert res.returncode == 2
    assert not os.path.ismount(str(tmp_path))


def _cache_copies(tmp, content):
    """Directories in ``tmp`` holding a file with ``content`` (a cached guest file)."""
    found = []
    for name in os.listdir(tmp):
        d = os.path.join(tmp, name)
        if os.path.isdir(d) and not os.path.islink(d):
            for f in os.listdir(d):
                with open(os.path.join(d, f), "rb") as fh:
                    if fh.read() == content:
                        found.append(d)
    return found


def test_cache_of_a_killed_daemon_is_removed_by_the_next_mount(sim, source, tmp_path):
    """Issue 10 item 14: SIGKILL (or the OOM killer) leaves the cache, with a copy of the
    guest's /etc/shadow, in $TMPDIR; the next mount removes it, and nothing else."""
    other = 12345
    tmp = str(tmp_path / "tmp")
    os.mkdir(tmp)
    os.chmod(tmp, 0o1777)
    theirs = os.path.join(tmp, f"guestfs-mount-cache-{other}-1-abcdefgh")
    os.mkdir(theirs)
    with open(os.path.join(theirs, "1"), "w") as f:
        f.write("theirs")
    os.chown(theirs, other, other)
    env = mount_env(sim, TMPDIR=tmp)
    shadow = open(os.path.join(source, "etc/shadow"), "rb").read()
    mnt = str(tmp_path / "m")
    os.mkdir(mnt)
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(
            mount_argv(sim, mnt, "--foreground"), env=env, stdout=devnull, stderr=devnull
        )
    try:
        wait_for_mount(mnt, proc, 30)
        assert open(os.path.join(mnt, "etc/shadow"), "rb").read() == shadow
        [dead] = _cache_copies(tmp, shadow)
        proc.kill()
        proc.wait()
        unmount(mnt, lazy=True)
        assert _cache_copies(tmp, shadow) == [dead]  # what SIGKILL leaves behind
        with open(os.devnull, "wb") as devnull:
            proc = subprocess.Popen(
                mount_argv(sim, mnt, "--foreground"), env=env, stdout=devnull, stderr=devnull
            )
        wait_for_mount(mnt, proc, 30)
        assert not os.path.exists(dead)
        assert open(os.path.join(theirs, "1")).read() == "theirs"  # another user's: kept
        unmount(mnt)
        assert proc.wait(timeout=30) == 0
        assert os.listdir(tmp) == [os.path.basename(theirs)]  # a clean exit removes its own
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mnt)
        unmount(mnt, lazy=True)

"""Secrets and access: passwords and tokens never leak; the cache and the mount are private;
TLS is verified for vCenter and for the ESXi transfer host."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import mount_argv, mount_env, mounted
from tests import trees

pytestmark = pytest.mark.fuse

VC_PASSWORD = "Vc-Pa55word-Zq81xK"
GUEST_PASSWORD = "Gst-Pa55word-Mw47yT"
NOBODY = 65534


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("guest"))
    trees.build(root)
    os.chmod(root, 0o755)  # the guest's / (mktemp made it 0700)
    return root


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("sim", "esx_sim"):
        if name in request.fixturenames:
            s = request.getfixturevalue(name)
            s.reset_faults()
            s.power(s.vm_id(), "POWERED_ON")


@pytest.fixture(scope="module")
def sim(source: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("pw")
    (d / "vc").write_text(VC_PASSWORD + "\n")
    (d / "guest").write_text(GUEST_PASSWORD + "\n")
    with run_simulator(
        "--root", source, "--password-file", str(d / "vc"),
        "--guest-password-file", str(d / "guest"), "--access-log",
    ) as s:  # fmt: skip
        assert s.password == VC_PASSWORD and s.guest_password == GUEST_PASSWORD
        yield s


def _all_cmdlines() -> bytes:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read())
            except OSError:
                pass
    return b"\n".join(out)


def _content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read(path: str) -> bytes | int:
    """The content, or the errno the read failed with."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        return exc.errno or -1


def test_no_secret_in_argv_logs_audit_or_errors(sim: Any, tmp_path: Any) -> None:
    log_file = str(tmp_path / "daemon.log")
    audit = str(tmp_path / "audit.jsonl")
    pwd = tmp_path / "pwfile"
    pwd.write_text(VC_PASSWORD + "\n")
    pwd.chmod(0o600)
    env = mount_env(sim)
    del env["GUESTFS_PASSWORD"]  # the vCenter password from a file, the guest one from env
    mnt = str(tmp_path / "m")
    errors: list[str] = []
    seen_argv = b""
    vm = sim.vm_id()
    with mounted(
        sim, mnt, "--debug", "--log-file", log_file, "--audit-log", audit,
        "--password-file", str(pwd), "--timeout", "5", "--no-prefetch", env=env,
    ) as m:  # fmt: skip
        seen_argv += _all_cmdlines()
        assert b"localhost" in _content(m.path("etc/hosts"))
        assert len(_content(m.path("data/one-mib.bin"))) == 1 << 20
        for sub in ("data", "names", "links"):
            os.listdir(m.path(sub))
        time.sleep(5.5)  # past the client's fresh-session window (see test_e2e_faults)
        sim.expire_sessions()  # the password is sent again
        sim.faults(abort_after={"bytes": 1000})
        res = _read(m.path("data/odd-size.bin"))
        assert res == errno.EIO
        sim.reset_faults()
        assert _read(m.path("no/such/file")) == errno.ENOENT
        sim.power(vm, "POWERED_OFF")
        try:
            res = _read(m.path("data/nested/deeper/b.txt"))
            assert res == errno.EIO
        finally:
            sim.power(vm, "POWERED_ON")
        seen_argv += _all_cmdlines()
        for p in ("data/small.txt", "solo/shared.bin"):
            try:
                with open(m.path(p), "w"):
                    pass
            except OSError as exc:
                errors.append(f"{exc!s} {exc!r}")
        daemon_stderr = m.stderr_text()
    with open(log_file, encoding="utf-8", errors="replace") as f:
        log_text = f.read()
    with open(audit, encoding="utf-8", errors="replace") as f:
        audit_text = f.read()
    assert "GET" in log_text or "POST" in log_text, "no --debug API lines in the log"
    assert audit_text.count("\n") >= 2
    assert "<redacted>" in log_text  # transfer URLs were logged (--debug), without token
    haystacks = {
        "argv of all processes": seen_argv.decode(errors="replace"),
        "daemon stderr": daemon_stderr,
        "--log-file": log_text,
        # MD5 digests of file contents are 32 hex digits too; they are not session ids.
        "--audit-log": re.sub(r'"md5":"[0-9a-f]{32}"', "", audit_text),
        "exception messages": "\n".join(errors),
    }
    for where, text in haystacks.items():
        for secret in (VC_PASSWORD, GUEST_PASSWORD):
            assert secret not in text, f"a password ({secret[:4]}...) is in the {where}"
        assert not re.search(r"token=(?!<redacted>)", text), f"a transfer token in the {where}"
        assert "vmware-api-session-id" not in text.lower() or where == "argv of all processes"
        # session ids are 32 hex digits; no such free-standing string may be logged
        assert not re.search(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", text), where


def test_cache_dir_private_while_file_open(sim: Any, tmp_path: Any) -> None:
    cache = str(tmp_path / "cache")
    mp = str(tmp_path / "m")
    with (
        mounted(sim, mp, "--cache-dir", cache, "--no-prefetch") as m,
        open(m.path("data/one-mib.bin"), "rb") as f,
    ):
        if True:
            f.read(4096)
            st = os.stat(cache)
            assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
            names = os.listdir(cache)
            assert names, "no cache file while a file is open"
            for name in names:
                fst = os.lstat(os.path.join(cache, name))
                assert stat.S_ISREG(fst.st_mode)
                assert stat.S_IMODE(fst.st_mode) == 0o600, (name, oct(fst.st_mode))
                # cache file names never come from guest data
                assert "one-mib" not in name


@pytest.fixture
def public_mnt() -> Iterator[str]:
    """A mount point every user can reach (pytest's tmp dirs are 0700)."""
    base = tempfile.mkdtemp(prefix="guestfs-access-", dir="/tmp")
    os.chmod(base, 0o755)
    mnt = os.path.join(base, "m")
    os.mkdir(mnt)
    os.chmod(mnt, 0o755)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        os.rmdir(mnt)
        os.rmdir(base)


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True,
        timeout=30, cwd="/",
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_other_users_locked_out_without_allow_other(sim: Any, public_mnt: str) -> None:
    with mounted(sim, public_mnt):
        res = _as_nobody("ls", public_mnt)
        assert res.returncode != 0
        assert "Permission denied" in res.stderr, res.stderr
        res = _as_nobody("cat", os.path.join(public_mnt, "etc/hosts"))
        assert res.returncode != 0 and "Permission denied" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_allow_other_applies_guest_modes(sim: Any, public_mnt: str, source: str) -> None:
    assert stat.S_IMODE(os.stat(os.path.join(source, "etc/hosts")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(source, "etc/shadow")).st_mode) == 0o600
    with mounted(sim, public_mnt, "--allow-other"):
        res = _as_nobody("cat", os.path.join(public_mnt, "etc/hosts"))
        assert res.returncode == 0 and "localhost" in res.stdout, res.stderr
        res = _as_nobody("cat", os.path.join(public_mnt, "etc/shadow"))
        assert res.returncode != 0 and "Permission denied" in res.stderr, res
        # root (the mounting user) still reads it
        with open(os.path.join(public_mnt, "etc/shadow"), "rb") as f:
            assert f.read().startswith(b"root:")


# --- TLS to the ESXi transfer host ------------------------------------------------------------


@pytest.fixture(scope="module")
def esx_sim(source: str) -> Iterator[Any]:
    with run_simulator("--root", source, "--separate-esx-ca") as s:
        assert s.esx_ca_file and s.esx_ca_file != s.ca_file
        yield s


def _argv_without_esx_ca(sim: Any, mnt: str, *extra: str) -> list[str]:
    argv = mount_argv(sim, mnt, "--foreground", "--no-prefetch", "--timeout", "5", *extra)
    i = argv.index("--esx-ca-file")
    return argv[:i] + argv[i + 2 :]


def test_esx_tls_verified_with_vcenter_ca_only(esx_sim: Any, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    argv = _argv_without_esx_ca(esx_sim, mnt)
    with mounted(esx_sim, mnt, argv=argv) as m:
        assert "hosts" in os.listdir(m.path("etc"))  # metadata comes from vCenter: fine
        assert _read(m.path("etc/hosts")) == errno.EIO  # content from ESXi: refused
        text = m.stderr_text()
    assert "certificate" in text.lower(), text


def test_esx_tls_ok_with_esx_ca_file(esx_sim: Any, tmp_path: Any) -> None:
    with mounted(esx_sim, str(tmp_path / "m"), "--no-prefetch") as m:  # adds --esx-ca-file
        assert b"localhost" in _content(m.path("etc/hosts"))


def test_insecure_skips_verification(esx_sim: Any, tmp_path: Any) -> None:
    mnt = str(tmp_path / "m")
    argv = [a for a in _argv_without_esx_ca(esx_sim, mnt, "--insecure")]
    i = argv.index("--ca-file")
    argv = argv[:i] + argv[i + 2 :]
    with mounted(esx_sim, mnt, argv=argv) as m:
        assert b"localhost" in _content(m.path("etc/hosts"))
        assert "insecure" in m.stderr_text().lower()


def test_daemon_never_dumps_core(sim: Any, tmp_path: Any) -> None:
    """The daemon holds the passwords in memory: core dumps are off for it."""
    with mounted(sim, str(tmp_path / "m")) as m:
        with open(f"/proc/{m.pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max core file size"))
        assert line.split()[4:6] == ["0", "0"], line

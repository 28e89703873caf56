"""The audit log against a hostile local user and a hostile guest (issue 10 items 10, 16):
it is opened like the log file (never a planted link, never another user's file, created
0600), and two guest paths that differ only in bytes that are not UTF-8 stay apart in it
and in the evidence exports. Each test runs the real command line on the simulator."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mount_argv, mount_env, mounted, unmount

pytestmark = pytest.mark.fuse

OTHER_UID = 12345
# Two names that differ only in one byte that is not UTF-8: jq shows both as "caf\ufffd".
NAMES = [b"caf\xe9.txt", b"caf\xff.txt"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("guest")
    (root / "etc").mkdir()
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    for i, name in enumerate(NAMES):
        with open(os.path.join(os.fsencode(str(root)), b"etc", name), "wb") as f:
            f.write(b"version %d\n" % i)
    # REST: the vim25 transports cannot carry a name that is not UTF-8.
    with run_simulator("--root", str(root)) as s:
        yield ViaApi(s, "rest")


def _start(sim: Any, mnt: str, *extra: str) -> Any:
    os.makedirs(mnt, exist_ok=True)
    return subprocess.run(
        mount_argv(sim, mnt, *extra), env=mount_env(sim), capture_output=True, text=True,
        timeout=90,
    )  # fmt: skip


def _assert_refused(res: Any, mnt: str) -> None:
    """Exit 2, one line saying why, nothing mounted."""
    was_mounted = os.path.ismount(mnt)
    if was_mounted:
        unmount(mnt)
    assert not was_mounted, res.stderr
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("guestfs-mount: error: audit log "), lines
    assert "refused" in lines[0], lines


def _victim(tmp_path: Any) -> str:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    return str(victim)


@pytest.mark.parametrize("kind", ["symlink", "other-owner"])
def test_audit_log_planted_by_another_user_is_refused(sim: Any, tmp_path: Any, kind: str) -> None:
    victim = _victim(tmp_path)
    audit = str(tmp_path / "audit.jsonl")
    if kind == "symlink":
        os.symlink(victim, audit)
    else:
        with open(audit, "w") as f:
            f.write("")
        os.chmod(audit, 0o600)
        os.chown(audit, OTHER_UID, OTHER_UID)
    mnt = str(tmp_path / "m")
    _assert_refused(_start(sim, mnt, "--audit-log", audit), mnt)
    with open(victim) as f:
        assert f.read() == "precious\n"
    if kind == "other-owner":
        assert os.path.getsize(audit) == 0


def _lines(path: Any) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def _evidence(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "evidence", *args],
        capture_output=True, timeout=60,
    )  # fmt: skip


def test_audit_log_new_file_is_private_and_names_stay_apart(sim: Any, tmp_path: Any) -> None:
    audit = tmp_path / "audit.jsonl"
    mnt = str(tmp_path / "m")
    with mounted(sim, mnt, "--audit-log", str(audit)) as m:
        etc = os.path.join(os.fsencode(m.mnt), b"etc")
        assert sorted(n for n in os.listdir(etc) if n.startswith(b"caf")) == sorted(NAMES)
        for i, name in enumerate(NAMES):
            with open(os.path.join(etc, name), "rb") as f:
                assert f.read() == b"version %d\n" % i
        with open(m.path("etc", "hosts"), "rb") as f:
            f.read()
        export = _evidence(m.mnt, "--format", "jsonl")
        assert export.returncode == 0, export.stderr
        dfxml = _evidence(m.mnt, "--format", "dfxml")
        assert dfxml.returncode == 0, dfxml.stderr
    assert stat.S_IMODE(os.stat(audit).st_mode) == 0o600

    transfers = [d for d in _lines(audit) if d["type"] == "transfer"]
    by_bytes = {}
    for d in transfers:
        if "path_b64" in d:
            by_bytes[base64.b64decode(d["path_b64"])] = d
        else:
            assert d["path"] == "/etc/hosts"  # a UTF-8 path needs no second form
    assert set(by_bytes) == {b"/etc/" + n for n in NAMES}
    # What a tool shows of "path" is the same for both; path_b64 and the hashes are not.
    shown = {d["path"].encode("utf-8", "replace") for d in by_bytes.values()}
    assert len(shown) == 1
    assert len({d["sha256"] for d in by_bytes.values()}) == 2
    # The chain covers the exact form: verification still passes, and an edit of it fails.
    ok = _evidence("--verify-log", str(audit))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    raw = audit.read_bytes()
    first = by_bytes[b"/etc/" + NAMES[0]]["path_b64"].encode()
    other = by_bytes[b"/etc/" + NAMES[1]]["path_b64"].encode()
    audit.write_bytes(raw.replace(first, other, 1))
    bad = _evidence("--verify-log", str(audit))
    assert bad.returncode == 1 and b"edited" in bad.stdout, bad.stdout

    entries = [json.loads(line) for line in export.stdout.splitlines()[1:]]
    exact = {
        base64.b64decode(e["guest_path_b64"]): e["sha256"]
        for e in entries
        if "guest_path_b64" in e
    }
    assert set(exact) == {b"/etc/" + n for n in NAMES}
    assert len(set(exact.values())) == 2
    for n in NAMES:
        assert base64.b64encode(b"/etc/" + n) in dfxml.stdout

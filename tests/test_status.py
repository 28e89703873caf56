"""``guestfs-mount status`` as a person reads it: aligned, human units, no Python reprs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from guestfs_mount import status
from guestfs_mount.units import duration, size

NOW = 1_700_000_000.0
DOC = {
    "mountpoint": "/mnt/web01",
    "vcenter": "vc.example.com:443",
    "transport": "soap",
    "transport_reason": "auto: VMware ESXi 8.0.2 (standalone ESXi host) answers SOAP at /sdk\n",
    "vm": "vm-42",
    "vm_name": "web01",
    "guest_root": "/",
    "pid": 4242,
    "started": NOW - 3725,
    "frozen": True,
    "transfers": [
        {"path": "/var/log/big.log", "done": 512 << 20, "received": 512 << 20,
         "total": 1 << 30, "bytes_per_second": 100 << 20, "eta_seconds": 5.2,
         "readers": 2, "prefetch": False, "started": NOW - 5},
        {"path": "/evil\n\x1b[2Jname", "done": 0, "received": 0, "total": 64 << 20,
         "bytes_per_second": 0, "eta_seconds": None, "readers": 1, "prefetch": False,
         "started": NOW - 1},
    ],
    "cache": {
        "dir": "/tmp/guestfs-mount-x",
        "usage": 3 << 30,
        "max_bytes": 8 << 30,
        "stats": {"hits": 17, "joins": 1, "misses": 40, "downloads": 38, "failures": 2,
                  "cancelled": 0, "evictions": 0, "bytes_downloaded": 3 << 30,
                  "prefetches": 0, "prefetch_used": 0, "prefetch_refused": 0},
    },
    "api": {"calls": {"stat": 100, "list": 20, "transfer": 40},
            "errors": {"ResourceBusy": 3}, "retries": 3, "relogins": 0,
            "bytes_downloaded": 3 << 30, "downloads": 40},
    "metadata": {"stat_calls": 100, "list_calls": 20, "stat_hits": 300, "list_hits": 60},
    "inodes": 512,
}  # fmt: skip


def test_render_for_a_person():
    text = status.render(DOC, now=NOW)
    lines = text.splitlines()
    assert lines[0] == "/mnt/web01"
    assert "{" not in text and "'" not in text  # no dict or string reprs
    fields = dict(line.split(None, 1) for line in lines[1:] if line.startswith("  ") and not line.startswith("    "))
    assert fields["vm"] == "web01 (vm-42) on vc.example.com:443"
    assert "pid 4242, up 1h 02m, frozen" in fields["daemon"]
    assert fields["cache"].startswith("3.0 GiB of 8.0 GiB, 38 downloads (3.0 GiB), 17 served from cache, 2 failed")
    assert fields["api"] == "160 calls, 3 errors (ResourceBusy 3), 3 retries"
    assert fields["metadata"] == "100 stats and 20 listings fetched, 75% answered from cache"
    assert fields["transfers"] == "2 in flight"
    assert fields["transport"] == (
        "soap (auto: VMware ESXi 8.0.2 (standalone ESXi host) answers SOAP at /sdk\\x0a)"
    )
    column = len("  guest root  ")  # every value starts in the same column
    assert all(line[column - 1] == " " != line[column] for line in lines[1:8])
    rows = [line for line in lines if line.startswith("    ")]
    assert rows[0].split() == ["/var/log/big.log", "512.0", "MiB", "/", "1.0", "GiB", "50%",
                               "100.0", "MiB/s", "eta", "5s", "2", "readers"]
    assert "\x1b" not in text and "/evil\\x0a\\x1b[2Jname" in rows[1]  # guest names escaped
    assert "eta ?" in rows[1]


def test_render_idle_mount():
    doc = dict(DOC, transfers=[], frozen=False, api={"calls": {}, "errors": {}})
    text = status.render(doc, now=NOW)
    assert "transfers   none in flight" in text
    assert "0 calls, no errors" in text and "frozen" not in text
    # a daemon that has not chosen yet (or an older one) says so, not "None"
    old = {k: v for k, v in doc.items() if not k.startswith("transport")}
    assert "transport   ?" in status.render(old, now=NOW)


def test_json_prints_everything(monkeypatch, capsys):
    monkeypatch.setattr(status, "sockets", lambda: iter(["/nonexistent.sock"]))
    monkeypatch.setattr(status, "ask", lambda path: DOC)
    assert status.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [DOC]
    assert status.main([]) == 0
    assert capsys.readouterr().out.startswith("/mnt/web01\n  vm ")


def test_units():
    assert [size(n) for n in (0, 1023, 1024, 1536 << 20, 5 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "5.0 TiB"]  # fmt: skip
    assert [duration(s) for s in (0, 59.9, 61, 3725, 90000)] == [
        "0s", "59s", "1m 01s", "1h 02m", "1d 01h"]  # fmt: skip


# -- issue 10 item 11: status trusts neither the runtime directory nor the socket ----------

ESC = "\x1b]0;owned\x07\x1b[2J\x9b31m"
OTHER = 12345


def test_hostile_document_is_escaped_everywhere():
    """Every field a socket controls, of any type: no control character reaches the
    terminal, and nothing makes status crash."""
    hostile: dict[str, Any] = {k: ESC for k in DOC}
    hostile.update(
        pid=ESC,
        started=ESC,
        transfers=[{"path": ESC, "total": ESC, "done": 1e308, "eta_seconds": ESC,
                    "bytes_per_second": ESC, "readers": 10**400}],
        cache={"usage": 10**400, "max_bytes": -1, "stats": {ESC: ESC, "downloads": ESC}},
        api={"calls": {ESC: 1}, "errors": {ESC: ESC, "x": 2}, "retries": ESC},
        metadata={"stat_calls": ESC},
    )  # fmt: skip
    text = status.render(hostile, now=NOW)
    assert not [c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    assert "pid \\x1b]0;owned\\x07" in text
    assert "\\x9b31m" in text


def _serve_fake(path: str, doc: bytes, uid: int | None, mkdir_mode: int | None = None) -> int:
    """A fake mount's control socket at ``path``, in a child: created as ``uid`` (None:
    as us, but serving as uid OTHER after bind, so only SO_PEERCRED tells it apart).
    Answers every connection with ``doc``. Returns its pid once it listens."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            if mkdir_mode is not None:
                os.mkdir(os.path.dirname(path), mkdir_mode)
                os.chmod(os.path.dirname(path), mkdir_mode)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            if uid is None:
                os.setgid(OTHER)
                os.setuid(OTHER)
            s.listen(4)
            os.write(w, b"ok")
            os.close(w)
            while True:
                c, _ = s.accept()
                c.recv(256)
                c.sendall(doc)
                c.close()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 2) == b"ok"
    os.close(r)
    return pid


def _status(xdg: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_RUNTIME_DIR=xdg)
    return subprocess.run(
        [sys.executable, "-m", "guestfs_mount.cli", "status", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


FAKE = json.dumps(dict(DOC, mountpoint="/mnt/fake" + ESC, transfers=[]), ensure_ascii=False)


@pytest.fixture
def xdg():
    """An XDG_RUNTIME_DIR the other user can write in (as /tmp is, for /tmp/guestfs-mount-UID)."""
    d = tempfile.mkdtemp(prefix="gm-status-")
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("mode", [0o700, 0o755], ids=["0700", "0755"])
def test_runtime_directory_of_another_user_is_refused(xdg, mode):
    """The finding: another user pre-created the runtime directory with a fake socket;
    status showed her fake mount and printed her escape sequences raw."""
    sock = os.path.join(xdg, "guestfs-mount", "0123456789abcdef.sock")
    pid = _serve_fake(sock, FAKE.encode(), OTHER, mkdir_mode=mode)
    try:
        for args in ((), ("--json",), ("/mnt/fake",)):
            res = _status(xdg, *args)
            assert res.returncode == 1, res
            assert "/mnt/fake" not in res.stdout and "\x1b" not in res.stdout + res.stderr
            assert res.stderr.strip().splitlines() == [
                f"guestfs-mount: error: refused: {xdg}/guestfs-mount is owned by uid {OTHER}: "
                f"it must be a private directory owned by uid {os.geteuid()}"
            ]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("kind", ["symlink", "open"])
def test_runtime_directory_symlink_or_open_to_others_is_refused(xdg, kind):
    rt = os.path.join(xdg, "guestfs-mount")
    if kind == "symlink":
        real = os.path.join(xdg, "real")
        os.mkdir(real, 0o700)
        os.symlink(real, rt)
        why = "is a symlink"
    else:
        os.mkdir(rt)
        os.chmod(rt, 0o733)
        why = "is open to others (mode 0733)"
    res = _status(xdg)
    assert res.returncode == 1 and why in res.stderr, res


def test_socket_served_by_another_user_is_refused(xdg):
    """Our own private directory, but the process listening runs as another uid."""
    rt = os.path.join(xdg, "guestfs-mount")
    os.mkdir(rt, 0o700)
    pid = _serve_fake(os.path.join(rt, "0123456789abcdef.sock"), FAKE.encode(), None)
    try:
        res = _status(xdg)
        assert "/mnt/fake" not in res.stdout and "\x1b" not in res.stdout + res.stderr
        assert f"is served by uid {OTHER} (pid {pid}), not by us or root" in res.stderr
        assert res.stdout.strip() == "no guestfs-mount mounts running"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_our_socket_is_shown_escaped_and_nan_refused(xdg):
    rt = os.path.join(xdg, "guestfs-mount")
    os.mkdir(rt, 0o700)
    sock = os.path.join(rt, "0123456789abcdef.sock")
    # served as root (us): trusted, but what it says is escaped
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(sock)
            s.listen(4)
            os.write(w, b"ok")
            for answer in (FAKE.encode(), FAKE.encode(), b'{"started": NaN}'):
                c, _ = s.accept()
                c.recv(256)
                c.sendall(answer)
                c.close()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 2) == b"ok"
    try:
        res = _status(xdg)
        assert res.returncode == 0, res
        assert res.stdout.startswith("/mnt/fake\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\n")
        assert "\x1b" not in res.stdout and "\x9b" not in res.stdout
        res = _status(xdg, "--json")
        assert "\x1b" not in res.stdout and "\\u001b]0;owned" in res.stdout
        assert len(json.loads(res.stdout)) == 1
        res = _status(xdg)  # a document with NaN is malformed: left out
        assert res.stdout.strip() == "no guestfs-mount mounts running", res
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

"""Run ``guestfs-mount`` against a simulator in a subprocess: for tests and benchmarks.

``mounted(sim, mnt)`` starts the daemon in the foreground, waits until the kernel shows
the mount, and on exit unmounts with ``fusermount3 -u`` and checks that the daemon
exited cleanly, that nothing stayed mounted and that its stderr holds no traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol


class MountError(RuntimeError):
    pass


class Server(Protocol):
    """Where a simulator (``sim.testing.Sim``) or another fake vCenter is, whom to trust
    for it, and which VMs it has: what the mount command line is built from."""

    @property
    def vcenter_url(self) -> str: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def esx_ca_file(self) -> str | None: ...
    @property
    def vms(self) -> Sequence[Mapping[str, Any]]: ...


class Accounts(Protocol):
    """Who may log in to it: what the mount's environment is built from."""

    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def guest_user(self) -> str: ...
    @property
    def guest_password(self) -> str: ...


class Endpoint(Server, Accounts, Protocol):
    """Everything ``mounted`` needs of a simulator."""


TRANSPORTS = ("rest", "vi-json", "soap")  # what end-to-end tests run over (--api)


class ViaApi:
    """A server seen through one transport: mounts of it get ``--api NAME``; everything
    else (admin calls, faults, stats) is the server's."""

    def __init__(self, server: Any, api: str) -> None:
        self._server = server
        self.api = api

    def __getattr__(self, key: str) -> Any:
        return getattr(self._server, key)


def mount_env(sim: Accounts, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GUESTFS_USER=sim.user,
        GUESTFS_PASSWORD=sim.password,
        GUESTFS_GUEST_USER=sim.guest_user,
        GUESTFS_GUEST_PASSWORD=sim.guest_password,
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def mount_argv(sim: Server, mnt: str, *extra: str, vm: str | None = None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "guestfs_mount.cli",
        sim.vcenter_url,
        vm or sim.vms[0]["name"],
        mnt,
    ]
    if sim.ca_file:
        argv += ["--ca-file", sim.ca_file]
    if sim.esx_ca_file and sim.esx_ca_file != sim.ca_file:
        argv += ["--esx-ca-file", sim.esx_ca_file]
    esx_port = getattr(sim, "esx_port", None)
    if esx_port:
        # The simulator's ESXi listener is a port of the vCenter host: trusted only if named.
        host = urllib.parse.urlsplit(sim.vcenter_url).hostname or "127.0.0.1"
        argv += ["--esx-host", f"{host}:{esx_port}"]
    api = getattr(sim, "api", None)
    if isinstance(api, str):
        argv += ["--api", api]
    return argv + list(extra)


def fuse_connection_dir(mnt: str) -> str:
    """``/sys/fs/fuse/connections/N`` of the FUSE mount at ``mnt``. fusectl is mounted
    first when it is not: systemd mounts it, a fresh container often has not."""
    ctl = "/sys/fs/fuse/connections"
    if not os.listdir(ctl):
        subprocess.run(["mount", "-t", "fusectl", "none", ctl], check=False, capture_output=True)
    return os.path.join(ctl, str(os.minor(os.stat(mnt).st_dev)))


def unmount(mnt: str, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mnt]
    subprocess.run(cmd, check=False, capture_output=True)


def wait_for_mount(mnt: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise MountError(f"guestfs-mount exited with {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise MountError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.02)


class Mounted:
    def __init__(self, mnt: str, proc: subprocess.Popen[bytes], stderr_path: str) -> None:
        self.mnt = mnt
        self.proc = proc
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)


@contextlib.contextmanager
def mounted(
    sim: Endpoint,
    mnt: str,
    *extra: str,
    vm: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    allowed_tracebacks: bool = False,
    argv: Sequence[str] | None = None,
) -> Iterator[Mounted]:
    os.makedirs(mnt, exist_ok=True)
    fd, stderr_path = tempfile.mkstemp(prefix="guestfs-mount-stderr-", suffix=".log")
    os.close(fd)
    cmd = list(argv) if argv else mount_argv(sim, mnt, "--foreground", *extra, vm=vm)
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=dict(env or mount_env(sim))
        )
    m = Mounted(mnt, proc, stderr_path)
    clean = False
    try:
        try:
            wait_for_mount(mnt, proc, timeout)
        except MountError as exc:
            raise MountError(f"{exc}:\n{m.stderr_text()}") from None
        yield m
        clean = True
    finally:
        if proc.poll() is None:
            unmount(mnt)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                clean = False
        leaked = os.path.ismount(mnt)
        if leaked:
            unmount(mnt, lazy=True)
        text = m.stderr_text()
        os.unlink(stderr_path)
        if clean:
            if leaked:
                raise MountError(f"{mnt} still mounted after the daemon exited")
            if proc.returncode != 0:
                raise MountError(f"guestfs-mount exited with {proc.returncode}:\n{text}")
            if "Traceback" in text and not allowed_tracebacks:
                raise MountError(f"traceback in guestfs-mount's stderr:\n{text}")

"""Run a guestfs-sim process from tests and benchmarks.

    from guestfs_mount.sim.testing import run_simulator

    with run_simulator("--demo") as sim:
        sim.vcenter_url, sim.user, sim.password, sim.vm_id()
        sim.faults(busy_next=2)
        sim.stats()["calls"]["files.get"]

The process is started as ``python -m guestfs_mount.sim.cli`` with a temporary ready
file; on exit it gets SIGTERM and must exit 0 within the timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx


class SimulatorError(RuntimeError):
    """The simulator did not start, or did not stop cleanly."""


def ssl_context(ca_file: str | None) -> ssl.SSLContext | bool:
    """An SSL context trusting ``ca_file`` (True, i.e. system CAs, when None)."""
    if ca_file is None:
        return True
    return ssl.create_default_context(cafile=ca_file)


class Sim:
    """A running simulator: its ready info plus admin helpers."""

    def __init__(
        self,
        info: dict[str, Any],
        proc: subprocess.Popen[bytes],
        stderr_path: str,
        ready_file: str = "",
    ) -> None:
        self.info = info
        self.ready_file = ready_file
        self.proc = proc
        self._stderr_path = stderr_path
        self._admin = httpx.Client(verify=ssl_context(info.get("ca_file")), timeout=30)

    # ready info ------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["info"][key]
        except KeyError:
            raise AttributeError(key) from None

    vcenter_url: str
    esx_url: str
    admin_url: str
    ca_file: str | None
    esx_ca_file: str | None
    user: str
    password: str
    guest_user: str
    guest_password: str
    vms: list[dict[str, Any]]
    pid: int

    def vm_id(self, name: str | None = None) -> str:
        """The id ("vm-42") of the VM called ``name`` (the first VM by default)."""
        for vm in self.info["vms"]:
            if name is None or vm["name"] == name:
                return str(vm["vm"])
        raise KeyError(name)

    def root(self, name: str | None = None) -> str:
        for vm in self.info["vms"]:
            if name is None or vm["name"] == name:
                return str(vm["root"])
        raise KeyError(name)

    def guest_root(self, name: str | None = None) -> str:
        """The guest path to mount for VM ``name``: ``"/"``, or ``"C:\\"`` for a Windows VM."""
        for vm in self.info["vms"]:
            if name is None or vm["name"] == name:
                return str(vm.get("guest_root", "/"))
        raise KeyError(name)

    def family(self, name: str | None = None) -> str:
        """``"POSIX"`` or ``"WINDOWS"``."""
        for vm in self.info["vms"]:
            if name is None or vm["name"] == name:
                return str(vm.get("family", "POSIX"))
        raise KeyError(name)

    def guest_credentials(self) -> dict[str, Any]:
        """A ``Vcenter.Vm.Guest.Credentials`` JSON object for the default guest user."""
        return {
            "interactive_session": False,
            "type": "USERNAME_PASSWORD",
            "user_name": self.info["guest_user"],
            "password": self.info["guest_password"],
        }

    def verify(self) -> ssl.SSLContext | bool:
        """``verify=`` for an httpx client talking to the vCenter listener."""
        return ssl_context(self.info.get("ca_file"))

    def esx_verify(self) -> ssl.SSLContext | bool:
        return ssl_context(self.info.get("esx_ca_file"))

    # admin helpers ---------------------------------------------------------------
    def admin(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        resp = self._admin.request(method, f"{self.info['admin_url']}/{path}", json=body)
        if not resp.is_success:
            raise SimulatorError(f"{method} /_sim/{path}: {resp.status_code} {resp.text}")
        return resp.json()

    def stats(self) -> dict[str, Any]:
        return dict(self.admin("GET", "stats"))

    def reset_stats(self) -> None:
        self.admin("POST", "stats/reset")

    def faults(self, **kw: Any) -> dict[str, Any]:
        """Set faults (``sim.faults(busy_next=2)``); with no argument, return them."""
        if not kw:
            return dict(self.admin("GET", "faults"))
        return dict(self.admin("POST", "faults", kw))

    def reset_faults(self) -> None:
        self.admin("POST", "faults/reset")

    def vm_faults(self, vm: str, **kw: Any) -> dict[str, Any]:
        """Set ``vm``'s own faults (``sim.vm_faults("vm-42", stall_api=True)``); with no
        argument, return them."""
        if not kw:
            return dict(self.admin("GET", f"vms/{vm}/faults"))
        return dict(self.admin("POST", f"vms/{vm}/faults", kw))

    def power(self, vm: str, state: str) -> None:
        self.admin("POST", f"vms/{vm}/power", {"state": state})

    def tools(self, vm: str, running: bool) -> None:
        self.admin("POST", f"vms/{vm}/tools", {"running": running})

    def add_vm(self, like: str, name: str, **kw: str) -> dict[str, Any]:
        """Add a VM serving VM ``like``'s tree (``folder=``, ``vm=`` optional); its summary."""
        return dict(self.admin("POST", "vms", {"like": like, "name": name, **kw}))

    def remove_vm(self, vm: str) -> None:
        self.admin("DELETE", f"vms/{vm}")

    def rename_vm(self, vm: str, name: str) -> None:
        self.admin("POST", f"vms/{vm}/rename", {"name": name})

    def expire_sessions(self) -> None:
        self.admin("POST", "sessions/expire")

    def restart(self) -> None:
        self.admin("POST", "restart")

    def stderr_text(self) -> str:
        with open(self._stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def close(self) -> None:
        self._admin.close()


@contextlib.contextmanager
def run_simulator(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[Sim]:
    """Start ``guestfs-sim *args``; yield a :class:`Sim` once it is ready."""
    with tempfile.TemporaryDirectory(prefix="guestfs-sim-test-") as tmp:
        ready = os.path.join(tmp, "ready.json")
        stderr_path = os.path.join(tmp, "stderr.log")
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(stderr_path, "wb") as err, open(os.devnull, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "guestfs_mount.sim.cli", "--ready-file", ready, *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )
        sim: Sim | None = None
        body_failed = False
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(ready):
                if proc.poll() is not None:
                    raise SimulatorError(
                        f"guestfs-sim exited with {proc.returncode} before ready:\n"
                        + _read(stderr_path)
                    )
                if time.monotonic() > deadline:
                    raise SimulatorError(
                        f"guestfs-sim not ready after {timeout} s:\n" + _read(stderr_path)
                    )
                time.sleep(0.02)
            with open(ready, encoding="utf-8") as f:
                info = json.loads(f.readline())
            sim = Sim(info, proc, stderr_path, ready)
            try:
                yield sim
            except BaseException:
                body_failed = True
                raise
        finally:
            if sim is not None:
                sim.close()
            rc = proc.poll()
            if rc is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    if not body_failed:
                        raise SimulatorError(
                            "guestfs-sim did not exit after SIGTERM:\n" + _read(stderr_path)
                        ) from None
            if rc != 0 and sim is not None and not body_failed:
                raise SimulatorError(f"guestfs-sim exited with status {rc}:\n" + _read(stderr_path))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


class ApiClient:
    """A minimal synchronous vCenter REST client for tests (not the product's client).

    Methods return the ``httpx.Response``; ``login()`` keeps the session token.
    """

    def __init__(self, sim: Sim, *, verify: ssl.SSLContext | bool | None = None) -> None:
        self.sim = sim
        self.base = sim.vcenter_url
        self.http = httpx.Client(verify=sim.verify() if verify is None else verify, timeout=30)
        self.token: str | None = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def login(self, user: str | None = None, password: str | None = None) -> str:
        resp = self.http.post(
            f"{self.base}/api/session",
            auth=(user or self.sim.user, password or self.sim.password),
        )
        resp.raise_for_status()
        self.token = str(resp.json())
        return self.token

    @property
    def headers(self) -> dict[str, str]:
        return {"vmware-api-session-id": self.token} if self.token else {}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(f"{self.base}{path}", headers=self.headers, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        # not json=: httpx encodes strictly as UTF-8, and guest paths may hold surrogates
        headers = {**self.headers, "content-type": "application/json"}
        content = None if body is None else json.dumps(body, ensure_ascii=True)
        return self.http.post(f"{self.base}{path}", content=content, headers=headers, **kw)

    def vm_path(self, vm: str | None = None) -> str:
        return f"/api/vcenter/vm/{vm or self.sim.vm_id()}"

    def list(
        self,
        path: str,
        *,
        vm: str | None = None,
        credentials: Mapping[str, Any] | None = None,
        size: int | None = None,
        index: int | None = None,
        pattern: str | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {
            "credentials": dict(credentials or self.sim.guest_credentials()),
            "path": path,
        }
        iteration = {k: v for k, v in (("size", size), ("index", index)) if v is not None}
        if iteration:
            body["iteration"] = iteration
        if pattern is not None:
            body["filter"] = {"match_pattern": pattern}
        return self.post(f"{self.vm_path(vm)}/guest/filesystem/files?action=list", body)

    def stat(
        self,
        path: str,
        *,
        vm: str | None = None,
        credentials: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        """``files/{path}?action=get`` with the path fully percent-encoded (``/`` too)."""
        enc = quote_bytes(os.fsencode(path))
        body = {"credentials": dict(credentials or self.sim.guest_credentials())}
        return self.post(f"{self.vm_path(vm)}/guest/filesystem/files/{enc}?action=get", body)

    def create_transfer(
        self,
        path: str,
        *,
        vm: str | None = None,
        credentials: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        body = {
            "credentials": dict(credentials or self.sim.guest_credentials()),
            "spec": {"path": path},
        }
        return self.post(f"{self.vm_path(vm)}/guest/filesystem?action=create", body)

    def preview_transfer(
        self,
        path: str,
        *,
        vm: str | None = None,
        credentials: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        body = {"credentials": dict(credentials or self.sim.guest_credentials()), "path": path}
        return self.http.request(
            "GET",
            f"{self.base}{self.vm_path(vm)}/guest/filesystem",
            content=json.dumps(body, ensure_ascii=True),
            headers={**self.headers, "content-type": "application/json"},
        )

    def transfer_url(self, path: str, **kw: Any) -> str:
        """Create a transfer and return its URL with ``*`` replaced by the vCenter host."""
        resp = self.create_transfer(path, **kw)
        if resp.status_code != 201:
            raise SimulatorError(f"transfer create: {resp.status_code} {resp.text}")
        return esx_url(self.sim, str(resp.json()))

    def download(self, path: str, **kw: Any) -> bytes:
        with httpx.Client(verify=self.sim.esx_verify(), timeout=30) as c:
            resp = c.get(self.transfer_url(path, **kw))
            resp.raise_for_status()
            return resp.content


def esx_url(sim: Sim, url: str) -> str:
    """Replace a ``*`` host with the host of the vCenter URL (keeping the URL's port)."""
    host = httpx.URL(sim.vcenter_url).host
    if ":" in host:
        host = f"[{host}]"
    return url.replace("://*:", f"://{host}:", 1)


def quote_bytes(raw: bytes) -> str:
    from urllib.parse import quote_from_bytes

    return quote_from_bytes(raw, safe="")

"""The simulator's world: VMs, accounts, vCenter sessions, transfer URLs and counters.

Pure logic, no HTTP. Everything runs in one trio thread, so no locking is needed;
the only trio object used here is the CancelScope of an in-flight transfer body, which
power-off / restart cancel.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import trio

from . import guestfs, winfs
from .cost import GuestAuthError, GuestCost, GuestOp
from .entry import GuestEntry
from .faults import Faults
from .vapi import NOT_A_FILE, VapiError, file_error

Clock = Callable[[], float]

POWER_STATES = ("POWERED_ON", "POWERED_OFF", "SUSPENDED")
_UUID_NAMESPACE = uuid.UUID("6b1f0a52-3c1e-4d0e-9a57-677565737466")

CALL_NAMES = (
    "session.create",
    "session.get",
    "session.delete",
    "vm.list",
    "vm.get",
    "vm.power",
    "vm.tools",
    "vm.guest_operations",
    "files.list",
    "files.get",
    "transfer.create",
    "transfer.preview",
    "vm.get",
    "vm.identity",
    "folder.list",
)
ROOT_VM_FOLDER = "group-v3"  # the datacenter's "vm" folder (vim25 vmFolder)
_UUID_NS = uuid.UUID("7d5c3f0e-8a41-4c1b-9d2e-3f6a5b4c2e10")


@dataclass
class GuestAccount:
    user: str
    password: str | None = field(default=None, repr=False)
    saml_tokens: tuple[str, ...] = field(default=(), repr=False)
    subtree: str = "/"


@dataclass
class Vm:
    vm: str
    name: str
    root: bytes  # absolute host path, realpath'ed
    power_state: str = "POWERED_ON"
    tools_running: bool = True
    cpu_count: int = 2
    memory_size_MiB: int = 4096
    family: str = "POSIX"  # POSIX | WINDOWS
    drives: dict[str, bytes] = field(default_factory=dict)  # WINDOWS: letter -> host dir
    folder: str = ROOT_VM_FOLDER  # parent folder id
    # vSphere's config.instanceUuid; "" derives a stable one from the VM id
    instance_uuid: str = ""
    guest_os: str = ""  # REST guest_OS / vim config.guestId ("" -> from family)
    # guest accounts of this VM alone; None: the simulator-wide accounts
    accounts: dict[str, GuestAccount] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.instance_uuid:
            self.instance_uuid = str(uuid.uuid5(_UUID_NS, "instance:" + self.vm))
        if not self.guest_os:
            self.guest_os = "WINDOWS_9_SERVER_64" if self.family == "WINDOWS" else "OTHER_LINUX_64"
        if self.family == "WINDOWS":
            extra = {k.upper(): v for k, v in self.drives.items() if k.upper() != "C"}
            self.drives = {"C": self.root, **extra}

    @property
    def bios_uuid(self) -> str:
        return str(uuid.uuid5(_UUID_NS, "bios:" + self.vm))

    @property
    def guest_root(self) -> str:
        return "C:\\" if self.family == "WINDOWS" else "/"

    def root_of(self, guest_path: str) -> bytes:
        """The host directory holding canonical ``guest_path`` (its drive's, on Windows)."""
        if self.family == "WINDOWS":
            return self.drives[winfs.drive_of(guest_path)]
        return self.root

    def summary(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "name": self.name,
            "power_state": self.power_state,
            "cpu_count": self.cpu_count,
            "memory_size_MiB": self.memory_size_MiB,
        }


@dataclass(frozen=True)
class Folder:
    """A VM folder of the inventory (REST ``Folder.Summary``, vim25 ``Folder``)."""

    folder: str  # "group-v101"
    name: str
    parent: str | None  # parent folder id; None for the datacenter's root VM folder


@dataclass
class Session:
    token: str = field(repr=False)
    user: str
    created: float
    last_accessed: float


@dataclass
class Transfer:
    id: int
    token: str = field(repr=False)
    vm: Vm
    guest_path: str
    resolved: guestfs.Resolved
    created: float
    state: str = "NEW"  # NEW | IN_FLIGHT | USED | DEAD
    scope: trio.CancelScope | None = None
    killed_reason: str | None = None

    def kill(self, reason: str) -> None:
        self.killed_reason = reason
        if self.state == "IN_FLIGHT" and self.scope is not None:
            self.scope.cancel()
        if self.state != "USED":
            self.state = "DEAD"


@dataclass
class Stats:
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    created: int = 0
    started: int = 0
    completed: int = 0
    failed: int = 0
    by_path: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_sent: int = 0


@dataclass
class SimOptions:
    session_idle_timeout: float = 1800.0
    transfer_ttl: float = 600.0
    max_page_size: int = 1000
    default_page_size: int = 50
    released_api: bool = True
    preview_api: bool = True
    esx_url_host: str = "*"  # "*", "name" or "name:port"
    esx_port: int = 0
    esx_scheme: str = "https"
    chunk_size: int = 1024 * 1024
    max_vm_list: int = 4000  # GET /api/vcenter/vm refuses more matches (spec)
    max_folder_list: int = 1000  # GET /api/vcenter/folder likewise (API reference)


def iso_now(t: float) -> str:
    dt = datetime.fromtimestamp(t, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class SimState:
    def __init__(
        self,
        options: SimOptions,
        vcenter_users: dict[str, str],
        guest_accounts: Iterable[GuestAccount],
        vms: Iterable[Vm],
        faults: Faults | None = None,
        clock: Clock = time.monotonic,
        cost: GuestCost | None = None,
        folders: Iterable[Folder] = (),
    ) -> None:
        self.options = options
        self.vcenter_users = dict(vcenter_users)
        self.guest_accounts = {a.user: a for a in guest_accounts}
        self.vms = {v.vm: v for v in vms}
        self.folders = {ROOT_VM_FOLDER: Folder(ROOT_VM_FOLDER, "vm", None)}
        self.folders.update((f.folder, f) for f in folders)
        for v in self.vms.values():
            if v.folder not in self.folders:
                raise ValueError(f"{v.vm}: unknown folder {v.folder!r}")
        self.faults = faults or Faults()
        self.vm_faults: dict[str, Faults] = {}  # VM id -> its own faults (faults.VM_KEYS)
        self.removed_ids: set[str] = set()
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.transfers: dict[int, Transfer] = {}
        self.cost = cost or GuestCost()
        self._list_scans: dict[tuple[str, bytes], tuple[int, list[GuestEntry]]] = {}
        self.next_transfer_id = 1
        self.stats = Stats()

    # ---- counters --------------------------------------------------------------
    def count(self, call: str) -> None:
        self.stats.calls[call] += 1

    def stats_json(self) -> dict[str, Any]:
        s = self.stats
        self.expire_sessions_idle()
        return {
            "calls": {name: s.calls.get(name, 0) for name in CALL_NAMES},
            # vim25 methods by transport ("vi-json.ListFilesInGuest"), only those called
            "vim_calls": {
                k: v for k, v in sorted(s.calls.items()) if k.startswith(("soap.", "vi-json."))
            },
            "transfers": {
                "created": s.created,
                "started": s.started,
                "completed": s.completed,
                "failed": s.failed,
                "by_path": dict(s.by_path),
            },
            "sessions": len(self.sessions),
            "bytes_sent": s.bytes_sent,
            "vms": self.cost.stats_json(),
        }

    def reset_stats(self) -> None:
        self.stats = Stats()
        self.cost.reset_stats()

    # ---- vCenter sessions ------------------------------------------------------
    def login(self, user: str, password: str) -> str:
        expected = self.vcenter_users.get(user)
        if expected is None or not secrets.compare_digest(expected, password):
            raise unauthenticated("Authentication required.")
        token = secrets.token_hex(16)
        now = self.clock()
        self.sessions[token] = Session(token, user, now, now)
        return token

    def expire_sessions_idle(self) -> None:
        limit = self.clock() - self.options.session_idle_timeout
        for token in [t for t, s in self.sessions.items() if s.last_accessed < limit]:
            del self.sessions[token]

    def session(self, token: str | None) -> Session:
        """The live session for ``token`` (touching it), or 401 UNAUTHENTICATED."""
        self.expire_sessions_idle()
        sess = self.sessions.get(token) if token else None
        if sess is None:
            raise unauthenticated("Authentication required.")
        sess.last_accessed = self.clock()
        return sess

    def logout(self, token: str) -> None:
        self.sessions.pop(token, None)

    def drop_sessions(self) -> None:
        self.sessions.clear()

    # ---- VMs -------------------------------------------------------------------
    def vm(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise VapiError(
                "NOT_FOUND",
                f"Virtual machine with identifier '{vm_id}' does not exist.",
                msg_id="com.vmware.api.vcenter.vm.not_found",
                args=[vm_id],
            )
        return vm

    def folder_path(self, folder_id: str) -> str:
        """``prod/web`` for a folder (names joined below the root VM folder, ``""``)."""
        names: list[str] = []
        f = self.folders[folder_id]
        while f.parent is not None:
            names.append(f.name)
            f = self.folders[f.parent]
        return "/".join(reversed(names))

    def folder_tree(self, folder_id: str) -> set[str]:
        """``folder_id`` and every folder below it."""
        out = {folder_id}
        grew = True
        while grew:
            more = {f.folder for f in self.folders.values() if f.parent in out} - out
            out |= more
            grew = bool(more)
        return out

    def list_vms(
        self,
        names: set[str],
        ids: set[str],
        powers: set[str],
        folders: set[str],
        unmatched: bool = False,
    ) -> list[Vm]:
        """``GET /api/vcenter/vm``'s matches: each non-empty filter must match; ``folders``
        matches a VM's parent folder only [assumption: the API reference does not say
        whether subfolders count]. More than ``max_vm_list`` matches is an error, as on
        a real vCenter."""
        bad = powers - set(POWER_STATES)
        if bad:
            raise invalid_argument("power_states", f"Invalid power state(s): {sorted(bad)}.")
        out = [
            vm
            for vm in self.vms.values()
            if not unmatched
            and (not names or vm.name in names)
            and (not ids or vm.vm in ids)
            and (not powers or vm.power_state in powers)
            and (not folders or vm.folder in folders)
        ]
        if len(out) > self.options.max_vm_list:
            raise too_many("virtual machines", self.options.max_vm_list, len(out))
        return out

    def list_folders(
        self, ids: set[str], names: set[str], parents: set[str], ftype: str | None
    ) -> list[Folder]:
        """``GET /api/vcenter/folder``'s matches (VM folders are the only ones served;
        ``parent_folders`` matches the direct parent)."""
        types = ("DATACENTER", "DATASTORE", "HOST", "NETWORK", "VIRTUAL_MACHINE")
        if ftype is not None and ftype not in types:
            raise invalid_argument("type", f"Invalid folder type {ftype!r}.")
        out = [
            f
            for f in self.folders.values()
            if ftype in (None, "VIRTUAL_MACHINE")
            and (not ids or f.folder in ids)
            and (not names or f.name in names)
            and (not parents or f.parent in parents)
        ]
        if len(out) > self.options.max_folder_list:
            raise too_many("folders", self.options.max_folder_list, len(out))
        return out

    def add_vm_like(
        self, like: Vm, name: str, folder: str | None = None, vm_id: str | None = None
    ) -> Vm:
        """A new VM serving ``like``'s tree with its family and accounts (the admin
        API's way to grow the inventory at run time); powered on, Tools running."""
        if folder is not None and folder not in self.folders:
            raise ValueError(f"unknown folder {folder!r}")
        if vm_id is None:
            # vCenter never gives a removed VM's moid to another: the next after any seen.
            ids = {*self.vms, *self.removed_ids}
            numbers = [int(v[3:]) for v in ids if v.startswith("vm-") and v[3:].isdigit()]
            vm_id = f"vm-{max(numbers, default=41) + 1}"
        if vm_id in self.vms:
            raise ValueError(f"{vm_id} exists")
        vm = Vm(
            vm_id,
            name,
            like.root,
            cpu_count=like.cpu_count,
            memory_size_MiB=like.memory_size_MiB,
            family=like.family,
            drives={k: v for k, v in like.drives.items() if k != "C"},
            folder=like.folder if folder is None else folder,
            guest_os=like.guest_os,
            accounts=like.accounts,
        )
        self.vms[vm_id] = vm
        return vm

    def remove_vm(self, vm: Vm) -> None:
        """Unregister ``vm``: it leaves the inventory, its transfer URLs die."""
        del self.vms[vm.vm]
        self.removed_ids.add(vm.vm)
        self.vm_faults.pop(vm.vm, None)
        self.kill_transfers(lambda t: t.vm is vm, "virtual machine removed")

    def set_power(self, vm: Vm, state: str) -> None:
        if state not in POWER_STATES:
            raise ValueError(f"state must be one of {POWER_STATES}")
        vm.power_state = state
        if state != "POWERED_ON":
            self.kill_transfers(lambda t: t.vm is vm, f"virtual machine {state.lower()}")

    # ---- guest operations ------------------------------------------------------
    def guest_ready(self, vm: Vm) -> None:
        """The VM-state checks of every guest operation (after the VM lookup)."""
        if vm.power_state != "POWERED_ON":
            raise VapiError(
                "NOT_ALLOWED_IN_CURRENT_STATE",
                f"The operation is not allowed in the current state of virtual machine "
                f"'{vm.vm}' ({vm.power_state}).",
                msg_id="com.vmware.api.vcenter.vm.guest.not_running",
                args=[vm.vm, vm.power_state],
            )
        if not vm.tools_running:
            raise VapiError(
                "SERVICE_UNAVAILABLE",
                f"VMware Tools is not running in virtual machine '{vm.vm}'.",
                msg_id="com.vmware.api.vcenter.vm.guest.tools_not_running",
                args=[vm.vm],
            )
        own = self.vm_faults.get(vm.vm)
        fault = (own.take_guest_fault() if own is not None else None) or (
            self.faults.take_guest_fault()
        )
        if fault == "RESOURCE_BUSY":
            raise VapiError(
                "RESOURCE_BUSY",
                f"The virtual machine '{vm.vm}' is busy.",
                msg_id="com.vmware.api.vcenter.vm.guest.busy",
                args=[vm.vm],
            )
        if fault == "SERVICE_UNAVAILABLE":
            raise VapiError(
                "SERVICE_UNAVAILABLE",
                "Guest operations are not available right now.",
                msg_id="com.vmware.api.vcenter.vm.guest.operations_unavailable",
                args=[vm.vm],
            )

    def faults_of(self, vm: Vm) -> Faults:
        """``vm``'s own faults, created empty on first use."""
        own = self.vm_faults.get(vm.vm)
        if own is None:
            own = self.vm_faults[vm.vm] = Faults()
        return own

    def reset_faults(self) -> None:
        """Clear the global faults and every VM's own."""
        self.faults.reset()
        for own in self.vm_faults.values():
            own.reset()
        self.vm_faults.clear()

    @contextlib.asynccontextmanager
    async def guest_op(self, vm: Vm, kind: str, transport: str = "rest") -> AsyncIterator[GuestOp]:
        """``cost.guest_op``, after ``vm``'s own stall and latency: a stalled VM holds
        its callers before its lane, so the other VMs' calls never wait for it."""
        own = self.vm_faults.get(vm.vm)
        if own is not None:
            await own.hold_api()
        async with self.cost.guest_op(vm, kind, transport) as op:
            yield op

    def guest_login(self, creds: Any, vm: Vm | None = None) -> GuestAccount:
        """Validate a ``Vcenter.Vm.Guest.Credentials`` object (against ``vm``'s own
        accounts if it has some)."""
        if not isinstance(creds, dict):
            raise invalid_argument("credentials", "Missing or malformed 'credentials'.")
        inter = creds.get("interactive_session")
        if not isinstance(inter, bool):
            raise invalid_argument(
                "credentials.interactive_session",
                "Field 'credentials.interactive_session' is required and must be a boolean.",
            )
        ctype = creds.get("type")
        if ctype not in ("USERNAME_PASSWORD", "SAML_BEARER_TOKEN"):
            raise invalid_argument(
                "credentials.type",
                "Field 'credentials.type' is required: USERNAME_PASSWORD or SAML_BEARER_TOKEN.",
            )
        for key in ("user_name", "password", "saml_token"):
            if key in creds and creds[key] is not None and not isinstance(creds[key], str):
                raise invalid_argument(
                    f"credentials.{key}", f"'credentials.{key}' must be a string."
                )
        user = creds.get("user_name")
        if ctype == "USERNAME_PASSWORD":
            account = self.check_password(user, creds.get("password"), vm)
        else:
            account = self.check_saml(creds.get("saml_token"), user, vm)
        if inter:
            raise VapiError(
                "NOT_ALLOWED_IN_CURRENT_STATE",
                "No interactive session of the user is logged in to the guest.",
                msg_id="com.vmware.api.vcenter.vm.guest.no_interactive_session",
            )
        return account

    def accounts_of(self, vm: Vm | None) -> dict[str, GuestAccount]:
        if vm is not None and vm.accounts is not None:
            return vm.accounts
        return self.guest_accounts

    def check_password(self, user: Any, password: Any, vm: Vm | None = None) -> GuestAccount:
        """The guest account for a user name and password, or GuestAuthError (401)."""
        acc = self.accounts_of(vm).get(user) if isinstance(user, str) else None
        if (
            acc is not None
            and acc.password is not None
            and isinstance(password, str)
            and secrets.compare_digest(acc.password.encode(), password.encode())
        ):
            return acc
        raise guest_auth_error()

    def check_saml(self, token: Any, user: Any = None, vm: Vm | None = None) -> GuestAccount:
        """The guest account a SAML bearer token maps to (``user``, if given, must be
        its user), or GuestAuthError (401)."""
        if isinstance(token, str):
            for acc in self.accounts_of(vm).values():
                if any(
                    secrets.compare_digest(t.encode(), token.encode()) for t in acc.saml_tokens
                ) and user in (None, acc.user):
                    return acc
        raise guest_auth_error()

    def resolve(
        self, vm: Vm, account: GuestAccount, guest_path: Any, follow: bool = False
    ) -> guestfs.Resolved:
        if not isinstance(guest_path, str):
            raise invalid_argument("path", "Field 'path' is required and must be a string.")
        windows = vm.family == "WINDOWS"
        try:
            if windows:
                res = winfs.resolve(vm.drives, guest_path)
            else:
                res = guestfs.resolve(vm.root, guest_path, follow)
        except OSError as exc:
            raise guestfs.os_error(exc, guest_path) from exc
        within = winfs.within if windows else guestfs.within
        if not within(account.subtree, res.guest_path):
            raise VapiError(
                "UNAUTHORIZED",
                f"User '{account.user}' is not allowed to access {guest_path}.",
                msg_id="com.vmware.api.vcenter.vm.guest.filesystem.access_denied",
                args=[guest_path],
            )
        return res

    def scan_dir(self, vm: Vm, account: GuestAccount, guest_path: Any) -> list[GuestEntry]:
        """What the guest lists at ``guest_path``: a directory's ``.``, ``..`` and
        entries (a symlink to a directory lists the target), or a file's one entry.
        Synchronous disk work: call it through ``trio.to_thread.run_sync``."""
        res = self.resolve(vm, account, guest_path, follow=True)
        return self._scan(vm, res)

    def _scan(self, vm: Vm, res: guestfs.Resolved) -> list[GuestEntry]:
        if vm.family == "WINDOWS":
            return winfs.scan(vm.drives, res)
        return guestfs.scan(vm.root, res)

    def stat_path(self, vm: Vm, account: GuestAccount, guest_path: Any) -> GuestEntry:
        """What the guest reports for one path (a final symlink is not followed: it
        stays a SYMLINK with its target's attributes)."""
        res = self.resolve(vm, account, guest_path)
        return self._stat(vm, res, str(guest_path))

    def _stat(self, vm: Vm, res: guestfs.Resolved, guest_path: str) -> GuestEntry:
        try:
            if vm.family == "WINDOWS":
                return winfs.stat_entry(res)
            return guestfs.stat_entry(vm.root, res)
        except OSError as exc:
            raise guestfs.os_error(exc, guest_path) from exc

    def list_files(
        self, vm: Vm, account: GuestAccount, body: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        """A ``files?action=list`` page and the number of entries the guest scanned."""
        res = self.resolve(vm, account, body.get("path"), follow=True)
        iteration = body.get("iteration") or {}
        filt = body.get("filter") or {}
        if not isinstance(iteration, dict) or not isinstance(filt, dict):
            raise invalid_argument("iteration", "Malformed 'iteration' or 'filter'.")
        size = iteration.get("size", self.options.default_page_size)
        index = iteration.get("index", 0)
        if size is None:
            size = self.options.default_page_size
        if index is None:
            index = 0
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size < 1
            or isinstance(index, bool)
            or not isinstance(index, int)
            or index < 0
        ):
            raise invalid_argument("iteration", "Invalid iteration data.")
        size = min(size, self.options.max_page_size)
        pattern = filt.get("match_pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise invalid_argument("filter.match_pattern", "'match_pattern' must be a string.")
        regex = guestfs.compile_pattern(pattern)
        # A listing starting at index 0 scans the directory; later pages reuse that scan
        # while the directory is unchanged, like a cursor (rescanning per page made a
        # 100,000-entry listing quadratic in the simulator; the cost model still charges
        # the guest a whole scan per page, as real Tools does).
        ckey = (vm.vm, res.host_path)
        cached = self._list_scans.get(ckey) if index > 0 else None
        mtime = res.st.st_mtime_ns
        if cached is not None and cached[0] == mtime:
            scanned = cached[1]
        else:
            scanned = self._scan(vm, res)
            if len(self._list_scans) >= 64:
                self._list_scans.pop(next(iter(self._list_scans)))
            self._list_scans[ckey] = (mtime, scanned)
        items = scanned if regex is None else [e for e in scanned if regex.search(e.name)]
        page = items[index : index + size]
        out: dict[str, Any] = {
            "files": [{"filename": e.name, "type": e.type, "size": e.size} for e in page],
            "total": len(items),
        }
        if page:
            out["start_index"] = index
            out["end_index"] = index + len(page) - 1
        out["status"] = "END_OF_DATA" if index + len(page) >= len(items) else "READY"
        return out, len(scanned)

    def get_file(self, vm: Vm, account: GuestAccount, guest_path: str) -> dict[str, Any]:
        e = self.stat_path(vm, account, guest_path)
        return winfs.info(e) if vm.family == "WINDOWS" else guestfs.info(e)

    # ---- transfers ---------------------------------------------------------------
    def create_transfer(self, vm: Vm, account: GuestAccount, guest_path: Any) -> str:
        return self.create_transfer_info(vm, account, guest_path)[0]

    def create_transfer_info(
        self, vm: Vm, account: GuestAccount, guest_path: Any
    ) -> tuple[str, GuestEntry]:
        """A one-shot transfer URL for a regular file and the guest's stat of it."""
        res = self.resolve(vm, account, guest_path)
        if guestfs.file_type(res.st) != "FILE" or not _is_regular(res.st):
            raise file_error(
                "INVALID_ARGUMENT",
                NOT_A_FILE,
                str(guest_path),
                f"The path {guest_path} is not a file.",
            )
        if not os.access(res.host_path, os.R_OK, follow_symlinks=False):
            raise guestfs.os_error(PermissionError(13, "denied"), str(guest_path))
        info = self._stat(vm, res, str(guest_path))
        self.expire_transfers()
        tid = self.next_transfer_id
        self.next_transfer_id += 1
        token = secrets.token_urlsafe(24)
        self.transfers[tid] = Transfer(tid, token, vm, res.guest_path, res, self.clock())
        self.stats.created += 1
        return self.transfer_url(tid, token), info

    def transfer_url(self, tid: int, token: str) -> str:
        host = host_port(self.options.esx_url_host, self.options.esx_port)
        return f"{self.options.esx_scheme}://{host}/guestFile?id={tid}&token={token}"

    def expire_transfers(self) -> None:
        limit = self.clock() - self.options.transfer_ttl
        for tid, t in list(self.transfers.items()):
            if t.state in ("USED", "DEAD") or (t.state == "NEW" and t.created < limit):
                del self.transfers[tid]

    def claim_transfer(self, tid_text: str | None, token: str | None) -> Transfer:
        """Look a transfer up for a GET; raises TransferRefused."""
        self.expire_transfers()
        try:
            tid = int(tid_text or "")
        except ValueError:
            raise TransferRefused(404, "unknown transfer") from None
        t = self.transfers.get(tid)
        if t is None or token is None or not secrets.compare_digest(t.token, token):
            raise TransferRefused(404, "unknown or expired transfer")
        if t.state == "IN_FLIGHT":
            raise TransferRefused(409, "transfer already in progress")
        if t.state != "NEW":
            raise TransferRefused(404, "transfer no longer valid")
        if t.vm.power_state != "POWERED_ON":
            t.kill("virtual machine not running")
            raise TransferRefused(404, "transfer no longer valid")
        return t

    def kill_transfers(self, pred: Callable[[Transfer], bool], reason: str) -> None:
        for t in list(self.transfers.values()):
            if pred(t):
                t.kill(reason)
        self.expire_transfers()

    def restart(self) -> None:
        """Like a restarted vCenter: sessions and transfer URLs are gone."""
        self.drop_sessions()
        self.kill_transfers(lambda t: True, "server restarted")
        self.transfers.clear()


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def host_port(host: str, port: int) -> str:
    """``host`` with ``port`` appended unless it already carries one (IPv6 bracketed)."""
    if host.startswith("["):
        return host if "]:" in host else f"{host}:{port}"
    if host.count(":") == 1:
        return host
    if host.count(":") > 1:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class TransferRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def guest_auth_error() -> GuestAuthError:
    return GuestAuthError(
        "UNAUTHENTICATED",
        "Failed to authenticate with the guest operating system using the supplied credentials.",
        msg_id="com.vmware.api.vcenter.vm.guest.invalid_guest_login",
    )


def unauthenticated(message: str, msg_id: str | None = None) -> VapiError:
    return VapiError(
        "UNAUTHENTICATED",
        message,
        msg_id=msg_id or "com.vmware.vapi.endpoint.method.authentication.required",
    )


def too_many(what: str, limit: int, found: int) -> VapiError:
    return VapiError(
        "UNABLE_TO_ALLOCATE_RESOURCE",
        f"Too many {what} match the filter: {found} (the limit is {limit}).",
        msg_id="com.vmware.api.vcenter.max_entities_exceeded",
        args=[str(limit), str(found)],
    )


def invalid_argument(field_name: str, message: str) -> VapiError:
    return VapiError(
        "INVALID_ARGUMENT",
        message,
        msg_id="vapi.method.input.invalid",
        args=[field_name],
    )

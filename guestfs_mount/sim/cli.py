"""``guestfs-sim``: a vCenter + ESXi simulator serving host directories as guest filesystems.

    guestfs-sim --demo
    guestfs-sim --root DIR
    guestfs-sim --vm web=/srv/web --vm db=/srv/db --config sim.toml
    guestfs-sim --windows-vm win=/srv/c,D=/srv/d
    guestfs-sim ctl --ready-file ready.json POST faults '{"busy_next": 2}'

See docs/simulator.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import trio

try:
    from .cost import CostError
    from .costopts import add_cost_arguments, cost_from
    from .demo import build_demo_tree
    from .faults import FaultError, Faults
    from .fleet import Fleet, build_fleet
    from .server import ServerSettings, run_server
    from .state import POWER_STATES, GuestAccount, SimOptions, SimState, Vm
    from .vim_app import VimOptions
except ModuleNotFoundError as exc:  # installed without the sim extra
    missing = (exc.name or "").partition(".")[0]
    if missing not in ("hypercorn", "starlette", "trustme", "defusedxml"):
        raise
    raise SystemExit(
        f"guestfs-sim: {missing} is missing: install the simulator with "
        "pip install 'guestfs-mount[sim]'"
    ) from None

log = logging.getLogger("guestfs_mount.sim")

DEFAULT_USER = "administrator@vsphere.local"
DEFAULT_GUEST_USER = "root"


class UsageError(Exception):
    pass


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestfs-sim",
        description="vCenter/ESXi REST simulator for guestfs-mount (guest file operations). "
        "Prints one JSON line when ready. Subcommand: 'guestfs-sim ctl --help'.",
    )
    src = p.add_argument_group("guest trees")
    src.add_argument("--root", metavar="DIR", help="serve DIR as guest / of one VM")
    src.add_argument("--vm-name", default="demo-vm", help="name of the --root/--demo VM")
    src.add_argument(
        "--vm",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="add a VM serving DIR (repeatable)",
    )
    src.add_argument(
        "--windows-vm",
        action="append",
        default=[],
        metavar="NAME=DIR[,D=DIR2...]",
        help="add a Windows VM serving DIR as C:\\ (and DIR2 as D:\\...; repeatable)",
    )
    src.add_argument(
        "--demo",
        action="store_true",
        help="generate a demo guest tree in a temporary directory and serve it",
    )
    src.add_argument("--demo-big-mib", type=int, default=4, help=argparse.SUPPRESS)
    src.add_argument(
        "--fleet",
        type=int,
        default=0,
        metavar="N",
        help="add N generated Linux and Windows VMs in folders (docs/simulator.md, Fleet)",
    )
    src.add_argument(
        "--fleet-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the --fleet inventory (default %(default)s): same N and S, same fleet",
    )
    src.add_argument(
        "--config", metavar="FILE", help="JSON or TOML file: accounts, SAML tokens, subtrees, VMs"
    )
    acc = p.add_argument_group("accounts")
    acc.add_argument("--user", default=DEFAULT_USER, help="vCenter user (default %(default)s)")
    acc.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the vCenter password (default: random)",
    )
    acc.add_argument(
        "--guest-user", default=DEFAULT_GUEST_USER, help="guest user (default %(default)s)"
    )
    acc.add_argument(
        "--guest-password-file",
        metavar="FILE",
        help="file holding the guest password (default: random)",
    )
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s)")
    net.add_argument("--port", type=int, default=0, help="vCenter port (default: random free)")
    net.add_argument("--esx-port", type=int, default=0, help="ESXi port (default: random free)")
    net.add_argument(
        "--hostname", action="append", default=[], help="extra certificate SAN (repeatable)"
    )
    net.add_argument("--no-tls", action="store_true", help="plain HTTP on both listeners")
    net.add_argument(
        "--separate-esx-ca",
        action="store_true",
        help="sign the ESXi certificate with a second CA (esx_ca_file)",
    )
    net.add_argument(
        "--cert-dir",
        metavar="DIR",
        help="where to write the CA and certificates (default: a temp dir)",
    )
    net.add_argument(
        "--esx-url-host",
        default="*",
        help="host part of transfer URLs: '*' (default), NAME or NAME:PORT",
    )
    beh = p.add_argument_group("behaviour")
    beh.add_argument("--session-idle-timeout", type=_positive, default=1800.0, metavar="S")
    beh.add_argument("--transfer-ttl", type=_positive, default=600.0, metavar="S")
    beh.add_argument("--max-page-size", type=int, default=1000, metavar="N")
    beh.add_argument(
        "--no-released-api",
        action="store_true",
        help="disable POST .../guest/filesystem?action=create",
    )
    beh.add_argument(
        "--no-preview-api",
        action="store_true",
        help="disable the pre-release GET .../guest/filesystem",
    )
    beh.add_argument(
        "--as-esxi",
        action="store_true",
        help="look like a standalone ESXi host: SOAP /sdk only (no /api, no VI/JSON)",
    )
    beh.add_argument("--no-soap", action="store_true", help="disable the SOAP endpoint /sdk")
    beh.add_argument(
        "--no-vi-json", action="store_true", help="disable the VI/JSON endpoint /sdk/vim25/..."
    )
    beh.add_argument(
        "--omit-content-length",
        action="store_true",
        help="send transfer bodies without Content-Length (chunked)",
    )
    beh.add_argument("--chunk-size", type=int, default=1024 * 1024, help=argparse.SUPPRESS)
    # test knob: lower GET /api/vcenter/vm's 4000-result limit without 4000 VMs
    beh.add_argument("--vm-list-limit", type=int, default=4000, help=argparse.SUPPRESS)
    beh.add_argument(
        "--faults",
        metavar="JSON",
        help="initial faults, as for POST /_sim/faults, e.g. '{\"api_latency\": 0.1}'",
    )
    add_cost_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument(
        "--ready-file", metavar="FILE", help="also write the ready JSON line to FILE (atomically)"
    )
    out.add_argument("--log-level", default="INFO")
    out.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return p


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        value = f.readline().rstrip("\r\n")
    if not value:
        raise UsageError(f"{path}: empty secret")
    return value


def load_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        import tomllib

        data: Any = tomllib.loads(raw.decode("utf-8"))
    else:
        data = json.loads(raw)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: top level must be an object/table")
    unknown = set(data) - {"vcenter_users", "guest_accounts", "vms", "faults", "cost"}
    if unknown:
        raise UsageError(f"{path}: unknown keys {sorted(unknown)}")
    return data


def _root(path: str) -> bytes:
    real = os.path.realpath(os.fsencode(path))
    if not os.path.isdir(real):
        raise UsageError(f"{path}: not a directory")
    return real


def _drives(spec: str) -> tuple[str, bytes, dict[str, bytes]]:
    """``NAME=DIR[,D=DIR2...]`` -> (name, C: root, other drives)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise UsageError(f"--windows-vm {spec!r}: expected NAME=DIR[,D=DIR2...]")
    parts = re.split(r",([A-Za-z])=", rest)
    drives: dict[str, bytes] = {}
    for letter, path in zip(parts[1::2], parts[2::2], strict=True):
        if letter.upper() in drives or letter.upper() == "C":
            raise UsageError(f"--windows-vm {spec!r}: drive {letter.upper()}: given twice")
        drives[letter.upper()] = _root(path)
    return name, _root(parts[0]), drives


def _config_drives(entry: dict[str, Any]) -> dict[str, bytes]:
    drives = entry.get("drives", {})
    if not isinstance(drives, dict) or not all(
        isinstance(k, str) and re.fullmatch(r"[A-Za-z]", k) and k.upper() != "C" for k in drives
    ):
        raise UsageError("vms: 'drives' must map letters other than C to directories")
    return {k.upper(): _root(str(v)) for k, v in drives.items()}


def setup(args: argparse.Namespace) -> tuple[SimState, ServerSettings, list[str]]:
    """Build the state and settings from the command line; returns dirs to remove at exit."""
    cleanup: list[str] = []
    config = load_config(args.config) if args.config else {}
    password = _read_secret(args.password_file) if args.password_file else secrets.token_urlsafe(18)
    guest_password = (
        _read_secret(args.guest_password_file)
        if args.guest_password_file
        else secrets.token_urlsafe(18)
    )
    users = {args.user: password}
    for entry in config.get("vcenter_users", []):
        if not isinstance(entry, dict) or not {"user", "password"} <= set(entry):
            raise UsageError("vcenter_users entries need 'user' and 'password'")
        users[str(entry["user"])] = str(entry["password"])
    accounts = [GuestAccount(args.guest_user, guest_password)]
    for entry in config.get("guest_accounts", []):
        if not isinstance(entry, dict) or "user" not in entry:
            raise UsageError("guest_accounts entries need 'user'")
        tokens = entry.get("saml_tokens", [])
        if isinstance(tokens, str):
            tokens = [tokens]
        subtree = str(entry.get("subtree", "/"))
        if not subtree.startswith("/") and not re.match(r"[A-Za-z]:[\\/]", subtree):
            raise UsageError(f"guest account {entry['user']}: subtree must be absolute")
        accounts = [a for a in accounts if a.user != entry["user"]]
        accounts.append(
            GuestAccount(
                str(entry["user"]),
                None if entry.get("password") is None else str(entry["password"]),
                tuple(str(t) for t in tokens),
                subtree,
            )
        )
    vms: list[Vm] = []
    next_id = 42

    def add_vm(name: str, root: bytes, vm_id: str | None = None, **kw: Any) -> None:
        nonlocal next_id
        if vm_id is None:
            vm_id = f"vm-{next_id}"
            next_id += 1
        if any(v.vm == vm_id or v.name == name for v in vms):
            raise UsageError(f"duplicate VM {name!r} / {vm_id!r}")
        vms.append(Vm(vm_id, name, root, **kw))

    if args.demo:
        tmp = tempfile.mkdtemp(prefix="guestfs-sim-demo-")
        cleanup.append(tmp)
        build_demo_tree(tmp, args.demo_big_mib)
        add_vm(args.vm_name, _root(tmp))
    if args.root:
        add_vm(args.vm_name if not args.demo else args.vm_name + "-2", _root(args.root))
    for spec in args.vm:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise UsageError(f"--vm {spec!r}: expected NAME=DIR")
        add_vm(name, _root(path))
    for spec in args.windows_vm:
        name, c_root, drives = _drives(spec)
        add_vm(name, c_root, family="WINDOWS", drives=drives)
    for entry in config.get("vms", []):
        if not isinstance(entry, dict) or not {"name", "root"} <= set(entry):
            raise UsageError("vms entries need 'name' and 'root'")
        kw: dict[str, Any] = {}
        if "power_state" in entry:
            if entry["power_state"] not in POWER_STATES:
                raise UsageError(f"power_state must be one of {POWER_STATES}")
            kw["power_state"] = entry["power_state"]
        if "instance_uuid" in entry:
            try:
                kw["instance_uuid"] = str(uuid.UUID(str(entry["instance_uuid"])))
            except ValueError as exc:
                raise UsageError(f"vms: instance_uuid {entry['instance_uuid']!r}: {exc}") from exc
        for key in ("tools_running", "cpu_count", "memory_size_MiB"):
            if key in entry:
                kw[key] = entry[key]
        family = entry.get("family", "POSIX")
        if family not in ("POSIX", "WINDOWS"):
            raise UsageError("vms: 'family' must be POSIX or WINDOWS")
        if family == "WINDOWS":
            kw.update(family="WINDOWS", drives=_config_drives(entry))
        elif "drives" in entry:
            raise UsageError("vms: 'drives' needs family = \"WINDOWS\"")
        add_vm(str(entry["name"]), _root(str(entry["root"])), entry.get("vm"), **kw)
    fleet: Fleet | None = None
    if args.fleet < 0:
        raise UsageError("--fleet must be >= 0")
    if args.fleet:
        tmp = tempfile.mkdtemp(prefix="guestfs-sim-fleet-")
        cleanup.append(tmp)
        fleet = build_fleet(
            args.fleet, args.fleet_seed, tmp, {a.user: a for a in accounts}[args.guest_user]
        )
        taken = {v.vm for v in vms} & {v.vm for v in fleet.vms}
        if taken:
            raise UsageError(f"--fleet ids clash with configured VMs: {sorted(taken)}")
        vms.extend(fleet.vms)
    if not vms:
        raise UsageError(
            "nothing to serve: give --root DIR, --vm NAME=DIR, --windows-vm NAME=DIR, --demo, "
            "--fleet N or vms in --config"
        )

    faults = Faults()
    try:
        if "faults" in config:
            faults.update(config["faults"])
        if args.faults:
            faults.update(json.loads(args.faults))
    except (ValueError, FaultError) as exc:
        raise UsageError(f"faults: {exc}") from exc
    if args.max_page_size < 1:
        raise UsageError("--max-page-size must be >= 1")
    options = SimOptions(
        session_idle_timeout=args.session_idle_timeout,
        transfer_ttl=args.transfer_ttl,
        max_page_size=args.max_page_size,
        released_api=not args.no_released_api,
        preview_api=not args.no_preview_api,
        esx_url_host=args.esx_url_host,
        chunk_size=max(4096, args.chunk_size),
        max_vm_list=args.vm_list_limit,
    )
    try:
        cost = cost_from(args, config)
    except CostError as exc:
        raise UsageError(f"cost: {exc}") from exc
    state = SimState(
        options, users, accounts, vms, faults, cost=cost, folders=fleet.folders if fleet else ()
    )
    cert_dir = args.cert_dir
    if cert_dir is None:
        cert_dir = tempfile.mkdtemp(prefix="guestfs-sim-tls-")
        cleanup.append(cert_dir)
    else:
        os.makedirs(cert_dir, exist_ok=True)
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        esx_port=args.esx_port,
        tls=not args.no_tls,
        hostnames=list(args.hostname),
        separate_esx_ca=args.separate_esx_ca,
        cert_dir=cert_dir,
        ready_file=args.ready_file,
        omit_content_length=args.omit_content_length,
        access_log=args.access_log,
        vim=VimOptions(as_esxi=args.as_esxi, soap=not args.no_soap, vi_json=not args.no_vi_json),
        ready_extra={
            "apis": VimOptions(args.as_esxi, not args.no_soap, not args.no_vi_json).apis(),
            "user": args.user,
            "password": password,
            "guest_user": args.guest_user,
            "guest_password": guest_password,
            **({"fleet": fleet.ready_json()} if fleet else {}),
        },
    )
    return state, settings, cleanup


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:
        from .ctl import ctl_main

        return ctl_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        state, settings, cleanup = setup(args)
    except (UsageError, OSError) as exc:
        print(f"guestfs-sim: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(run_server, state, settings)
    except KeyboardInterrupt:
        pass
    finally:
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

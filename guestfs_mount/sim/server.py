"""Run the vCenter and ESXi listeners in one trio process (Hypercorn's trio worker)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .esx_app import build_esx_app
from .state import SimState
from .tlsutil import TlsFiles, make_certs
from .vcenter_app import build_vcenter_app
from .vim_app import VimOptions, wrap_vim

log = logging.getLogger("guestfs_mount.sim")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    esx_port: int = 0
    tls: bool = True
    hostnames: list[str] = field(default_factory=list)
    separate_esx_ca: bool = False
    cert_dir: str = ""
    ready_file: str | None = None
    omit_content_length: bool = False
    access_log: bool = False
    # extra fields for the ready line (user, password, ...)
    ready_extra: dict[str, Any] = field(default_factory=dict)
    vim: VimOptions = field(default_factory=VimOptions)  # SOAP / VI/JSON / --as-esxi


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _hypercorn_config(settings: ServerSettings, port: int, cert: str, key: str) -> Config:
    cfg = Config()
    cfg.bind = [_bind(settings.host, port)]
    if settings.tls:
        cfg.certfile = cert
        cfg.keyfile = key
    cfg.alpn_protocols = ["http/1.1"]
    cfg.graceful_timeout = 1.0
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.accesslog = logging.getLogger("hypercorn.access") if settings.access_log else None
    return cfg


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


def _url(scheme: str, host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{h}:{port}"


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def run_server(state: SimState, settings: ServerSettings) -> dict[str, Any]:
    """Serve until SIGINT/SIGTERM. Returns the ready info."""
    tls: TlsFiles | None = None
    if settings.tls:
        tls = make_certs(settings.cert_dir, settings.hostnames, settings.separate_esx_ca)
    scheme = "https" if settings.tls else "http"
    state.options.esx_scheme = scheme
    shutdown = trio.Event()
    vc_app = wrap_vim(build_vcenter_app(state), state, settings.vim, settings.tls)
    esx_app = build_esx_app(state, settings.omit_content_length)
    vc_cfg = _hypercorn_config(
        settings, settings.port, tls.vcenter_cert if tls else "", tls.vcenter_key if tls else ""
    )
    esx_cfg = _hypercorn_config(
        settings, settings.esx_port, tls.esx_cert if tls else "", tls.esx_key if tls else ""
    )
    info: dict[str, Any] = {}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    log.info("signal %d: shutting down", signum)
                    shutdown.set()
                    return

            nursery.start_soon(watch_signals)
            vc_binds = await nursery.start(_serve, vc_app, vc_cfg, shutdown)
            esx_binds = await nursery.start(_serve, esx_app, esx_cfg, shutdown)
            vc_port = _port_of(vc_binds[0])
            esx_port = _port_of(esx_binds[0])
            state.options.esx_port = esx_port
            vcenter_url = _url(scheme, settings.host, vc_port)
            info = {
                "vcenter_url": vcenter_url,
                "esx_url": _url(scheme, settings.host, esx_port),
                "admin_url": vcenter_url + "/_sim",
                "vcenter_port": vc_port,
                "esx_port": esx_port,
                "tls": settings.tls,
                "ca_file": tls.ca_file if tls else None,
                "esx_ca_file": tls.esx_ca_file if tls else None,
                **settings.ready_extra,
                "vms": [
                    {
                        "name": vm.name,
                        "vm": vm.vm,
                        "instance_uuid": vm.instance_uuid,
                        "root": os.fsdecode(vm.root),
                        "family": vm.family,
                        "guest_root": vm.guest_root,
                        "folder": vm.folder,
                        "folder_path": state.folder_path(vm.folder),
                        "power_state": vm.power_state,
                        "tools_running": vm.tools_running,
                        **(
                            {"drives": {k: os.fsdecode(v) for k, v in vm.drives.items()}}
                            if vm.drives
                            else {}
                        ),
                    }
                    for vm in state.vms.values()
                ],
                "pid": os.getpid(),
            }
            line = json.dumps(info, ensure_ascii=True)
            if settings.ready_file:
                write_atomic(settings.ready_file, line + "\n")
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            log.info("guestfs-sim ready: vCenter %s, ESXi %s", vcenter_url, info["esx_url"])
            await shutdown.wait()
            # the serve tasks end by themselves (shutdown_trigger); then the watcher
            nursery.cancel_scope.deadline = trio.current_time() + 5
    return info


async def _serve(
    app: Any,
    cfg: Config,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(app, cfg, shutdown_trigger=shutdown.wait, task_status=task_status)

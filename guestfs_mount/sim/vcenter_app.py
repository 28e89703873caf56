"""The vCenter ``/api`` listener: sessions, VM inventory, guest filesystem operations.

Routing is done by hand on ``scope["raw_path"]`` so that a guest path percent-encoded
in the URL (``files/%2Fetc%2Fhosts``, or raw ``files//etc/hosts``) keeps every byte,
including non-UTF-8 ones, which ASGI's decoded ``scope["path"]`` would lose.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from . import admin
from .state import SimState, Vm, invalid_argument, unauthenticated
from .vapi import JsonResponse, VapiError, error_response, operation_not_found

log = logging.getLogger("guestfs_mount.sim.vcenter")

SESSION_HEADER = "vmware-api-session-id"
Handler = Callable[[Request, list[bytes]], Awaitable[Response]]


class ApiRouter:
    """ASGI app for everything under ``/api``."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        await self.state.faults.hold_api()
        raw = request.scope.get("raw_path") or request.scope["path"].encode("latin-1")
        segs = raw.split(b"/")[2:]  # drop "" and "api"
        try:
            return await self.dispatch(request, segs)
        except VapiError as err:
            if err.status >= 500 or err.error_type not in ("NOT_FOUND",):
                log.info(
                    "%s %s -> %s %s", request.method, request.url.path, err.status, err.error_type
                )
            return error_response(err)

    async def dispatch(self, request: Request, segs: list[bytes]) -> Response:
        method = request.method
        action = request.query_params.get("action")
        head = [unquote(s.decode("latin-1")) for s in segs[:7]]
        n = len(segs)
        if head == ["session"]:
            if method == "POST" and action is None:
                return await self.session_create(request)
            if method == "GET":
                return await self.session_get(request)
            if method == "DELETE":
                return await self.session_delete(request)
            raise operation_not_found()
        if head == ["vcenter", "folder"] and method == "GET":
            return await self.folder_list(request)
        if head[:2] != ["vcenter", "vm"]:
            raise operation_not_found()
        if n == 2:
            if method == "GET":
                return await self.vm_list(request)
            raise operation_not_found()
        vm_id = unquote_to_bytes(segs[2]).decode("utf-8", "replace")
        rest = head[3:]
        if method == "GET" and n == 3:
            return await self.vm_get(request, vm_id)
        if method == "GET" and rest == ["guest", "identity"]:
            return await self.vm_identity(request, vm_id)
        if method == "GET" and rest == ["power"]:
            return await self.vm_power(request, vm_id)
        if method == "GET" and rest == ["tools"]:
            return await self.vm_tools(request, vm_id)
        if method == "GET" and rest == ["guest", "operations"]:
            return await self.vm_guest_operations(request, vm_id)
        if rest[:2] != ["guest", "filesystem"]:
            raise operation_not_found()
        if n == 5:
            if method == "POST" and action == "create" and self.state.options.released_api:
                return await self.transfer_create(request, vm_id)
            if method == "GET" and action is None and self.state.options.preview_api:
                return await self.transfer_preview(request, vm_id)
            raise operation_not_found()
        if rest[2] == "files" and method == "POST":
            if n == 6 and action == "list":
                return await self.files_list(request, vm_id)
            if n == 6 and action in ("createTemporary", "move", "update"):
                return await self.read_only(request, vm_id)
            if n > 6:
                guest = os.fsdecode(unquote_to_bytes(b"/".join(segs[6:])))
                if action == "get":
                    return await self.files_get(request, vm_id, guest)
                if action == "delete":
                    return await self.read_only(request, vm_id)
        if (
            rest[2] == "directories"
            and n == 6
            and method == "POST"
            and action in ("create", "createTemporary", "delete", "move")
        ):
            return await self.read_only(request, vm_id)
        raise operation_not_found()

    # ---- helpers -----------------------------------------------------------------
    def session(self, request: Request) -> None:
        self.state.session(request.headers.get(SESSION_HEADER))

    async def body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise VapiError(
                "INVALID_ARGUMENT",
                f"Unable to parse the request body as JSON: {exc}.",
                msg_id="vapi.json.parse.error",
            ) from exc
        if not isinstance(value, dict):
            raise invalid_argument("request_body", "The request body must be a JSON object.")
        return value

    async def guest_call(
        self, request: Request, vm_id: str, call: str
    ) -> tuple[Vm, dict[str, Any]]:
        """Common prologue of a guest operation: count, session, body, VM state."""
        self.state.count(call)
        self.session(request)
        body = await self.body(request)
        creds = body.get("credentials")
        if creds is None:
            raise invalid_argument("credentials", "Field 'credentials' is required.")
        vm = self.state.vm(vm_id)
        self.state.guest_ready(vm)
        return vm, body

    # ---- session -----------------------------------------------------------------
    async def session_create(self, request: Request) -> Response:
        self.state.count("session.create")
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "basic":
            raise unauthenticated("Authentication required.")
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise unauthenticated("Authentication required.") from None
        if not sep:
            raise unauthenticated("Authentication required.")
        token = self.state.login(user, password)
        return JsonResponse(token, status_code=201)

    async def session_get(self, request: Request) -> Response:
        self.state.count("session.get")
        sess = self.state.session(request.headers.get(SESSION_HEADER))
        from .state import iso_now

        offset = _wall_offset(self.state)
        return JsonResponse(
            {
                "user": sess.user,
                "created_time": iso_now(sess.created + offset),
                "last_accessed_time": iso_now(sess.last_accessed + offset),
            }
        )

    async def session_delete(self, request: Request) -> Response:
        self.state.count("session.delete")
        token = request.headers.get(SESSION_HEADER)
        self.state.session(token)
        assert token is not None
        self.state.logout(token)
        return Response(status_code=204)

    # ---- inventory -----------------------------------------------------------------
    async def vm_list(self, request: Request) -> Response:
        self.state.count("vm.list")
        self.session(request)
        q = request.query_params
        # The simulator has no hosts/clusters/resource pools and one datacenter: such a
        # filter matches nothing (a datacenter filter naming it matches everything).
        unmatched = any(q.getlist(k) for k in ("hosts", "clusters", "resource_pools")) or any(
            d != self.dc_id for d in q.getlist("datacenters")
        )
        vms = self.state.list_vms(
            set(q.getlist("names")),
            set(q.getlist("vms")),
            set(q.getlist("power_states")),
            set(q.getlist("folders")),
            unmatched,
        )
        return JsonResponse([vm.summary() for vm in vms])

    dc_id = "datacenter-1"  # vim_ops.VCENTER_MOIDS["datacenter"]

    async def folder_list(self, request: Request) -> Response:
        self.state.count("folder.list")
        self.session(request)
        q = request.query_params
        if any(d != self.dc_id for d in q.getlist("datacenters")):
            return JsonResponse([])
        folders = self.state.list_folders(
            set(q.getlist("folders")),
            set(q.getlist("names")),
            set(q.getlist("parent_folders")),
            q.get("type"),
        )
        return JsonResponse(
            [{"folder": f.folder, "name": f.name, "type": "VIRTUAL_MACHINE"} for f in folders]
        )

    async def vm_get(self, request: Request, vm_id: str) -> Response:
        """``Vcenter.VM.Info``, the fields a fleet mount uses (the real one has many more)."""
        self.state.count("vm.get")
        self.session(request)
        vm = self.state.vm(vm_id)
        return JsonResponse(
            {
                "name": vm.name,
                "guest_OS": vm.guest_os,
                "power_state": vm.power_state,
                "cpu": {
                    "count": vm.cpu_count,
                    "cores_per_socket": 1,
                    "hot_add_enabled": False,
                    "hot_remove_enabled": False,
                },
                "memory": {"size_MiB": vm.memory_size_MiB, "hot_add_enabled": False},
                "identity": {
                    "name": vm.name,
                    "instance_uuid": vm.instance_uuid,
                    "bios_uuid": vm.bios_uuid,
                },
            }
        )

    async def vm_identity(self, request: Request, vm_id: str) -> Response:
        """``Vcenter.Vm.Guest.Identity.Info``: what Tools reports, so only while it runs."""
        self.state.count("vm.identity")
        self.session(request)
        vm = self.state.vm(vm_id)
        if vm.power_state != "POWERED_ON" or not vm.tools_running:
            raise VapiError(
                "SERVICE_UNAVAILABLE",
                f"VMware Tools is not running in virtual machine '{vm.vm}'.",
                msg_id="com.vmware.api.vcenter.vm.guest.tools_not_running",
                args=[vm.vm],
            )
        windows = vm.family == "WINDOWS"
        full = "Microsoft Windows Server 2019 (64-bit)" if windows else "Other Linux (64-bit)"
        return JsonResponse(
            {
                "name": vm.guest_os,
                "family": "WINDOWS" if windows else "LINUX",
                "full_name": {
                    "id": "vmsg.guestos." + vm.guest_os.lower(),
                    "default_message": full,
                    "args": [],
                },
                "host_name": vm.vm,
                "ip_address": "192.0.2." + str(sum(vm.vm.encode()) % 250 + 1),
            }
        )

    async def vm_power(self, request: Request, vm_id: str) -> Response:
        self.state.count("vm.power")
        self.session(request)
        vm = self.state.vm(vm_id)
        body: dict[str, Any] = {"state": vm.power_state}
        if vm.power_state == "POWERED_OFF":
            body["clean_power_off"] = True
        return JsonResponse(body)

    async def vm_tools(self, request: Request, vm_id: str) -> Response:
        self.state.count("vm.tools")
        self.session(request)
        vm = self.state.vm(vm_id)
        running = vm.tools_running and vm.power_state == "POWERED_ON"
        return JsonResponse(
            {
                "run_state": "RUNNING" if running else "NOT_RUNNING",
                "version_status": "UNMANAGED",
                "version": "12.3.5",
                "version_number": 12389,
                "install_type": "OPEN_VM_TOOLS",
                "upgrade_policy": "MANUAL",
                "auto_update_supported": False,
                "install_attempt_count": 0,
            }
        )

    async def vm_guest_operations(self, request: Request, vm_id: str) -> Response:
        self.state.count("vm.guest_operations")
        self.session(request)
        vm = self.state.vm(vm_id)
        ready = vm.tools_running and vm.power_state == "POWERED_ON"
        return JsonResponse(
            {"guest_operations_ready": ready, "interactive_guest_operations_ready": False}
        )

    # ---- guest filesystem --------------------------------------------------------
    async def files_list(self, request: Request, vm_id: str) -> Response:
        vm, body = await self.guest_call(request, vm_id, "files.list")
        async with self.state.guest_op(vm, "files.list", "rest") as op:
            account = self.state.guest_login(body["credentials"], vm)
            if "path" not in body:
                raise invalid_argument("path", "Field 'path' is required.")
            result, scanned = await trio.to_thread.run_sync(
                self.state.list_files, vm, account, body
            )
            op.listed(scanned=scanned, returned=len(result["files"]))
        return JsonResponse(result)

    async def files_get(self, request: Request, vm_id: str, guest_path: str) -> Response:
        vm, body = await self.guest_call(request, vm_id, "files.get")
        async with self.state.guest_op(vm, "files.get", "rest"):
            account = self.state.guest_login(body["credentials"], vm)
            result = self.state.get_file(vm, account, guest_path)
        return JsonResponse(result)

    async def transfer_create(self, request: Request, vm_id: str) -> Response:
        vm, body = await self.guest_call(request, vm_id, "transfer.create")
        spec = body.get("spec")
        if not isinstance(spec, dict) or "path" not in spec:
            raise invalid_argument("spec", "Field 'spec' with 'spec.path' is required.")
        if spec.get("attributes") is not None:
            raise VapiError(
                "INVALID_ARGUMENT",
                "'spec.attributes' is only valid for a transfer to the guest; the simulator "
                "is read-only.",
                msg_id="com.vmware.api.vcenter.vm.guest.filesystem.transfers.upload_unsupported",
                args=["spec.attributes"],
            )
        async with self.state.guest_op(vm, "transfer.create", "rest"):
            account = self.state.guest_login(body["credentials"], vm)
            url = self.state.create_transfer(vm, account, spec["path"])
        return JsonResponse(url, status_code=201)

    async def transfer_preview(self, request: Request, vm_id: str) -> Response:
        vm, body = await self.guest_call(request, vm_id, "transfer.preview")
        if "path" not in body:
            raise invalid_argument("path", "Field 'path' is required.")
        async with self.state.guest_op(vm, "transfer.preview", "rest"):
            account = self.state.guest_login(body["credentials"], vm)
            url = self.state.create_transfer(vm, account, body["path"])
        return JsonResponse(url, status_code=200)

    async def read_only(self, request: Request, vm_id: str) -> Response:
        self.session(request)
        self.state.vm(vm_id)
        raise VapiError(
            "UNSUPPORTED",
            "The simulator serves a read-only guest: this operation is not supported.",
            msg_id="com.vmware.api.vcenter.vm.guest.filesystem.unsupported",
        )


def _wall_offset(state: SimState) -> float:
    """Offset from the state's monotonic clock to wall-clock time."""
    import time

    return time.time() - state.clock()


def build_vcenter_app(state: SimState) -> Any:
    api = ApiRouter(state)
    rest = Starlette(
        routes=[
            Mount("/_sim", routes=admin.routes(state)),
            Route("/", _root),
        ]
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # /api goes straight to the router: Starlette's path patterns do not match a
        # decoded newline, and guest names may contain one (files/%2Fa%0Ab).
        if scope["type"] == "http" and (scope.get("raw_path") or b"").startswith(b"/api/"):
            await api(scope, receive, send)
        else:
            await rest(scope, receive, send)

    return app


async def _root(request: Request) -> Response:
    return Response("guestfs-sim vCenter endpoint: see /api\n", media_type="text/plain")

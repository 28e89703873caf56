"""``/_sim`` admin routes on the vCenter listener (no authentication: a loopback test tool).

==========================  ==================================================
``GET  /_sim/stats``        call counters, transfer counters, sessions, bytes
``POST /_sim/stats/reset``  zero the counters
``GET  /_sim/faults``       current fault settings
``POST /_sim/faults``       change some faults (see faults.Faults.update)
``POST /_sim/faults/reset`` clear every fault (every VM's own too)
``GET  /_sim/vms/{vm}/faults``  that VM's own faults (faults.VM_KEYS)
``POST /_sim/vms/{vm}/faults``  change some: ``{"stall_api": true}`` stalls its guest calls
``POST /_sim/vms/{vm}/faults/reset``  clear them
``POST /_sim/vms/{vm}/power``  ``{"state": "POWERED_ON"|"POWERED_OFF"|"SUSPENDED"}``
``POST /_sim/vms/{vm}/tools``  ``{"running": bool}``
``POST /_sim/vms``          ``{"like": vm, "name": str, "folder"?: id, "vm"?: id}``: add a VM
``DELETE /_sim/vms/{vm}``   remove a VM from the inventory
``POST /_sim/vms/{vm}/rename``  ``{"name": str}``
``POST /_sim/sessions/expire``  drop every vCenter session
``POST /_sim/restart``      drop sessions and transfer URLs, cut in-flight bodies
``GET  /_sim/info``         VMs and options (no secrets)
``GET  /_sim/cost``         the cost model's settings and seed
``POST /_sim/cost``         change some (``{"model": "realistic", "guest_concurrency": 2}``)
==========================  ==================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .cost import CostError
from .faults import VM_KEYS, FaultError, Faults
from .state import POWER_STATES, SimState, Vm
from .vapi import JsonResponse

log = logging.getLogger("guestfs_mount.sim.admin")


def _bad(message: str, status: int = 400) -> JsonResponse:
    return JsonResponse({"error": message}, status_code=status)


async def _json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    return json.loads(raw)


def _set_faults(
    faults: Faults, body: Any, keys: tuple[str, ...] | None = None, who: str = "global"
) -> Response:
    try:
        if not isinstance(body, dict):
            raise FaultError("body must be a JSON object")
        faults.update(body, keys)
    except FaultError as exc:
        return _bad(str(exc))
    log.info("%s faults set: %s", who, body)
    return JsonResponse(faults.to_json(keys))


def routes(state: SimState) -> list[BaseRoute]:
    def vm_route(fn: Callable[[Vm, Any], Awaitable[Response]]) -> Callable[[Request], Any]:
        """A route of ``/vms/{vm}/...``: ``fn(vm, JSON body)``, or the error answer."""

        async def route(request: Request) -> Response:
            vm = state.vms.get(request.path_params["vm"])
            if vm is None:
                return _bad("unknown vm", 404)
            try:
                body = await _json(request)
            except ValueError as exc:
                return _bad(str(exc))
            return await fn(vm, body)

        return route

    async def stats(request: Request) -> Response:
        return JsonResponse(state.stats_json())

    async def stats_reset(request: Request) -> Response:
        state.reset_stats()
        return JsonResponse(state.stats_json())

    async def faults_get(request: Request) -> Response:
        return JsonResponse(state.faults.to_json())

    async def faults_post(request: Request) -> Response:
        try:
            body = await _json(request)
        except ValueError as exc:
            return _bad(str(exc))
        return _set_faults(state.faults, body)

    async def faults_reset(request: Request) -> Response:
        state.reset_faults()
        return JsonResponse(state.faults.to_json())

    async def vm_faults_get(request: Request) -> Response:
        vm = state.vms.get(request.path_params["vm"])
        if vm is None:
            return _bad("unknown vm", 404)
        return JsonResponse(state.faults_of(vm).to_json(VM_KEYS))

    @vm_route
    async def vm_faults_post(vm: Vm, body: Any) -> Response:
        return _set_faults(state.faults_of(vm), body, VM_KEYS, vm.vm)

    async def vm_faults_reset(request: Request) -> Response:
        vm = state.vms.get(request.path_params["vm"])
        if vm is None:
            return _bad("unknown vm", 404)
        own = state.faults_of(vm)
        own.reset()
        return JsonResponse(own.to_json(VM_KEYS))

    async def cost_get(request: Request) -> Response:
        return JsonResponse(state.cost.to_json())

    async def cost_post(request: Request) -> Response:
        try:
            body = await _json(request)
            if not isinstance(body, dict):
                raise CostError("body must be a JSON object")
            state.cost.update(body)
        except (ValueError, CostError) as exc:
            return _bad(str(exc))
        log.info("cost model set: %s", body)
        return JsonResponse(state.cost.to_json())

    @vm_route
    async def vm_power(vm: Vm, body: Any) -> Response:
        new = body.get("state") if isinstance(body, dict) else None
        if new not in POWER_STATES:
            return _bad(f"state must be one of {list(POWER_STATES)}")
        state.set_power(vm, new)
        log.info("%s power -> %s", vm.vm, new)
        return JsonResponse(vm.summary())

    @vm_route
    async def vm_tools(vm: Vm, body: Any) -> Response:
        running = body.get("running") if isinstance(body, dict) else None
        if not isinstance(running, bool):
            return _bad("running must be a boolean")
        vm.tools_running = running
        log.info("%s tools running -> %s", vm.vm, running)
        return JsonResponse({"vm": vm.vm, "tools_running": running})

    async def vm_add(request: Request) -> Response:
        try:
            body = await _json(request)
        except ValueError as exc:
            return _bad(str(exc))
        if not isinstance(body, dict):
            return _bad("body must be a JSON object")
        like_id = body.get("like")
        like = state.vms.get(like_id) if isinstance(like_id, str) else None
        name, folder, vm_id = body.get("name"), body.get("folder"), body.get("vm")
        if like is None:
            return _bad("'like' must name an existing vm")
        if not isinstance(name, str) or not name:
            return _bad("'name' must be a non-empty string")
        if not all(x is None or isinstance(x, str) for x in (folder, vm_id)):
            return _bad("'folder' and 'vm' must be strings")
        try:
            vm = state.add_vm_like(like, name, folder, vm_id)
        except ValueError as exc:
            return _bad(str(exc))
        log.info("%s added (like %s)", vm.vm, like.vm)
        return JsonResponse(
            {**vm.summary(), "folder": vm.folder, "instance_uuid": vm.instance_uuid}
        )

    async def vm_remove(request: Request) -> Response:
        vm = state.vms.get(request.path_params["vm"])
        if vm is None:
            return _bad("unknown vm", 404)
        state.remove_vm(vm)
        log.info("%s removed", vm.vm)
        return JsonResponse({"removed": vm.vm})

    @vm_route
    async def vm_rename(vm: Vm, body: Any) -> Response:
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return _bad("'name' must be a non-empty string")
        vm.name = name
        return JsonResponse(vm.summary())

    async def sessions_expire(request: Request) -> Response:
        n = len(state.sessions)
        state.drop_sessions()
        return JsonResponse({"expired": n})

    async def restart(request: Request) -> Response:
        state.restart()
        log.info("simulated vCenter restart")
        return JsonResponse({"restarted": True})

    async def info(request: Request) -> Response:
        opts = state.options
        return JsonResponse(
            {
                "vms": [
                    {
                        **vm.summary(),
                        "tools_running": vm.tools_running,
                        "instance_uuid": vm.instance_uuid,
                        "root": vm.root.decode("utf-8", "surrogateescape"),
                        "family": vm.family,
                        "guest_root": vm.guest_root,
                    }
                    for vm in state.vms.values()
                ],
                "options": {
                    "session_idle_timeout": opts.session_idle_timeout,
                    "transfer_ttl": opts.transfer_ttl,
                    "max_page_size": opts.max_page_size,
                    "released_api": opts.released_api,
                    "preview_api": opts.preview_api,
                    "esx_url_host": opts.esx_url_host,
                },
            }
        )

    return [
        Route("/stats", stats, methods=["GET"]),
        Route("/stats/reset", stats_reset, methods=["POST"]),
        Route("/faults", faults_get, methods=["GET"]),
        Route("/faults", faults_post, methods=["POST"]),
        Route("/faults/reset", faults_reset, methods=["POST"]),
        Route("/vms/{vm}/power", vm_power, methods=["POST"]),
        Route("/vms/{vm}/tools", vm_tools, methods=["POST"]),
        Route("/vms/{vm}/rename", vm_rename, methods=["POST"]),
        Route("/vms/{vm}/faults", vm_faults_get, methods=["GET"]),
        Route("/vms/{vm}/faults", vm_faults_post, methods=["POST"]),
        Route("/vms/{vm}/faults/reset", vm_faults_reset, methods=["POST"]),
        Route("/vms", vm_add, methods=["POST"]),
        Route("/vms/{vm}", vm_remove, methods=["DELETE"]),
        Route("/sessions/expire", sessions_expire, methods=["POST"]),
        Route("/restart", restart, methods=["POST"]),
        Route("/info", info, methods=["GET"]),
        Route("/cost", cost_get, methods=["GET"]),
        Route("/cost", cost_post, methods=["POST"]),
    ]

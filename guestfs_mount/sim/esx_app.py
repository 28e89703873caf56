"""The "ESXi host" listener: ``GET /guestFile?id=N&token=T`` streams one guest file.

A transfer URL serves exactly one successful GET. The body is streamed from disk in
chunks; its length is fixed by ``fstat`` when the GET starts. Powering the VM off,
suspending it, or ``/_sim/restart`` cancels the body mid-way, and the connection is
then closed without completing the response (the client sees a short body).
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import parse_qs

import trio
from starlette.applications import Starlette
from starlette.routing import Route

from . import guestfs
from .state import SimState, Transfer, TransferRefused
from .vapi import VapiError

log = logging.getLogger("guestfs_mount.sim.esx")

Scope = dict[str, Any]


async def _plain(send: Any, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class GuestFileApp:
    """Raw ASGI app (full control over body framing and connection cuts)."""

    def __init__(self, state: SimState, omit_content_length: bool = False) -> None:
        self.state = state
        self.omit_content_length = omit_content_length

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "GET":
            await _plain(send, 405, "only GET is supported by this read-only simulator")
            return
        qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            t = self.state.claim_transfer(
                (qs.get("id") or [None])[0], (qs.get("token") or [None])[0]
            )
        except TransferRefused as exc:
            await _plain(send, exc.status, exc.message)
            return
        try:
            root = t.vm.root_of(t.guest_path)
            fd = await trio.to_thread.run_sync(guestfs.open_regular, root, t.resolved)
        except VapiError as exc:
            t.state = "DEAD"
            await _plain(send, 404 if exc.status == 404 else 403, exc.default_message)
            return
        try:
            await self._serve(t, fd, receive, send)
        finally:
            os.close(fd)

    async def _serve(self, t: Transfer, fd: int, receive: Any, send: Any) -> None:
        state, faults, stats = self.state, self.state.faults, self.state.stats
        t.state = "IN_FLIGHT"
        stats.started += 1
        stats.by_path[t.guest_path] += 1
        size = os.fstat(fd).st_size
        abort_at = faults.take(faults.abort_after)
        truncate_at = faults.take(faults.truncate)
        pad = faults.take(faults.pad) or 0
        corrupt = faults.take(faults.corrupt) is not None
        stall_at = faults.take(faults.stall_body_after)
        file_len = size if truncate_at is None else min(size, truncate_at)
        body_len = file_len + pad
        headers = [(b"content-type", b"application/octet-stream")]
        if not (self.omit_content_length or faults.omit_content_length):
            headers.append((b"content-length", str(body_len).encode()))
        if not state.cost.settings.keep_alive:
            # real ESXi hosts are used without keep-alive (govmomi PR #3249)
            headers.append((b"connection", b"close"))
        sent = 0
        empty_done = False
        finishing = False
        client_gone = False

        async def watch_disconnect(cancel: trio.CancelScope) -> None:
            nonlocal client_gone
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    if finishing:
                        return
                    client_gone = True
                    cancel.cancel()
                    return

        with trio.CancelScope() as scope:
            t.scope = scope
            if t.state != "IN_FLIGHT":  # killed between claim and now
                scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect, nursery.cancel_scope)
                if faults.transfer_latency > 0:
                    await trio.sleep(faults.transfer_latency)
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                start = trio.current_time()
                chunk = state.cost.body_chunk(state.options.chunk_size)
                while sent < body_len:
                    limit = body_len
                    if abort_at is not None:
                        limit = min(limit, abort_at)
                    if stall_at is not None and sent >= stall_at:
                        await faults.body_unstall.wait()
                        stall_at = None
                        continue
                    if stall_at is not None:
                        limit = min(limit, stall_at)
                    if sent >= limit:
                        break  # abort point reached
                    bw = faults.bandwidth
                    n = min(chunk, limit - sent)
                    if bw is not None:
                        n = min(n, max(1024, int(bw / 20)))
                    if sent < file_len:
                        n = min(n, file_len - sent)
                        await state.cost.packet(t.vm, n)  # the bytes cross the guest lane
                        data = await trio.to_thread.run_sync(os.pread, fd, n, sent)
                        if not data:
                            break  # file shrank under us: cut
                        if corrupt and sent == 0:
                            data = _flip(data)
                    else:
                        data = b"\0" * n  # padding
                    last = sent + len(data) == body_len
                    if last:
                        # Hypercorn reports http.disconnect while finishing the response
                        finishing = True
                        sent += len(data)
                    await send({"type": "http.response.body", "body": data, "more_body": not last})
                    if not last:
                        sent += len(data)
                    stats.bytes_sent += len(data)
                    if bw is not None:
                        ahead = start + sent / bw - trio.current_time()
                        if ahead > 0:
                            await trio.sleep(ahead)
                if body_len == 0:
                    finishing = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    empty_done = True
                nursery.cancel_scope.cancel()
        t.scope = None
        completed = sent == body_len and (body_len > 0 or empty_done)
        if completed:
            t.state = "USED"
            stats.completed += 1
            return
        stats.failed += 1
        if client_gone:
            # the client went away: like ESXi, a failed GET leaves the URL unusable
            t.state = "DEAD"
            log.info("transfer %d: client went away after %d bytes", t.id, sent)
            return
        t.state = "DEAD"
        reason = t.killed_reason or ("fault abort_after" if abort_at is not None else "cut")
        log.info("transfer %d cut after %d of %d bytes (%s)", t.id, sent, body_len, reason)
        # returning without finishing the body makes Hypercorn close the connection


def _flip(data: bytes) -> bytes:
    buf = bytearray(data)
    for i in range(0, min(len(buf), 64), 7):
        buf[i] ^= 0xFF
    return bytes(buf)


def build_esx_app(state: SimState, omit_content_length: bool = False) -> Starlette:
    return Starlette(routes=[Route("/guestFile", GuestFileApp(state, omit_content_length))])

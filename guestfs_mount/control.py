"""The control socket: a mount answers ``status`` requests with a JSON document.

One Unix socket per mount in a per-user runtime directory (0700; the socket 0600),
so only the mounting user can ask. The protocol is one line in (``status``), one JSON
document out, then close; or ``evidence``: a JSON header line, then one JSON line per
ledger entry (``guestfs-mount evidence``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import trio

log = logging.getLogger(__name__)


def runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "guestfs-mount")
    if os.geteuid() == 0:
        return "/run/guestfs-mount"
    return os.path.join("/tmp", f"guestfs-mount-{os.geteuid()}")


def socket_path(mountpoint: str) -> str:
    # No realpath here: inside the daemon the mount point is its own mount, and a
    # syscall on it from the serving thread would deadlock. Callers pass real paths.
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"{digest}.sock")


def lock_mountpoint(mountpoint: str) -> int:
    """Take the mount point's lock for this process's life (the fd, never closed by us).

    Two mounts on one mount point would stack and the second would replace the first's
    control socket; flock is released by the kernel when the holder dies, so no stale lock.
    """
    path = socket_path(mountpoint)[: -len(".sock")] + ".lock"
    _private_dir(os.path.dirname(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" by pid {holder}" if holder.isdigit() else ""
        raise RuntimeError(f"{mountpoint} is already mounted{who}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a private directory owned by uid {os.geteuid()}")


async def serve_control(
    path: str,
    snapshot: Callable[[], dict[str, Any]],
    evidence: Callable[[], tuple[dict[str, Any], Iterable[dict[str, Any]]]] | None = None,
) -> None:
    """Serve ``snapshot()`` on ``path`` until cancelled; the socket is removed after."""
    _private_dir(os.path.dirname(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        try:
            with trio.move_on_after(5):
                request = await stream.receive_some(256)
                if request.strip() == b"status":
                    body = json.dumps(snapshot(), ensure_ascii=True, default=str)
                    await stream.send_all(body.encode() + b"\n")
            if request.strip() == b"evidence" and evidence is not None:
                await _send_evidence(stream, *evidence())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("control request failed")
        finally:
            await stream.aclose()

    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _send_evidence(
    stream: trio.SocketStream, head: dict[str, Any], records: Iterable[dict[str, Any]]
) -> None:
    # No deadline: a ledger can hold millions of entries. Built and sent in batches with
    # a checkpoint between them, so the mount keeps serving the kernel meanwhile.
    await stream.send_all(json.dumps(head, ensure_ascii=True).encode() + b"\n")
    it = iter(records)
    while batch := list(itertools.islice(it, 1000)):
        lines = (json.dumps(r, ensure_ascii=True).encode() + b"\n" for r in batch)
        await stream.send_all(b"".join(lines))


def ask_evidence(path: str, timeout: float = 60.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Synchronous client: the mount's evidence header and its ledger records."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"evidence\n")
        with s.makefile("rb") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    if not lines or not all(isinstance(x, dict) for x in lines):
        raise ValueError("malformed evidence answer")
    return lines[0], lines[1:]


def ask(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Synchronous client: the status document of the mount behind ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"status\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    doc = json.loads(b"".join(chunks))
    if not isinstance(doc, dict):
        raise ValueError("malformed status answer")
    return doc


def sockets() -> Iterator[str]:
    d = runtime_dir()
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".sock"):
            yield os.path.join(d, name)

"""The control socket: a mount answers ``status`` requests with a JSON document.

One Unix socket per mount in a per-user runtime directory (0700; the socket 0600),
so only the mounting user can ask. Clients trust neither blindly: the directory must be a
real directory of ours, private (not a symlink, no group/other bits: another user could
pre-create ``/tmp/guestfs-mount-UID``), and the process behind a socket must run as us or
root (``SO_PEERCRED``); answers are size-capped JSON without NaN/Infinity. The protocol
is one line in (``status``), one JSON document out, then close; or ``evidence``: a JSON
header line, then one JSON line per ledger entry (``guestfs-mount evidence``).
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
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import trio

log = logging.getLogger(__name__)

MAX_ANSWER = 16 << 20  # a status document is a few KiB; a hostile server may send forever


class UntrustedRuntime(PermissionError):
    """The runtime directory, or the process behind a control socket, is not ours."""


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


def check_private_dir(path: str) -> None:
    """UntrustedRuntime unless ``path`` is a directory (not a symlink) of ours, mode 0700."""
    st = os.lstat(path)
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a directory"
    elif st.st_uid != me:
        problem = f"is owned by uid {st.st_uid}"
    elif st.st_mode & 0o077:
        problem = f"is open to others (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        return
    raise UntrustedRuntime(f"{path} {problem}: it must be a private directory owned by uid {me}")


def trusted_runtime_dir() -> str | None:
    """The runtime directory, checked; None if there is none (no mount ever ran)."""
    d = runtime_dir()
    try:
        check_private_dir(d)
    except FileNotFoundError:
        return None
    return d


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_private_dir(path)


def check_peer(s: socket.socket, path: str) -> None:
    """UntrustedRuntime unless the process that listens on ``s`` runs as us or root."""
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (os.geteuid(), 0):
        raise UntrustedRuntime(f"{path} is served by uid {uid} (pid {pid}), not by us or root")


def _no_constant(name: str) -> Any:
    raise ValueError(f"malformed answer: {name}")


def _loads(data: bytes) -> Any:
    return json.loads(data, parse_constant=_no_constant)


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


def _connect(path: str, timeout: float) -> socket.socket:
    """A connection to the mount behind ``path``, once its directory and its server are
    known to be ours (UntrustedRuntime otherwise)."""
    check_private_dir(os.path.dirname(path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        check_peer(s, path)
    except BaseException:
        s.close()
        raise
    return s


def ask_evidence(path: str, timeout: float = 60.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Synchronous client: the mount's evidence header and its ledger records."""
    with _connect(path, timeout) as s:
        s.sendall(b"evidence\n")
        with s.makefile("rb") as f:
            lines = [_loads(line) for line in f if line.strip()]
    if not lines or not all(isinstance(x, dict) for x in lines):
        raise ValueError("malformed evidence answer")
    return lines[0], lines[1:]


def ask(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Synchronous client: the status document of the mount behind ``path``."""
    with _connect(path, timeout) as s:
        s.sendall(b"status\n")
        chunks = []
        total = 0
        while chunk := s.recv(65536):
            total += len(chunk)
            if total > MAX_ANSWER:
                raise ValueError(f"status answer larger than {MAX_ANSWER} bytes")
            chunks.append(chunk)
    doc = _loads(b"".join(chunks))
    if not isinstance(doc, dict):
        raise ValueError("malformed status answer")
    return doc


def sockets() -> Iterator[str]:
    """The control sockets of the runtime directory; UntrustedRuntime if it is not ours."""
    d = trusted_runtime_dir()
    if d is None:
        return
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".sock"):
            yield os.path.join(d, name)

"""Command line: ``guestfs-mount [OPTIONS] SERVER VM MOUNTPOINT``.

Secrets come from the environment, files, or a prompt on a terminal; never from the
command line (other users can read it in /proc). The daemon forks after reading them
and the parent returns only when the mount is ready, or prints the one-line reason it
is not and exits non-zero.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence

from . import __version__
from .errors import ConfigError, GuestfsError
from .fs import FsOptions
from .model import CredentialType, GuestCredentials
from .mount import MountConfig
from .vcenter.client import ClientConfig

log = logging.getLogger("guestfs_mount")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _thumbprint(text: str) -> tuple[str, str]:
    host, sep, digest = text.partition("=")
    hexdigits = digest.replace(":", "")
    if not sep or not host or not re.fullmatch(r"[0-9A-Fa-f]{64}", hexdigits):
        raise argparse.ArgumentTypeError("expected HOST[:PORT]=SHA256 (64 hex digits)")
    return host, hexdigits.upper()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestfs-mount",
        description=(
            "Mount a running VMware VM's guest filesystem read-only, through the vCenter "
            "REST API (VMware Tools guest operations). No agent in the guest, no datastore "
            "access; the VM keeps running."
        ),
        epilog=(
            "Secrets: GUESTFS_PASSWORD / --password-file for vCenter, GUESTFS_GUEST_PASSWORD "
            "/ --guest-password-file or --saml-token-file for the guest; on a terminal you "
            "are prompted for what is missing. Unmount with 'fusermount3 -u MOUNTPOINT'. "
            "'guestfs-mount status' lists active mounts. See docs/usage.md."
        ),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("server", help="vCenter: host, host:port or https://host[:port]")
    p.add_argument("vm", help="VM name or id (vm-42)")
    p.add_argument("mountpoint", help="an existing empty directory")

    a = p.add_argument_group("vCenter and guest accounts")
    a.add_argument(
        "--user",
        default=os.environ.get("GUESTFS_USER"),
        help="vCenter user (default: $GUESTFS_USER)",
    )
    a.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the vCenter password (default: $GUESTFS_PASSWORD or prompt)",
    )
    a.add_argument(
        "--guest-user",
        default=os.environ.get("GUESTFS_GUEST_USER"),
        help="guest account (default: $GUESTFS_GUEST_USER)",
    )
    a.add_argument(
        "--guest-password-file",
        metavar="FILE",
        help="file holding the guest password "
        "(default: $GUESTFS_GUEST_PASSWORD or prompt)",
    )
    a.add_argument(
        "--saml-token-file",
        metavar="FILE",
        help="authenticate in the guest with this SAML bearer token instead",
    )

    t = p.add_argument_group("TLS and trust")
    t.add_argument("--ca-file", metavar="PEM", help="CA bundle for vCenter (default: system)")
    t.add_argument(
        "--esx-ca-file",
        metavar="PEM",
        help="CA bundle for ESXi transfer hosts (default: --ca-file)",
    )
    t.add_argument(
        "--thumbprint",
        metavar="HOST=SHA256",
        action="append",
        type=_thumbprint,
        default=[],
        help="pin a host's certificate by SHA-256 (repeatable)",
    )
    t.add_argument(
        "--esx-host",
        metavar="PATTERN",
        action="append",
        default=[],
        help="trust transfer URLs on hosts matching this glob (repeatable)",
    )
    t.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates or transfer hosts (dangerous)",
    )
    t.add_argument(
        "--api",
        choices=("auto", "released", "preview"),
        default="auto",
        help="transfer API form: released (7.0U2+), preview (7.0U1), auto (default)",
    )

    v = p.add_argument_group("what the mount shows")
    v.add_argument(
        "--guest-root",
        default="/",
        metavar="PATH",
        help="guest directory shown at the mount point (default: /)",
    )
    v.add_argument("--uid", type=int, help="show every file as owned by this uid")
    v.add_argument("--gid", type=int, help="show every file as owned by this gid")
    v.add_argument(
        "--raw-symlinks",
        action="store_true",
        help="show symlink targets unchanged (default: absolute targets are "
        "rewritten to stay inside the mount)",
    )
    v.add_argument(
        "--allow-other",
        action="store_true",
        help="let other local users in (the guest's mode bits then apply)",
    )
    v.add_argument(
        "--metadata-ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long listings and attributes are reused (default: 60)",
    )
    v.add_argument(
        "--frozen",
        action="store_true",
        help="evidence view: nothing fetched once ever changes during the mount",
    )

    c = p.add_argument_group("cache and performance")
    c.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where file contents are cached (default: a private temporary directory)",
    )
    c.add_argument(
        "--cache-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="disk the content cache may use (default: 25%% of free space, at most 8G)",
    )
    c.add_argument("--keep-cache", action="store_true", help="keep cached files at unmount")
    c.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not download small files ahead of a sequential directory read",
    )
    c.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest any file operation may block (default: 60)",
    )

    o = p.add_argument_group("running")
    o.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (for systemd and debugging)",
    )
    o.add_argument("--debug", action="store_true", help="log every API call and FUSE request")
    o.add_argument("--log-file", metavar="FILE", help="log here (daemon default: syslog)")
    o.add_argument(
        "--audit-log",
        metavar="FILE",
        help="append a JSON line per file transfer (time, path, SHA-256, ...)",
    )
    return p


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    return value


def _secret(file: str | None, env: str, what: str, prompt: str) -> str:
    if file:
        return _read_secret_file(file, what)
    value = os.environ.get(env)
    if value:
        return value
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    raise ConfigError(f"no {what}: set ${env} or use the --{what.replace(' ', '-')}-file option")


def _guest_credentials(args: argparse.Namespace) -> GuestCredentials:
    if args.saml_token_file:
        token = _read_secret_file(args.saml_token_file, "SAML token")
        return GuestCredentials(
            CredentialType.SAML_BEARER_TOKEN, user_name=args.guest_user, saml_token=token
        )
    if not args.guest_user:
        raise ConfigError("no guest user: use --guest-user or $GUESTFS_GUEST_USER")
    pw = _secret(
        args.guest_password_file,
        "GUESTFS_GUEST_PASSWORD",
        "guest password",
        f"Password of guest user {args.guest_user}: ",
    )
    return GuestCredentials(
        CredentialType.USERNAME_PASSWORD, user_name=args.guest_user, password=pw
    )


def _is_stale(path: str) -> bool:
    # statvfs always reaches the filesystem; a stat may be answered from the
    # kernel's attribute cache even when the daemon behind it is dead.
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def check_mountpoint(path: str) -> str:
    """The mount point as a real path, or ConfigError saying what is wrong with it.
    A stale mount left by a killed daemon is cleaned up (lazily unmounted)."""
    if _is_stale(path):
        log.warning("%s is a stale mount (its daemon died): unmounting it", path)
        tool = shutil.which("fusermount3") or "fusermount3"
        res = subprocess.run([tool, "-u", "-z", path], capture_output=True, text=True)
        if res.returncode != 0 or _is_stale(path):
            raise ConfigError(
                f"mount point {path} is a stale mount and could not be cleaned: "
                f"run 'fusermount3 -u -z {path}' ({res.stderr.strip()})"
            )
    if not os.path.lexists(path):
        raise ConfigError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise ConfigError(f"mount point {path} is already a mount point")
    try:
        if os.listdir(path):
            raise ConfigError(f"mount point {path} is not empty")
    except PermissionError as exc:
        raise ConfigError(f"mount point {path}: {exc.strerror}") from exc
    return os.path.realpath(path)


def _default_cache_size(cache_dir: str | None) -> int:
    try:
        st = os.statvfs(cache_dir or os.environ.get("TMPDIR") or "/tmp")
        free = st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 30
    return max(256 << 20, min(8 << 30, free // 4))


def _server_url(server: str) -> tuple[str, bool]:
    if server.startswith("http://"):
        return server, True
    return server, False


def build_config(args: argparse.Namespace) -> MountConfig:
    if not args.user:
        raise ConfigError("no vCenter user: use --user or $GUESTFS_USER")
    password = _secret(
        args.password_file, "GUESTFS_PASSWORD", "password", f"vCenter password of {args.user}: "
    )
    guest = _guest_credentials(args)
    server, plain_http = _server_url(args.server)
    if args.insecure:
        log.warning("--insecure: TLS certificates and transfer hosts are NOT verified")
    client = ClientConfig(
        server=server,
        user=args.user,
        password=password,
        guest=guest,
        ca_file=args.ca_file,
        esx_ca_file=args.esx_ca_file,
        thumbprints=dict(args.thumbprint),
        insecure=args.insecure,
        allow_http=plain_http,
        esx_hosts=tuple(args.esx_host),
        api=args.api,
        call_timeout=min(30.0, args.timeout),
        retry_budget=min(20.0, args.timeout / 2),
        transfer_stall_timeout=args.timeout,
        debug=args.debug,
    )
    fs = FsOptions(
        uid=args.uid,
        gid=args.gid,
        raw_symlinks=args.raw_symlinks,
        ttl=args.metadata_ttl,
        timeout=args.timeout,
        prefetch=not args.no_prefetch,
        debug=args.debug,
    )
    guest_root = args.guest_root
    return MountConfig(
        client=client,
        vm=args.vm,
        mountpoint=check_mountpoint(args.mountpoint),
        guest_root=guest_root,
        fs=fs,
        frozen=args.frozen,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size or _default_cache_size(args.cache_dir),
        keep_cache=args.keep_cache,
        allow_other=args.allow_other,
        audit_log=os.path.abspath(args.audit_log) if args.audit_log else None,
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """Guest names are hostile: control characters in them must not forge log lines
    or terminal escapes. Shown as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def setup_logging(args: argparse.Namespace, daemon: bool) -> None:
    level = logging.DEBUG if args.debug else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
        handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif daemon:
        try:
            from logging.handlers import SysLogHandler

            handler = SysLogHandler(address="/dev/log")
            handler.setFormatter(_OneLineFormatter("guestfs-mount[%(process)d]: %(message)s"))
        except OSError:
            handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLineFormatter("guestfs-mount: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    if not args.debug:
        for noisy in ("httpx", "httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from trio nurseries."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _run(cfg: MountConfig, ready_fd: int | None) -> int:
    import trio

    from .mount import serve

    said = False

    def ready(err: str | None) -> None:
        nonlocal said
        said = True
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)

    try:
        trio.run(serve, cfg, ready)
    except Exception as exc:
        leaf = _leaf(exc)
        if not isinstance(leaf, (GuestfsError, OSError, RuntimeError)):
            log.exception("internal error")
        msg = one_line(_describe(leaf))
        if not said:
            if ready_fd is not None:
                os.write(ready_fd, ("error " + msg + "\n").encode(errors="replace"))
                os.close(ready_fd)
            else:
                print(f"guestfs-mount: error: {msg}", file=sys.stderr)
            return EXIT_ERROR
        log.error("stopped: %s", msg)
        return EXIT_ERROR
    return EXIT_OK


def _daemonize(cfg: MountConfig, args: argparse.Namespace) -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        answer = b"".join(chunks).decode(errors="replace").strip()
        if answer == "ok":
            return EXIT_OK
        if answer.startswith("error "):
            print(f"guestfs-mount: error: {one_line(answer[6:])}", file=sys.stderr)
        else:
            _, status = os.waitpid(pid, 0)
            print(
                f"guestfs-mount: error: the daemon exited before mounting "
                f"(status {status}); run with --foreground to see why",
                file=sys.stderr,
            )
        return EXIT_ERROR
    # child: new session, no terminal, stdio to /dev/null
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    setup_logging(args, daemon=True)
    code = _run(cfg, w)
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        from .status import main as status_main

        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args, daemon=False)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"guestfs-mount: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    if args.foreground:
        return _run(cfg, None)
    return _daemonize(cfg, args)


if __name__ == "__main__":
    sys.exit(main())

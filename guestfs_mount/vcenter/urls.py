"""Server address parsing, transfer-URL `*` substitution and trust policy, redaction."""

from __future__ import annotations

import fnmatch
import re
import urllib.parse
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from guestfs_mount.errors import ConfigError, UnsafeTransferUrl

__all__ = ["Server", "check_transfer_url", "parse_server", "redact", "redact_url"]

_QUERY = re.compile(r"\?[^\s\"'<>]*")
_TOKENISH = re.compile(r"(?i)(token|session[-_]?id|password)=[^&\s\"'<>]*")


def redact_url(url: str) -> str:
    """Drop the query string (transfer URLs carry ``token=``) and any userinfo."""
    try:
        p = urllib.parse.urlsplit(url)
        netloc = p.netloc.rpartition("@")[2]
        q = "?<redacted>" if p.query else ""
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", "")) + q
    except ValueError:
        return _QUERY.sub("?<redacted>", url)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove query strings of URLs, ``token=...``-like pairs and the given secret values."""
    text = re.sub(r"(https?://[^\s\"'<>?]*)\?[^\s\"'<>]*", r"\1?<redacted>", text)
    text = _TOKENISH.sub(r"\1=<redacted>", text)
    for s in secrets:
        if s and len(s) >= 3:
            text = text.replace(s, "<redacted>")
    return text


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Server:
    scheme: str
    host: str  # lower-case, no brackets
    port: int

    @property
    def netloc(self) -> str:
        return f"{_fmt_host(self.host)}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_server(server: str, *, allow_http: bool) -> Server:
    s = server.strip()
    if not s:
        raise ConfigError("vCenter server address is empty")
    if "://" not in s:
        s = "https://" + s
    try:
        p = urllib.parse.urlsplit(s)
        port = p.port
    except ValueError as e:
        raise ConfigError(f"invalid vCenter server address {server!r}: {e}") from e
    scheme = p.scheme.lower()
    if scheme not in ("https", "http"):
        raise ConfigError(f"vCenter server address {server!r}: scheme must be https")
    if scheme == "http" and not allow_http:
        raise ConfigError(
            f"vCenter server address {server!r} uses plain http; give the server as"
            " http://HOST[:PORT] to allow it (test servers only)"
        )
    if p.username or p.password or (p.path not in ("", "/")) or p.query or p.fragment:
        raise ConfigError(f"vCenter server address {redact_url(server)!r}: give only host[:port]")
    host = (p.hostname or "").lower()
    if not host:
        raise ConfigError(f"vCenter server address {server!r} has no host")
    return Server(scheme, host, port or (443 if scheme == "https" else 80))


def check_transfer_url(
    url: str,
    vcenter: Server,
    *,
    insecure: bool,
    allow_http: bool,
    esx_hosts: Collection[str],
    pinned_hosts: Collection[tuple[str, int | None]],
) -> str:
    """Substitute a ``*`` host and apply the trust policy. Returns the URL to GET."""
    shown = redact_url(url)
    try:
        p = urllib.parse.urlsplit(url)
        netloc = p.netloc
        _userinfo, at, hostport = netloc.rpartition("@")
        if hostport.startswith("["):
            host, _, rest = hostport[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_s = hostport.partition(":")
        if port_s and (not port_s.isdigit() or not 0 < int(port_s) < 65536):
            raise ValueError("bad port")
    except ValueError as e:
        raise UnsafeTransferUrl(f"transfer URL {shown} cannot be parsed") from e
    scheme = p.scheme.lower()
    if at:
        raise UnsafeTransferUrl(f"transfer URL {shown} contains user information; refused")
    if scheme not in ("https", "http"):
        raise UnsafeTransferUrl(f"transfer URL {shown}: scheme {scheme!r} refused")
    if host == "*":
        host = vcenter.host
        port = int(port_s) if port_s else vcenter.port
    else:
        host = host.lower()
        if not host:
            raise UnsafeTransferUrl(f"transfer URL {shown} has no host")
        port = int(port_s) if port_s else (443 if scheme == "https" else 80)
    final = urllib.parse.urlunsplit(
        (scheme, f"{_fmt_host(host)}:{port}", p.path or "/", p.query, "")
    )
    if insecure:
        return final
    if scheme == "http" and not allow_http:
        raise UnsafeTransferUrl(
            f"transfer URL {redact_url(final)} uses plain http, allowed only when the"
            " server is given as http://HOST"
        )
    default = 443 if scheme == "https" else 80
    patterns = [split_host_port(pat, "--esx-host") for pat in esx_hosts]
    named_ports = {p for pat, p in patterns if p is not None and fnmatch.fnmatchcase(host, pat)}
    host_trusted = (
        host == vcenter.host
        or any(fnmatch.fnmatchcase(host, pat) for pat, _ in patterns)
        or (host, port) in pinned_hosts
        or (host, None) in pinned_hosts
    )
    if not host_trusted:
        raise UnsafeTransferUrl(
            f"transfer URL points to untrusted host {host}:{port}"
            f" (not the vCenter host); trust it with --esx-host {host}"
            f" or pin it with --thumbprint {host}:{port}=SHA256"
        )
    # A trusted host is trusted at its HTTPS port, not at any port it listens on: a
    # hostile vCenter could else aim our GETs at any local service of its host.
    own = {vcenter.port} if host == vcenter.host else set()
    port_trusted = (
        port == default or port in own or port in named_ports or (host, port) in pinned_hosts
    )
    if not port_trusted:
        raise UnsafeTransferUrl(
            f"transfer URL points to {host}:{port}, not a transfer port of that host;"
            f" trust the port with --esx-host {_fmt_host(host)}:{port}"
        )
    return final


def split_host_port(text: str, what: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` (or a glob in place of the host) ->
    (lower-case host, port or None). The one parser of host[:port] options."""
    k = text.strip().lower()
    if k.startswith("["):
        host, _, rest = k[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif k.count(":") == 1:
        host, port = k.split(":")
    else:
        host, port = k, ""
    if not host:
        raise ConfigError(f"{what} {text!r} has no host")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{what} {text!r} has an invalid port")
        return host, int(port)
    return host, None

"""SSL contexts: CA verification, SHA-256 pinning (pin-only for pinned hosts), insecure mode,
and turning an exception chain into a readable TLS failure reason."""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Mapping

from guestfs_mount.errors import ConfigError, iter_chain

from .urls import split_host_port

__all__ = [
    "PinMismatch",
    "ca_context",
    "find_ssl_error",
    "insecure_context",
    "normalize_thumbprint",
    "pinned_context",
    "split_pin_key",
    "ssl_reason",
]


class PinMismatch(ssl.SSLCertVerificationError):
    """The peer certificate's SHA-256 is not the pinned one."""


def normalize_thumbprint(value: str) -> str:
    """``AB:CD:...`` or ``abcd...`` (64 hex digits) -> lower-case hex without colons."""
    h = value.strip().replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", h):
        raise ConfigError(
            f"thumbprint {value[:100]!r} is not a SHA-256 fingerprint"
            " (64 hex digits, colons optional)"
        )
    return h


def split_pin_key(key: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` -> (lower-case host, port or None)."""
    return split_host_port(key, "thumbprint host")


def ca_context(cafile: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load CA file {cafile}: {e}") from e


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_context(sha256_hex: str) -> ssl.SSLContext:
    """Pin-only context: the chain is not verified, the leaf must hash to ``sha256_hex``.

    Works under trio because trio's SSLStream uses ``SSLContext.wrap_bio``, which builds
    ``ctx.sslobject_class``; the check runs before any HTTP byte is sent.
    """
    expected = normalize_thumbprint(sha256_hex)

    class _Pinned(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            _check_pin(self.getpeercert(binary_form=True), expected)

    class _PinnedSocket(ssl.SSLSocket):
        # The blocking-socket twin, for the transfer GET read in a thread (transfer.py).
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            _check_pin(self.getpeercert(binary_form=True), expected)

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.sslobject_class = _Pinned
    ctx.sslsocket_class = _PinnedSocket
    return ctx


def _check_pin(der: bytes | None, expected: str) -> None:
    got = hashlib.sha256(der or b"").hexdigest()
    if got != expected:
        err = PinMismatch(
            f"certificate SHA-256 {_colons(got)} does not match the pinned thumbprint"
        )
        err.verify_message = str(err)
        raise err


def _colons(h: str) -> str:
    return ":".join(h[i : i + 2] for i in range(0, len(h), 2)).upper()


def find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The first ``ssl.SSLError`` in the __cause__/__context__ chain (also through
    exception groups), or None."""
    return next((e for e in iter_chain(exc) if isinstance(e, ssl.SSLError)), None)


def ssl_reason(err: ssl.SSLError) -> str:
    """Short human text for an SSL failure, e.g. ``certificate verify failed: unable to get
    local issuer certificate``."""
    if isinstance(err, PinMismatch):
        return str(err.args[0]) if err.args else "certificate does not match the pin"
    if isinstance(err, ssl.SSLCertVerificationError):
        vm = getattr(err, "verify_message", None)
        if vm:
            return f"certificate verify failed: {vm}"
    reason = getattr(err, "reason", None)
    text = str(err.args[1]) if len(err.args) > 1 else str(err)
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)
    text = re.sub(r"^\[SSL: [A-Z_]+\]\s*", "", text)
    return text or (str(reason) if reason else type(err).__name__)


def pins_by_key(thumbprints: Mapping[str, str]) -> dict[tuple[str, int | None], str]:
    return {split_pin_key(k): normalize_thumbprint(v) for k, v in thumbprints.items()}

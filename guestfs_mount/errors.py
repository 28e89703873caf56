"""The one exception tree of guestfs-mount, and its translation to errno values.

::

    GuestfsError
    ├── ConfigError                 bad command line / config / set-up (exit status 2)
    ├── CacheError                  local cache directory trouble (ENOSPC, EIO)
    │   └── DownloadCancelled       nobody wants it any more, or shutdown (cache/content.py)
    ├── VmUnavailable               one VM of --all-vms cannot be read (fleet/vm.py) -> its errno
    └── RemoteError                 anything that went wrong talking to vCenter or ESXi
        ├── ApiError                a vAPI error body; subclass chosen by its ``error_type``
        │   ├── NotFound                    NOT_FOUND                      -> ENOENT
        │   ├── InvalidArgument             INVALID_ARGUMENT               -> EINVAL / EISDIR
        │   ├── NotAllowedInCurrentState    NOT_ALLOWED_IN_CURRENT_STATE   -> EIO (VM off)
        │   ├── Unsupported                 UNSUPPORTED                    -> EOPNOTSUPP
        │   ├── Unauthenticated             UNAUTHENTICATED                -> EACCES
        │   │   └── GuestAuthFailed         401 right after a fresh login  -> EACCES
        │   ├── Unauthorized                UNAUTHORIZED                   -> EACCES
        │   ├── ResourceBusy                RESOURCE_BUSY (retryable)      -> EAGAIN
        │   └── ServiceUnavailable          SERVICE_UNAVAILABLE (retryable)-> EIO
        ├── TransportError          connection refused/reset, DNS, ...     -> EIO
        │   ├── RemoteTimeout       a deadline passed                      -> ETIMEDOUT
        │   ├── TlsError            certificate / pin rejected             -> EIO
        │   └── CircuitOpen         failing fast while the server is down  -> EIO
        ├── ProtocolError           malformed or unexpected response       -> EIO
        │   └── NoSuchOperation     the server lacks the endpoint (vcenter/session.py)
        ├── TransferError           download cut, short, long or refused   -> EIO
        └── UnsafeTransferUrl       URL refused (http, foreign host, ...)  -> EACCES

Messages never contain secrets: they are built from error types, paths and the
server's ``default_message`` only. Every translation keeps the cause (``raise ... from``).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


class GuestfsError(Exception):
    """Base of every error guestfs-mount raises on purpose."""

    errno: int = errno.EIO


class ConfigError(GuestfsError):
    """The user's input or set-up is wrong (even when found only once connected, such as a
    guest root that does not exist); reported with exit status 2."""


class CacheError(GuestfsError):
    """The local cache could not store or serve a file."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class ListingStopped(GuestfsError):
    """A listing was stopped between pages because its caller said so (``more``): a
    listing fetched ahead that nobody waits for. Nothing failed, nothing is partial."""


class RemoteError(GuestfsError):
    """Talking to vCenter or the ESXi host failed."""

    retryable: bool = False


class ApiError(RemoteError):
    """A vAPI error response (``{"error_type": ..., "messages": [...], "data": ...}``)."""

    error_type: ClassVar[str] = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        messages: Sequence[str] = (),
        data: Mapping[str, Any] | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type_name = error_type or self.error_type
        self.messages = tuple(messages)
        self.data = dict(data) if data else {}
        self.path = path

    @property
    def reason(self) -> str | None:
        """``FileErrorDetails.reason`` (e.g. ``NOT_A_FILE``) when the server sent one."""
        r = self.data.get("reason")
        return r if isinstance(r, str) else None


class NotFound(ApiError):
    error_type = "NOT_FOUND"
    errno = errno.ENOENT


class InvalidArgument(ApiError):
    error_type = "INVALID_ARGUMENT"
    errno = errno.EINVAL


class NotAllowedInCurrentState(ApiError):
    error_type = "NOT_ALLOWED_IN_CURRENT_STATE"
    errno = errno.EIO


class Unsupported(ApiError):
    error_type = "UNSUPPORTED"
    errno = errno.EOPNOTSUPP


class Unauthenticated(ApiError):
    error_type = "UNAUTHENTICATED"
    errno = errno.EACCES


class GuestAuthFailed(Unauthenticated):
    """UNAUTHENTICATED on a guest call made with a session that was fresh: the guest
    credentials, not the vCenter session, were refused."""


class Unauthorized(ApiError):
    error_type = "UNAUTHORIZED"
    errno = errno.EACCES


class ResourceBusy(ApiError):
    error_type = "RESOURCE_BUSY"
    errno = errno.EAGAIN
    retryable = True


class ServiceUnavailable(ApiError):
    error_type = "SERVICE_UNAVAILABLE"
    errno = errno.EIO
    retryable = True


API_ERRORS: dict[str, type[ApiError]] = {
    cls.error_type: cls
    for cls in (
        NotFound,
        InvalidArgument,
        NotAllowedInCurrentState,
        Unsupported,
        Unauthenticated,
        Unauthorized,
        ResourceBusy,
        ServiceUnavailable,
    )
}


def api_error_class(error_type: str) -> type[ApiError]:
    """The exception class for a vAPI ``error_type`` (case-insensitive); ApiError if unknown."""
    return API_ERRORS.get(error_type.upper(), ApiError)


class TransportError(RemoteError):
    """The request did not complete: connection refused or reset, DNS, protocol breakage."""

    retryable = True


class RemoteTimeout(TransportError):
    errno = errno.ETIMEDOUT


class TlsError(TransportError):
    """The peer's certificate was refused. Not retried: it will not change by itself."""

    retryable = False


class CircuitOpen(TransportError):
    """Recent calls all failed at the transport level; fail fast until a probe succeeds."""

    retryable = False


class ProtocolError(RemoteError):
    """The server answered something this client cannot accept (bad JSON, wrong types)."""


class TransferError(RemoteError):
    """A file download did not deliver exactly the expected bytes."""


class UnsafeTransferUrl(RemoteError):
    """A transfer URL was refused by policy (plain http, untrusted host, redirect)."""

    errno = errno.EACCES


def iter_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything behind it: ``__cause__``, ``__context__`` and the members of
    exception groups (trio nurseries), each once. Under trio the outer httpx errors have
    empty messages; the reason is somewhere in here."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        subs = getattr(e, "exceptions", None)
        if isinstance(subs, (list, tuple)):
            stack.extend(x for x in subs if isinstance(x, BaseException))
        for nxt in (e.__context__, e.__cause__):
            if nxt is not None:
                stack.append(nxt)


def first_error(exc: BaseException) -> BaseException:
    """The first real error in ``exc``'s chain, past the exception groups trio nurseries
    wrap it in (``exc`` itself when there is none, e.g. only ``Cancelled``)."""
    return next(
        (e for e in iter_chain(exc) if isinstance(e, Exception)
         and not isinstance(e, BaseExceptionGroup)),
        exc,
    )  # fmt: skip


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE request should fail with for ``exc``.

    Directories asked for content come back from vCenter as INVALID_ARGUMENT with
    reason NOT_A_FILE; users expect EISDIR for that.
    """
    if isinstance(exc, InvalidArgument) and exc.reason == "NOT_A_FILE":
        return errno.EISDIR
    if isinstance(exc, GuestfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO

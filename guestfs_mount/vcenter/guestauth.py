"""Which guest account a guest operation uses: the mount's, or one VM's.

A single-VM mount has one guest account (``ClientConfig.guest``). A fleet mount
(``--all-vms``) gives each VM its own, chosen by the credential rules; the client sets
it for the duration of that VM's calls (:data:`current`), so the transports, which
build the request bodies, need not be told which VM they serve.
"""

from __future__ import annotations

import contextvars

from guestfs_mount.model import GuestCredentials

from .session import ClientConfig

__all__ = ["current", "guest_credentials"]

current: contextvars.ContextVar[GuestCredentials | None] = contextvars.ContextVar(
    "guestfs_guest_credentials", default=None
)


def guest_credentials(config: ClientConfig) -> GuestCredentials:
    """The account of the VM being served, else the mount's."""
    return current.get() or config.guest

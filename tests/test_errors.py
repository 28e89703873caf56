"""The exception tree errors.py draws is the one the package defines."""

from __future__ import annotations

import errno
import importlib
import pkgutil

import guestfs_mount
from guestfs_mount import errors


def _subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    out: set[type[BaseException]] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def test_every_error_class_is_drawn() -> None:
    for mod in pkgutil.walk_packages(guestfs_mount.__path__, "guestfs_mount."):
        if not mod.name.startswith("guestfs_mount.sim"):  # the simulator raises none
            importlib.import_module(mod.name)
    drawing = errors.__doc__ or ""
    public = {c.__name__ for c in _subclasses(errors.GuestfsError) if not c.__name__.startswith("_")}
    missing = sorted(name for name in public if f"── {name} " not in drawing)
    assert missing == []


def test_errno_of_the_tree() -> None:
    nf = errors.NotFound("x")
    assert errors.to_errno(nf) == errno.ENOENT
    assert errors.to_errno(errors.InvalidArgument("x", data={"reason": "NOT_A_FILE"})) == errno.EISDIR
    assert errors.to_errno(errors.CacheError("full", errno.ENOSPC)) == errno.ENOSPC
    assert errors.to_errno(ValueError("a bug")) == errno.EIO

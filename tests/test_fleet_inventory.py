"""The fleet inventory over REST: folders, the 4000-VM limit, the guest family."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest

from guestfs_mount.errors import ApiError, NotFound
from guestfs_mount.vcenter.inventory import family_of, folder_subtree, list_vms
from guestfs_mount.vcenter.session import NoSuchOperation

# folder id -> (name, parent id)
FOLDERS = {"group-v3": ("vm", None), "f-prod": ("prod", "group-v3"),
           "f-web": ("web", "f-prod"), "f-dev": ("dev", "group-v3")}  # fmt: skip
VMS = [(f"vm-{i}", f"web-{i}", "f-web") for i in range(6)] + [("vm-90", "db", "f-prod"),
       ("vm-91", "build", "f-dev"), ("vm-92", "loose", "group-v3")]  # fmt: skip


class FakeRest:
    """The REST transport's ``api`` over a small inventory; more than ``limit`` VMs in
    one answer is refused as vCenter does."""

    def __init__(self, limit=1000, identity=None, guest_os=None):
        self.limit = limit
        self.identity = identity
        self.guest_os = guest_os
        self.calls = []

    async def api(self, name, method, path, *, desc, retry=True, **kw):
        url = urllib.parse.urlsplit(path)
        q = urllib.parse.parse_qs(url.query)
        self.calls.append((name, q))
        if name == "folder.list":
            return [
                {"folder": f, "name": n, "type": "VIRTUAL_MACHINE"}
                for f, (n, parent) in FOLDERS.items()
                if ("names" not in q or n in q["names"])
                and ("parent_folders" not in q or parent in q["parent_folders"])
            ]
        if name == "vm.list":
            found = [
                {"vm": vm, "name": n, "power_state": "POWERED_ON"}
                for vm, n, f in VMS
                if "folders" not in q or f in q["folders"]
            ]
            if len(found) > self.limit:
                raise ApiError("too many", error_type="UNABLE_TO_ALLOCATE_RESOURCE", status=500)
            return found
        if name == "vm.identity":
            if self.identity is None:
                raise NoSuchOperation("no identity")
            return {"family": self.identity}
        if name == "vm.get":
            if self.guest_os is None:
                raise NoSuchOperation("no vm get")
            return {"guest_OS": self.guest_os}
        raise AssertionError(name)


def fake(**kw: Any) -> Any:
    """A FakeRest standing in for a RestTransport."""
    return FakeRest(**kw)


async def test_folder_path_is_resolved_with_its_subtree():
    rest = fake()
    assert sorted(await folder_subtree(rest, "prod")) == ["f-prod", "f-web"]
    assert await folder_subtree(rest, "/prod/web/") == ["f-web"]
    with pytest.raises(NotFound):
        await folder_subtree(rest, "prod/nothing")
    vms = await list_vms(rest, folders=await folder_subtree(rest, "prod"))
    assert sorted(v.name for v in vms) == ["db"] + [f"web-{i}" for i in range(6)]


async def test_listing_too_big_for_one_answer_is_split_by_folder():
    rest = fake(limit=6)  # the whole inventory (9) does not fit, each folder does
    vms = await list_vms(rest)
    assert sorted(v.vm for v in vms) == sorted(vm for vm, _, _ in VMS)
    assert len(vms) == len(VMS)


async def test_a_single_folder_too_big_is_an_error():
    rest = fake(limit=2)
    with pytest.raises(ApiError):
        await list_vms(rest, folders=["f-web"])


async def test_power_filter_is_asked_of_vcenter():
    rest = fake()
    await list_vms(rest, powered_on=True)
    assert rest.calls[-1][1]["power_states"] == ["POWERED_ON"]


@pytest.mark.parametrize(
    ("identity", "guest_os", "family"),
    [("LINUX", None, "linux"), ("WINDOWS", "UBUNTU_64", "windows"),
     (None, "WINDOWS_9_SERVER_64", "windows"), (None, "RHEL_8_64", "linux"), (None, None, None)],
)  # fmt: skip
async def test_guest_family_from_identity_else_configured_os(identity, guest_os, family):
    assert await family_of(fake(identity=identity, guest_os=guest_os), "vm-1") == family

"""VCenterClient against the real simulator process (guestfs_mount.sim)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestfs_mount.errors import GuestAuthFailed, NotFound, TlsError
from guestfs_mount.model import CredentialType, FileType, GuestCredentials
from guestfs_mount.vcenter import ClientConfig, VCenterClient
from tests.memory_writer import MemoryWriter

testing = pytest.importorskip("guestfs_mount.sim.testing")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root: Path = tmp_path_factory.mktemp("guest")
    (root / "dir").mkdir()
    (root / "dir" / "small.txt").write_bytes(b"hello\n")
    (root / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    os.symlink("dir/small.txt", root / "link")
    (root / os.fsdecode(b"n\xffme")).write_bytes(b"x")
    with testing.run_simulator("--root", str(root)) as s:
        s.root_dir = root
        yield s


def cfg(sim: Any, **kw: Any) -> ClientConfig:
    base: dict[str, Any] = dict(
        server=sim.vcenter_url,
        user=sim.user,
        password=sim.password,
        guest=GuestCredentials(
            CredentialType.USERNAME_PASSWORD, sim.guest_user, sim.guest_password
        ),
        ca_file=sim.ca_file,
        esx_ca_file=sim.esx_ca_file,
        retry_budget=2.0,
        esx_hosts=(f"127.0.0.1:{sim.esx_port}",),
        # The REST transport's own test (the preview fallback, non-UTF-8 names): auto
        # would pick vi-json here; the vim25 transports have tests of their own.
        api="rest",
    )
    base.update(kw)
    return ClientConfig(**base)


async def test_list_stat_download(sim: Any) -> None:
    async with VCenterClient(cfg(sim, list_page_size=2)) as c:
        vm = await c.find_vm(sim.vm_id())
        await c.check_guest_ready(vm.vm)
        names = {e.name: e for e in await c.list_dir(vm.vm, "/")}
        assert {"dir", "data.bin", "link", "n\udcffme"} <= set(names)
        assert names["dir"].type is FileType.DIRECTORY
        st = await c.stat(vm.vm, "/n\udcffme")
        assert st.size == 1
        st = await c.stat(vm.vm, "/data.bin")
        w = MemoryWriter()
        res = await c.download(vm.vm, "/data.bin", st.size, w)
        data = (sim.root_dir / "data.bin").read_bytes()
        assert w.data == data
        assert res.sha256 == hashlib.sha256(data).hexdigest()
        with pytest.raises(NotFound):
            await c.stat(vm.vm, "/nope")


async def test_relogin_after_expiry(sim: Any) -> None:
    async with VCenterClient(cfg(sim)) as c:
        await c.find_vm(sim.vm_id())
        sim.expire_sessions()
        await c.list_dir(sim.vm_id(), "/dir")
        assert c.stats.relogins == 1


async def test_wrong_guest_password(sim: Any) -> None:
    bad = GuestCredentials(CredentialType.USERNAME_PASSWORD, sim.guest_user, "wrong-pw")
    async with VCenterClient(cfg(sim, guest=bad)) as c:
        await c.find_vm(sim.vm_id())
        with pytest.raises(GuestAuthFailed) as ei:
            await c.stat(sim.vm_id(), "/dir")
        assert "wrong-pw" not in str(ei.value) and sim.password not in str(ei.value)


async def test_untrusted_ca(sim: Any) -> None:
    async with VCenterClient(cfg(sim, ca_file=None, retry_budget=0)) as c:
        with pytest.raises(TlsError, match="not trusted"):
            await c.login()


async def test_separate_esx_ca(sim: Any) -> None:
    with testing.run_simulator("--root", str(sim.root_dir), "--separate-esx-ca") as s2:
        assert s2.esx_ca_file and s2.esx_ca_file != s2.ca_file
        async with VCenterClient(cfg(s2)) as c:
            w = MemoryWriter()
            await c.download(s2.vm_id(), "/dir/small.txt", 6, w)
            assert w.data == b"hello\n"
        async with VCenterClient(cfg(s2, esx_ca_file=None, retry_budget=0)) as c:
            with pytest.raises(TlsError, match="not trusted"):
                await c.download(s2.vm_id(), "/dir/small.txt", 6, MemoryWriter())


async def test_preview_fallback(sim: Any) -> None:
    with testing.run_simulator(
        "--root", str(sim.root_dir), "--no-released-api", "--no-soap", "--no-vi-json"
    ) as s2:
        async with VCenterClient(cfg(s2, api="auto")) as c:
            w = MemoryWriter()
            await c.download(s2.vm_id(), "/dir/small.txt", 6, w)
            assert w.data == b"hello\n"
            assert c.transfer_api == "preview"

"""Through the kernel: a file that changes after its stat (issue 10 item 1) and a file
too large for the cache (issue 10 item 9)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import mounted

pytestmark = pytest.mark.fuse


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "guest"
    (root / "log").mkdir(parents=True)
    (root / "log" / "app.log").write_bytes(b"boot\n\n")  # 6 bytes
    (root / "log" / "other.log").write_bytes(b"x")
    return str(root)


@pytest.mark.parametrize("api", ["rest", "vi-json"])
@pytest.mark.parametrize("frozen", [True, False])
def test_file_appended_after_stat_reads_as_it_is_now(source, tmp_path, api, frozen):
    audit = tmp_path / "audit.jsonl"
    extra = ["--api", api, "--audit-log", str(audit)] + (["--frozen"] if frozen else [])
    now = b"boot\n\nstarted ok\n"
    with run_simulator("--root", source) as sim, mounted(sim, str(tmp_path / "m"), *extra) as m:
        p = m.path("log", "app.log")
        assert {e.name: e.stat().st_size for e in os.scandir(m.path("log"))}["app.log"] == 6
        assert os.stat(p).st_size == 6  # `ls -l`: the kernel and the mount saw 6 bytes
        with open(os.path.join(source, "log", "app.log"), "ab") as f:
            f.write(b"started ok\n")
        with open(p, "rb") as f:  # `cat`
            assert f.read() == now
        assert os.stat(p).st_size == len(now)  # the stat the kernel shows was updated
        with open(p, "rb") as f:  # and stays readable (frozen: this version for good)
            assert f.read() == now
        assert os.getxattr(p, "user.guestfs.sha256")
    recs = [json.loads(line) for line in audit.read_text().splitlines()]
    rec = next(r for r in recs if r.get("path") == "/log/app.log")
    assert rec["result"] == "ok" and rec["size"] == rec["bytes"] == len(now)
    assert rec["stat_seen"]["size"] == 6 and rec["stat_fetched"]["size"] == len(now)


def test_file_larger_than_cache_is_refused_before_any_transfer(source, tmp_path):
    sparse = os.path.join(source, "log", "huge.img")
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, costs nothing on disk
    mnt = str(tmp_path / "m")
    with run_simulator("--root", source) as sim, mounted(sim, mnt, "--cache-size", "100M") as m:
        with pytest.raises(OSError) as ei, open(m.path("log", "huge.img"), "rb") as f:
            f.read(16)  # `head -c 16`
        assert ei.value.errno == errno.EFBIG, ei.value
        with open(m.path("log", "other.log"), "rb") as f:  # the mount goes on
            assert f.read() == b"x"
        assert "/log/huge.img" not in sim.stats()["transfers"]["by_path"]

"""The everyday tools users point at a mounted guest: tar, rsync, git, sqlite, find."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess

import pytest

from guestfs_mount.sim.testing import run_simulator
from guestfs_mount.testing import ViaApi, mounted
from tests import trees

pytestmark = pytest.mark.fuse


def _run(*cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("guest"))
    trees.build(root)
    repo = os.path.join(root, "srv", "app")
    os.makedirs(repo)
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b",
           "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@b"}
    subprocess.run(["git", "init", "-q", repo], check=True)
    for i in range(3):
        with open(os.path.join(repo, "f.txt"), "a") as f:
            f.write(f"change {i}\n")
        subprocess.run(["git", "-C", repo, "add", "f.txt"], check=True, env=env)
        subprocess.run(["git", "-C", repo, "commit", "-q", "-m", f"commit {i}"], check=True, env=env)
    db = sqlite3.connect(os.path.join(root, "srv", "app.db"))
    db.execute("create table t (k integer primary key, v text)")
    db.executemany("insert into t values (?, ?)", [(i, "x" * 200 + str(i)) for i in range(20000)])
    db.commit()
    db.close()
    return root


@pytest.fixture(scope="module")
def sim(source):
    with run_simulator("--root", source) as s:
        yield s


@pytest.fixture(scope="module")
def mnt(sim, api, tmp_path_factory):
    mp = str(tmp_path_factory.mktemp("mnt"))
    with mounted(ViaApi(sim, api), mp) as m:
            yield m


def test_git_log_reads_the_guest_repository(mnt):
    repo = mnt.path("srv", "app")
    out = _run("git", "-c", f"safe.directory={repo}", "-C", repo, "log", "--format=%s")
    assert out.split("\n")[:3] == ["commit 2", "commit 1", "commit 0"]


def test_sqlite_random_reads(mnt):
    uri = "file:" + mnt.path("srv", "app.db") + "?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True)
    try:
        assert db.execute("select count(*) from t").fetchone() == (20000,)
        assert db.execute("select v from t where k = 12345").fetchone() == ("x" * 200 + "12345",)
    finally:
        db.close()


def test_tar_and_cp_r_equal_source(source, mnt, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(mnt.path("data"), out)
    res = subprocess.run(["diff", "-r", os.path.join(source, "data"), str(out)], capture_output=True)
    assert res.returncode == 0, res.stdout[:500]
    names = _run("sh", "-c", f"tar -C '{mnt.mnt}' -cf - data | tar -tf -").split()
    assert "data/nested/deeper/b.txt" in names


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (scripts/setup installs it)")
def test_rsync_archive(source, mnt, tmp_path):
    dst = tmp_path / "rs"
    subprocess.run(["rsync", "-a", mnt.path("data") + "/", str(dst)], check=True)
    res = subprocess.run(["diff", "-r", os.path.join(source, "data"), str(dst)], capture_output=True)
    assert res.returncode == 0
    src_mode = os.stat(os.path.join(source, "data/nested/a.txt"))
    got = os.stat(dst / "nested" / "a.txt")
    assert (got.st_mode, got.st_mtime_ns // 10**9) == (src_mode.st_mode, src_mode.st_mtime_ns // 10**9)


def test_sha256sum_manifest(source, mnt):
    out = _run("sh", "-c", f"cd '{mnt.mnt}' && find data etc -type f -print0 | sort -z | xargs -0 sha256sum")
    want = _run("sh", "-c", f"cd '{source}' && find data etc -type f -print0 | sort -z | xargs -0 sha256sum")
    assert out == want and out.count("\n") >= 8


def test_plain_ls_makes_no_per_file_call(tmp_path):
    """Over REST (listings without attributes): vim25's costs are in test_e2e_transports."""
    root = tmp_path / "g"
    (root / "d").mkdir(parents=True)
    for i in range(300):
        (root / "d" / f"f{i}").write_bytes(b"x")
    with run_simulator("--root", str(root)) as sim, mounted(sim, str(tmp_path / "m"), "--api", "rest") as m:
        os.stat(m.path("d"))
        sim.reset_stats()
        names = _run("ls", "--color=never", m.path("d")).split()
        calls = sim.stats()["calls"]
        assert len(names) == 300
        assert calls["files.get"] == 0 and calls["files.list"] >= 1
        _run("ls", "-l", m.path("d"))  # stats do happen once asked for
        assert sim.stats()["calls"]["files.get"] == 300

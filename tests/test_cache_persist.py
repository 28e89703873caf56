"""The persistent index of a kept cache directory (unit tests; not yet wired to mounts)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from guestfs_mount.cache import fileio
from guestfs_mount.cache.persist import PersistentIndex, Record
from guestfs_mount.errors import CacheError

DATA = b"guest bytes\n" * 100


def _setup(tmp_path: Path) -> tuple[int, PersistentIndex, Record]:
    d = tmp_path / "cache"
    dir_fd, _ = fileio.prepare_directory(str(d))
    (d / "c1").write_bytes(DATA)
    idx = PersistentIndex(dir_fd)
    rec = Record("vc", "uuid-1", "/etc/motd", len(DATA), 5, hashlib.sha256(DATA).hexdigest(),
                 "c1", time.time(), time.time())  # fmt: skip
    idx.record(rec)
    return dir_fd, idx, rec


def test_record_survives_reopen_and_verifies(tmp_path: Path) -> None:
    dir_fd, idx, rec = _setup(tmp_path)
    idx.close()
    idx = PersistentIndex(dir_fd)
    got = idx.lookup("vc", "uuid-1", "/etc/motd", len(DATA), 5)
    assert got == rec and idx.verify(got)
    assert idx.lookup("vc", "uuid-2", "/etc/motd", len(DATA), 5) is None  # another VM
    assert idx.lookup("vc", "uuid-1", "/etc/motd", len(DATA), 6) is None  # changed mtime
    idx.close()


def test_corrupt_file_is_dropped_not_served(tmp_path: Path) -> None:
    _, idx, rec = _setup(tmp_path)
    (tmp_path / "cache" / "c1").write_bytes(b"X" + DATA[1:])
    assert not idx.verify(rec)
    assert idx.lookup("vc", "uuid-1", "/etc/motd", len(DATA), 5) is None
    assert not (tmp_path / "cache" / "c1").exists()
    idx.close()


def test_second_index_on_same_dir_is_refused(tmp_path: Path) -> None:
    _, idx, _ = _setup(tmp_path)
    fd2 = os.open(tmp_path / "cache", os.O_RDONLY)
    with pytest.raises(CacheError, match="in use by another mount"):
        PersistentIndex(fd2)
    os.close(fd2)
    idx.close()


def test_sigkill_while_recording_leaves_only_whole_records(tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys

    d = tmp_path / "cache"
    fileio.prepare_directory(str(d))
    script = (
        "import os, sys, time\n"
        "from guestfs_mount.cache.persist import PersistentIndex, Record\n"
        "idx = PersistentIndex(os.open(sys.argv[1], os.O_RDONLY))\n"
        "print('ready', flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    idx.record(Record('vc', 'u', f'/f{i % 50}', i, 0, 'a' * 64, 'c', 0.0, 0.0))\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(d)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    while len(list((d / "index").glob("*.json"))) < 20:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = list((d / "index").glob("*.json"))
    assert records
    for p in records:
        assert Record(**json.loads(p.read_bytes())).instance_uuid == "u"
    # The lock died with the process: a new mount may use the directory.
    PersistentIndex(os.open(d, os.O_RDONLY)).close()

"""The ``--demo`` guest tree: a small but awkward filesystem for trying things out."""

from __future__ import annotations

import os
import random


def _file(root: str, rel: str, data: bytes | str, mtime: float | None = None) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def _link(root: str, rel: str, target: str | bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(target, path)


def build_demo_tree(root: str, big_mib: int = 4) -> None:
    """Fill ``root`` (an existing empty directory) with the demo guest tree."""
    _file(root, "etc/hostname", "demo-vm\n")
    _file(root, "etc/hosts", "127.0.0.1 localhost\n::1 localhost\n10.0.0.42 demo-vm\n")
    _file(
        root,
        "etc/os-release",
        'NAME="Simulated Linux"\nID=simlinux\nVERSION_ID="1.0"\n',
    )
    os.chmod(os.path.join(root, "etc/hostname"), 0o644)
    _file(root, "etc/ssl/private/key.pem", "not a real key\n")
    os.chmod(os.path.join(root, "etc/ssl/private/key.pem"), 0o600)
    _file(root, "usr/bin/demo-tool", "#!/bin/sh\necho demo\n")
    os.chmod(os.path.join(root, "usr/bin/demo-tool"), 0o4755)
    _file(root, "home/user/README.txt", "Welcome to the guestfs-sim demo guest.\n")
    _file(root, "home/user/docs/notes.md", "# Notes\n\n" + "lorem ipsum dolor sit amet\n" * 40)
    _file(root, "home/user/docs/name with spaces.txt", "spaces in the name\n")
    _file(root, "home/user/docs/ünïcødé-文件.txt", "UTF-8 name\n")
    _file(root, "home/user/docs/new\nline", "a newline in the name\n")
    _file(root, "home/user/empty", b"")
    nonutf8 = os.path.join(os.fsencode(root), b"home/user/docs/latin1-caf\xe9.txt")
    with open(nonutf8, "wb") as f:
        f.write(b"a name that is not UTF-8\n")
    for i in range(5):
        _file(root, f"home/user/docs/deep/a/b/c/d/file{i}.txt", f"deep file {i}\n")
    _file(
        root,
        "var/log/syslog",
        "".join(f"Jan  2 03:04:{i % 60:02d} demo-vm kernel: line {i}\n" for i in range(2000)),
    )
    rng = random.Random(42)
    _file(root, "data/random.bin", rng.randbytes(big_mib * 1024 * 1024))
    for i in range(120):
        _file(root, f"data/many/item-{i:03d}.dat", f"{i}\n")
    _link(root, "home/user/link-to-readme", "README.txt")
    _link(root, "home/user/docs-link", "docs")
    _link(root, "home/user/hostname-abs", "/etc/hostname")
    _link(root, "home/user/dangling", "/does/not/exist")
    _link(root, "home/user/escape", "../../../../..")
    _link(root, "loop-a", "loop-b")
    _link(root, "loop-b", "loop-a")
    os.makedirs(os.path.join(root, "run"), exist_ok=True)
    try:
        os.mkfifo(os.path.join(root, "run/demo.fifo"))
    except OSError:
        pass
    os.makedirs(os.path.join(root, "tmp"), exist_ok=True)

"""Source trees that the simulator serves as a guest filesystem in end-to-end tests."""

from __future__ import annotations

import os
import random

ODD_NAMES = [
    "with space.txt",
    "new\nline.txt",
    "ünïcødé-日本語.txt",
    os.fsdecode(b"latin1-\xe9\xff.bin"),
    "-leading-dash",
    ".hidden",
    "x" * 255,
]
ODD_NAMES_BYTES = [os.fsencode(n) for n in ODD_NAMES]


def build(root: str) -> None:
    """A small tree with the cases users hit: nested dirs, odd names, modes, owners,
    times, empty files, symlinks of every kind."""
    os.makedirs(os.path.join(root, "data", "nested", "deeper"), exist_ok=True)
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    os.makedirs(os.path.join(root, "links"), exist_ok=True)
    os.makedirs(os.path.join(root, "names"), exist_ok=True)
    os.makedirs(os.path.join(root, "empty-dir"), exist_ok=True)
    _write(root, "etc/hosts", b"127.0.0.1 localhost\n")
    _write(root, "etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o600)
    _write(root, "data/empty", b"")
    _write(root, "data/small.txt", b"hello guest\n" * 10)
    _write(root, "data/one-mib.bin", os.urandom(1 << 20))
    _write(root, "data/odd-size.bin", os.urandom(3 * 1024 * 1024 + 7))
    _write(root, "data/nested/a.txt", b"alpha\n", mode=0o640)
    _write(root, "data/nested/deeper/b.txt", b"beta\n" * 1000, mode=0o755)
    _write(root, "data/setuid", b"#!/bin/sh\n", mode=0o4755)
    for i, name in enumerate(ODD_NAMES):
        _write(root, os.path.join("names", name), f"odd {i}\n".encode())
    os.chown(os.path.join(root, "data/nested/a.txt"), 1234, 5678)
    os.chown(os.path.join(root, "data/nested"), 42, 43)
    os.utime(
        os.path.join(root, "data/small.txt"),
        ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321),
    )
    # Files only one test touches (others must not read them first).
    os.makedirs(os.path.join(root, "solo"), exist_ok=True)
    _write(root, "solo/times.txt", b"t\n")
    os.utime(
        os.path.join(root, "solo/times.txt"),
        ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321),
    )
    _write(root, "solo/shared.bin", os.urandom(5 * 1024 * 1024 + 3))
    os.symlink("../etc/hosts", os.path.join(root, "links/relative"))
    os.symlink("/etc/hosts", os.path.join(root, "links/absolute"))
    os.symlink("/data/nested", os.path.join(root, "links/absolute-dir"))
    os.symlink("../../../../../etc/hosts", os.path.join(root, "links/climbing"))
    os.symlink("/nonexistent/target", os.path.join(root, "links/dangling"))
    os.symlink("loop-b", os.path.join(root, "links/loop-a"))
    os.symlink("loop-a", os.path.join(root, "links/loop-b"))


def _write(root: str, rel: str, data: bytes, mode: int = 0o644) -> None:
    path = os.path.join(root, rel)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def build_big_dir(root: str, n: int) -> list[str]:
    d = os.path.join(root, "big")
    os.makedirs(d, exist_ok=True)
    names = [f"entry-{i:05d}" for i in range(n)]
    for name in names:
        with open(os.path.join(d, name), "wb") as f:
            f.write(name.encode())
    return names


def write_random_file(path: str, size: int, chunk: int = 8 << 20) -> None:
    with open(path, "wb") as f:
        left = size
        seed = os.urandom(chunk)
        i = 0
        while left > 0:
            # Cheap distinct chunks: a random block xor-free variation by prefixing the index.
            block = i.to_bytes(8, "little") + seed[8:]
            f.write(block[:left])
            left -= len(block[:left])
            i += 1


def build_debian_like(
    root: str, dirs: int = 300, files: int = 3000, seed: int = 12
) -> dict[str, int]:
    """A tree shaped like a Debian root: a few top directories (etc, usr, var, ...),
    nested a few levels, most directories small, a few with hundreds of entries, small
    text files, symlinks here and there. Returns how many directories and files it made."""
    rng = random.Random(seed)
    tops = ["bin", "boot", "etc", "home", "lib", "opt", "root", "sbin", "srv", "usr", "var"]
    made = [os.path.join(root, t) for t in tops]
    for d in made:
        os.makedirs(d, exist_ok=True)
    while len(made) < dirs:
        parent = rng.choice(made)
        if parent.count(os.sep) - root.count(os.sep) >= 6:
            continue
        d = os.path.join(parent, f"d{len(made)}")
        os.makedirs(d)
        made.append(d)
    # Zipf-like: a few directories hold most files (as /usr/share/doc, /etc do).
    weights = [1.0 / (i + 1) for i in range(len(made))]
    rng.shuffle(weights)
    for i in range(files):
        d = rng.choices(made, weights)[0]
        path = os.path.join(d, f"f{i}.conf")
        if i % 37 == 0:
            os.symlink(f"f{i - 1}.conf", path)
            continue
        with open(path, "wb") as f:
            f.write(rng.randbytes(rng.randint(0, 2048)))
        os.chmod(path, rng.choice((0o644, 0o600, 0o755)))
    return {"dirs": len(made) + 1, "files": files - (files + 36) // 37}

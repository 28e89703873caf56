"""``guestfs-mount evidence``: exports of what a running mount has seen, and
``--verify-log`` for the hash-chained audit log.

::

    guestfs-mount evidence MOUNTPOINT [PATH...] --format hashdeep|bodyfile|dfxml|jsonl
                           [-o FILE] [--walk] [--fetch]
    guestfs-mount evidence --verify-log FILE

PATHs are on the mount: absolute, or relative to MOUNTPOINT. ``--walk`` (lstat only) and
``--fetch`` (read what has no hash yet) work through the mount from this process, so the
daemon's ledger records them like any other reader's; the export then comes from the
daemon: the guest's own values, and hashes of the exact bytes transferred.
"""

from __future__ import annotations

import argparse
import os
import shlex
import stat as statmod
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..control import ask, ask_evidence, socket_path
from . import chain, formats

CASE_DEFAULTS: dict[str, Any] = {"case": None, "examiner": None, "evidence_id": None, "notes": None}


def add_case_options(parser: argparse.ArgumentParser) -> None:
    """The mount's case options: into the audit log's header and every export."""
    g = parser.add_argument_group("case metadata (audit log header and evidence exports)")
    g.add_argument("--case", metavar="TEXT", help="case name or number")
    g.add_argument("--examiner", metavar="TEXT", help="who examines")
    g.add_argument("--evidence-id", metavar="TEXT", help="evidence item id")
    g.add_argument("--notes", metavar="TEXT", help="free text")


def case_metadata(args: argparse.Namespace) -> dict[str, str]:
    return {k: str(getattr(args, k)) for k in CASE_DEFAULTS if getattr(args, k, None)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestfs-mount evidence",
        description="Export what a running mount has seen and fetched, or verify an audit log.",
        allow_abbrev=False,
    )
    p.add_argument("mountpoint", nargs="?", help="the running mount")
    p.add_argument("paths", nargs="*", metavar="PATH", help="only entries under these paths")
    p.add_argument("--format", choices=sorted(formats.WRITERS), help="export format")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    p.add_argument(
        "--walk", action="store_true", help="first lstat everything under PATH (no content)"
    )
    p.add_argument(
        "--fetch", action="store_true", help="first read the files that have no hash yet"
    )
    p.add_argument("--verify-log", metavar="FILE", help="check the audit log's hash chains")
    return p


class EvidenceError(Exception):
    pass


def _guest_prefixes(mountpoint: str, paths: Sequence[str]) -> list[str]:
    """PATHs as mount-relative prefixes ('' = everything). Lexical only: a realpath would
    follow the guest's symlinks."""
    out = []
    for p in paths or [mountpoint]:
        full = os.path.normpath(p if os.path.isabs(p) else os.path.join(mountpoint, p))
        if full != mountpoint and not full.startswith(mountpoint.rstrip("/") + "/"):
            raise EvidenceError(f"{p} is not on the mount {mountpoint}")
        out.append("" if full == mountpoint else os.path.relpath(full, mountpoint))
    return out


def _fleet_prefixes(
    prefixes: Sequence[str], vms: list[dict[str, Any]], notes: list[str]
) -> list[str]:
    """On a fleet mount a PATH is the mount itself or inside a VM's directory (the ledger
    records are the VMs'); ``.by-id/ID/...`` stands for that VM's directory. A VM that
    cannot be read is noted: it has nothing to export."""
    by_dir = {str(v.get("dir")): v for v in vms}
    by_id = {str(v.get("vm")): v for v in vms}
    out: list[str] = []
    for p in prefixes:
        if not p:
            out.append(p)
            continue
        first, _, rest = p.partition("/")
        vm = by_dir.get(first)
        if first == ".by-id":
            vm_id, _, rest = rest.partition("/")
            vm = by_id.get(vm_id)
            if vm is not None:
                p = str(vm["dir"]) + ("/" + rest if rest else "")
        if vm is None:
            raise EvidenceError(
                f"{p}: not inside a VM of this fleet mount (a PATH is the mount point,"
                " a VM's directory or what is below it, or .by-id/ID)"
            )
        if vm.get("error"):
            notes.append(f"{vm['dir']}: this VM cannot be read ({vm['error']}): nothing seen")
        out.append(p)
    return out


def _under(rel: str, prefixes: Sequence[str]) -> bool:
    return any(not p or rel == p or rel.startswith(p + "/") for p in prefixes)


def walk(top: str, errors: list[str]) -> int:
    """lstat every entry under ``top`` through the mount, never following symlinks."""
    try:
        if not statmod.S_ISDIR(os.lstat(top).st_mode):
            return 1  # PATH is a file or a symlink: its lstat was all there was to do
    except OSError as exc:
        errors.append(f"{top}: {exc.strerror}")
        return 0
    n = 1
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as exc:
            errors.append(f"{d}: {exc.strerror}")
            continue
        for e in entries:
            try:
                st = os.lstat(e.path)
            except OSError as exc:
                errors.append(f"{e.path}: {exc.strerror}")
                continue
            n += 1
            if statmod.S_ISDIR(st.st_mode):
                stack.append(e.path)
    return n


def _unhashed(r: dict[str, Any]) -> bool:
    return bool(r["type"] == "FILE" and r["sha256"] is None)


def fetch(path: str, errors: list[str]) -> bool:
    """Read a file through the mount (the daemon hashes the bytes as they arrive)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.read(fd, 1 << 20):
                pass
        finally:
            os.close(fd)
    except OSError as exc:
        errors.append(f"{path}: cannot fetch: {exc.strerror}")
        return False
    return True


def _file_links(
    mountpoint: str, records: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], str]]:
    """Symlinks that lead to a regular file on the mount, with the target's mount-relative
    path: hashdeep follows them and hashes what they lead to."""
    out = []
    for r in records:
        if r["type"] != "SYMLINK":
            continue
        link = os.path.join(mountpoint, r["path"])
        try:
            if not statmod.S_ISREG(os.stat(link).st_mode):
                continue
            target = os.path.relpath(os.path.realpath(link), mountpoint)
        except OSError:
            continue  # dangling, a loop: hashdeep skips it too
        if target != ".." and not target.startswith("../"):
            out.append((r, target))
    return out


def _link_aliases(
    links: list[tuple[dict[str, Any], str]], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A link's line in a hashdeep manifest: the target's size and hashes, under the
    link's name (what reading the link gives)."""
    by_rel = {r["path"]: r for r in records}
    out = []
    for link, target in links:
        t = by_rel.get(target)
        if t is not None and t["type"] == "FILE":
            out.append({**t, "path": link["path"], "guest_path": link["guest_path"]})
    return out


def _export(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if not args.format:
        raise EvidenceError("--format is required (hashdeep, bodyfile, dfxml or jsonl)")
    mountpoint = os.path.realpath(args.mountpoint)
    prefixes = _guest_prefixes(mountpoint, args.paths)
    sock = socket_path(mountpoint)
    errors: list[str] = []
    try:
        status = ask(sock)
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"no running mount at {args.mountpoint} ({exc})") from exc
    fleet = status.get("fleet")
    if isinstance(fleet, dict):
        prefixes = _fleet_prefixes(prefixes, list(fleet.get("vms") or []), errors)
    if args.walk:
        for p in prefixes:
            walk(os.path.join(mountpoint, p) if p else mountpoint, errors)
    try:
        head, records = ask_evidence(sock)
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"no running mount at {args.mountpoint} ({exc})") from exc
    every = records
    records = [r for r in records if _under(r["path"], prefixes)]
    links = _file_links(mountpoint, records) if args.format == "hashdeep" else []
    if links:
        head, every = ask_evidence(sock)  # the links' targets were just stat'ed
    if args.fetch:
        todo = [os.path.join(mountpoint, r["path"]) for r in records if _unhashed(r)]
        by_rel = {r["path"]: r for r in every}
        todo += [
            os.path.join(mountpoint, link["path"])
            for link, target in links
            if target not in by_rel or _unhashed(by_rel[target])
        ]
        for path in todo:
            fetch(path, errors)
        if todo:
            head, every = ask_evidence(sock)
    records = [r for r in every if _under(r["path"], prefixes)]
    records += _link_aliases(links, every)
    ctx = formats.Context(
        head=head,
        program="guestfs-mount",
        version=__version__,
        command_line=shlex.join(["guestfs-mount", "evidence", *argv]),
        started=time.time(),
    )
    skipped = formats.Skipped()
    writer = formats.WRITERS[args.format]
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            n = writer(out, ctx, records, skipped)
    else:
        n = writer(sys.stdout.buffer, ctx, records, skipped)
        sys.stdout.buffer.flush()
    for problem in [*errors, *skipped]:
        print(f"guestfs-mount evidence: {formats.xml_text(problem)}", file=sys.stderr)
    if head.get("dropped"):
        print(
            f"guestfs-mount evidence: warning: the mount's ledger was full:"
            f" {head['dropped']} entries were not recorded",
            file=sys.stderr,
        )
    unhashed = sum(1 for r in records if _unhashed(r))
    print(
        f"guestfs-mount evidence: {n} entries written ({args.format}); {unhashed} files not"
        " fetched" + ("" if args.fetch or not unhashed else " (--fetch reads them)"),
        file=sys.stderr,
    )
    return 1 if errors else 0


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify_log:
            if args.mountpoint or args.format:
                parser.error("--verify-log takes only the log file")
            try:
                verdict = chain.verify_file(args.verify_log)
            except OSError as exc:
                raise EvidenceError(f"cannot read {args.verify_log}: {exc.strerror}") from exc
            text, code = chain.report(args.verify_log, verdict)
            print(formats.xml_text(text))
            return code
        if not args.mountpoint:
            parser.error("give MOUNTPOINT (or --verify-log FILE)")
        return _export(args, argv)
    except EvidenceError as exc:
        print(f"guestfs-mount evidence: error: {exc}", file=sys.stderr)
        return 2

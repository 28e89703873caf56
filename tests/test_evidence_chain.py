"""The audit log's hash chain: written by AuditLog (as the mount does), checked by
``guestfs-mount evidence --verify-log``."""

from __future__ import annotations

import json
import os

from guestfs_mount.audit import AuditLog
from guestfs_mount.cache.content import ContentKey, TransferEvent
from guestfs_mount.evidence import chain
from guestfs_mount.evidence.command import main as evidence_main


def _event(path: str, i: int) -> TransferEvent:
    return TransferEvent(
        key=ContentKey(path, 10 + i, 1_700_000_000_000_000_000),
        started=1_700_000_000.0 + i,
        seconds=0.5,
        nbytes=10 + i,
        sha256=f"{i:064x}",
        md5=f"{i:032x}",
        error=None,
    )


def _log(path: str, n: int = 3, vm: str = "vm-1", case: dict[str, str] | None = None) -> None:
    log = AuditLog(path, vcenter="vc:443", vm=vm, vm_name="web01", case=case)
    for i in range(n):
        log.record(_event(f"/etc/f{i}", i))
    log.close()


def _lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def _write(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.writelines(lines)


def test_header_carries_case_metadata_and_chain_verifies(tmp_path, capsys):
    p = str(tmp_path / "audit.jsonl")
    _log(p, case={"case": "4711", "examiner": "Ann", "evidence_id": "E-1", "notes": "web"})
    docs = [json.loads(x) for x in _lines(p)]
    assert [d["type"] for d in docs] == ["header", "transfer", "transfer", "transfer", "end"]
    head = docs[0]
    assert (head["case"], head["examiner"], head["evidence_id"], head["notes"]) == (
        "4711", "Ann", "E-1", "web")
    assert head["prev"] is None and head["seq"] == 0
    assert docs[1]["prev"] == chain.line_hash(_lines(p)[0].rstrip(b"\n"))
    assert docs[-1]["transfers"] == 3
    assert oct(os.stat(p).st_mode & 0o777) == "0o600"
    assert evidence_main(["--verify-log", p]) == 0
    assert "OK: 5 lines in 1 chain(s)" in capsys.readouterr().out


def test_edited_line_is_found(tmp_path, capsys):
    p = str(tmp_path / "audit.jsonl")
    _log(p)
    lines = _lines(p)
    lines[2] = lines[2].replace(f'"sha256":"{1:064x}"'.encode(), f'"sha256":"{9:064x}"'.encode())
    _write(p, lines)
    assert evidence_main(["--verify-log", p]) == 1
    out = capsys.readouterr().out
    assert "line 4: its 'prev' is not the SHA-256 of line 3" in out and "FAILED" in out


def test_removed_line_is_found(tmp_path, capsys):
    p = str(tmp_path / "audit.jsonl")
    _log(p)
    lines = _lines(p)
    del lines[2]
    _write(p, lines)
    assert evidence_main(["--verify-log", p]) == 1
    assert "line 3: chain" in capsys.readouterr().out  # jumps from seq 1 to 3


def test_removed_end_line_leaves_the_chain_open(tmp_path, capsys):
    p = str(tmp_path / "audit.jsonl")
    _log(p)
    _write(p, _lines(p)[:-1])
    evidence_main(["--verify-log", p])
    assert "open (mount running, or it was killed)" in capsys.readouterr().out


def test_removed_header_and_foreign_lines_are_found(tmp_path):
    p = str(tmp_path / "audit.jsonl")
    _log(p)
    lines = _lines(p)
    v = chain.verify_lines([x.rstrip(b"\n") for x in lines[1:]])
    assert not v.ok and "not with its header" in v.problems[0]
    v = chain.verify_lines([b'{"path": "/etc/x", "sha256": null}', b"garbage"])
    assert len(v.problems) == 2 and "not part of a hash chain" in v.problems[0]


def test_two_mounts_appending_to_one_file_keep_two_chains(tmp_path):
    p = str(tmp_path / "audit.jsonl")
    a = AuditLog(p, vcenter="vc", vm="vm-1", vm_name="a")
    b = AuditLog(p, vcenter="vc", vm="vm-2", vm_name="b")
    for i in range(4):
        (a if i % 2 else b).record(_event(f"/x{i}", i))
    a.close()
    b.close()
    v = chain.verify_file(p)
    assert v.ok, v.problems
    assert len(v.chains) == 2 and all(c.closed for c in v.chains)
    # An edit is still pinned to the chain it broke.
    lines = _lines(p)
    docs = [json.loads(x) for x in lines]
    victim = next(i for i, d in enumerate(docs) if d["vm"] == "vm-1" and d["type"] == "transfer")
    lines[victim] = lines[victim].replace(b'"/x', b'"/y')
    _write(p, lines)
    v = chain.verify_file(p)
    assert len(v.problems) == 1 and docs[victim]["chain"][:12] in v.problems[0]


def test_line_cut_short_by_a_crash_is_reported(tmp_path):
    p = str(tmp_path / "audit.jsonl")
    _log(p, n=1)
    with open(p, "ab") as f:
        f.write(b'{"type":"transfer","chain":"ab')
    v = chain.verify_file(p)
    assert not v.ok and v.problems[0].startswith("line 4: not a JSON line")

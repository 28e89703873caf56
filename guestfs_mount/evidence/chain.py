"""Hash-chained audit lines, and their verification.

Every line of the audit log is one JSON object carrying ``chain`` (an id random per mount),
``seq`` (0, 1, 2, ... within that chain) and ``prev`` (the SHA-256 of the exact bytes of the
chain's previous line, newline excluded; null on the header). A chain starts with a
``header`` line (case metadata, VM, program) and ends with an ``end`` line written at
unmount. Several mounts may append to one file: each keeps its own chain, and their lines
interleave freely.

An edited or removed line breaks the chain at the next line of the same chain; a removed
``end`` line leaves the chain open. The last line of a chain has nothing after it to vouch
for it: record the head hash that ``--verify-log`` prints outside the log to anchor it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

HEADER, TRANSFER, END = "header", "transfer", "end"


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class ChainWriter:
    """Builds the lines of one chain; the caller writes each one (in order)."""

    def __init__(self, chain_id: str | None = None) -> None:
        # Dashed: 32 bare hex digits look like a vCenter session id to a log scanner.
        self.chain_id = chain_id or str(uuid.uuid4())
        self.seq = 0
        self.prev: str | None = None

    def line(self, kind: str, fields: dict[str, Any]) -> bytes:
        doc = {"type": kind, "chain": self.chain_id, "seq": self.seq, "prev": self.prev}
        doc.update(fields)
        data = json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode()
        self.prev = line_hash(data)
        self.seq += 1
        return data + b"\n"


@dataclass
class ChainState:
    chain_id: str
    first_line: int
    seq: int
    prev: str
    last_line: int
    closed: bool = False
    lines: int = 1
    header: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    problems: list[str]
    chains: list[ChainState]
    lines: int

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_lines(lines: Iterable[bytes]) -> Verdict:
    """Check every chain in ``lines`` (the raw lines of a log, newline stripped)."""
    problems: list[str] = []
    chains: dict[str, ChainState] = {}
    n = 0
    for n, raw in enumerate(lines, 1):
        where = f"line {n}"
        try:
            doc = json.loads(raw)
        except ValueError:
            problems.append(f"{where}: not a JSON line (edited, or cut short by a crash)")
            continue
        if not isinstance(doc, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        cid, seq, prev, kind = doc.get("chain"), doc.get("seq"), doc.get("prev"), doc.get("type")
        if not isinstance(cid, str) or not isinstance(seq, int) or isinstance(seq, bool):
            problems.append(f"{where}: not part of a hash chain (no chain id or sequence number)")
            continue
        state = chains.get(cid)
        if state is None:
            if kind != HEADER or seq != 0 or prev is not None:
                problems.append(
                    f"{where}: chain {cid[:12]} starts with seq {seq} ({kind}), not with its"
                    f" header: the lines before it were removed"
                )
            chains[cid] = ChainState(cid, n, seq, line_hash(raw), n, closed=kind == END)
            if kind == HEADER:
                chains[cid].header = doc
            continue
        if state.closed:
            problems.append(f"{where}: chain {cid[:12]} continues after its end line")
        if seq != state.seq + 1:
            problems.append(
                f"{where}: chain {cid[:12]} jumps from seq {state.seq} (line {state.last_line})"
                f" to {seq}: {'lines were removed' if seq > state.seq else 'lines reordered'}"
            )
        elif prev != state.prev:
            problems.append(
                f"{where}: its 'prev' is not the SHA-256 of line {state.last_line}, the previous"
                f" line of chain {cid[:12]}: one of the two lines was edited"
            )
        state.seq, state.prev, state.last_line = seq, line_hash(raw), n
        state.lines += 1
        state.closed = state.closed or kind == END
    return Verdict(problems, list(chains.values()), n)


def verify_file(path: str) -> Verdict:
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # a line cut short by a crash has no newline: it stays, and is reported
    return verify_lines(lines)


def report(path: str, verdict: Verdict) -> tuple[str, int]:
    """The text ``--verify-log`` prints, and its exit status."""
    out: list[str] = []
    for p in verdict.problems:
        out.append(f"{path}: {p}")
    for c in verdict.chains:
        h = c.header
        who = ", ".join(
            f"{k} {h[k]}" for k in ("case", "evidence_id", "vm", "vm_name") if h.get(k)
        )
        state = "closed" if c.closed else "open (mount running, or it was killed)"
        out.append(
            f"chain {c.chain_id}: lines {c.first_line}-{c.last_line} ({c.lines} lines), {state}"
            + (f"; {who}" if who else "")
            + f"; last line SHA-256 {c.prev}"
        )
    if verdict.ok:
        out.append(f"{path}: OK: {verdict.lines} lines in {len(verdict.chains)} chain(s)")
    else:
        out.append(f"{path}: FAILED: {len(verdict.problems)} problem(s)")
    return "\n".join(out), 0 if verdict.ok else 1


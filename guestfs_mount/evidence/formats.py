"""Evidence writers: plain records (``ledger.record``) to the formats examiners' tools read.

* hashdeep: ``hashdeep -a -k FILE -r DIR`` audits the mount against it; file names are
  absolute paths on the mount, as hashdeep prints them.
* bodyfile (Sleuth Kit 3.x): ``mactime -b FILE`` makes the timeline; names are guest
  paths, fields the guest does not report are 0.
* DFXML 1.1.1, written with ElementTree (no maintained DFXML writer is on PyPI); a name
  that is not UTF-8 also as ``gm:filename_b64``.
* jsonl: one JSON object per record, exact (guest bytes as ``\\udcXX`` escapes, which
  jq shows as U+FFFD: such a name also as ``guest_path_b64``).

Every writer takes a ``Context`` (case metadata, the mount, this program) and writes bytes:
guest names need not be UTF-8, and each format keeps (or visibly escapes) their bytes.
"""

from __future__ import annotations

import json
import os
import re
import stat as statmod
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO

DFXML_NS = "http://www.forensicswiki.org/wiki/Category:Digital_Forensics_XML"
DFXML_VERSION = "1.1.1"
DC_NS = "http://purl.org/dc/elements/1.1/"
GM_NS = "urn:guestfs-mount:evidence:1"
CASE_KEYS = ("case", "examiner", "evidence_id", "notes")


@dataclass
class Context:
    head: dict[str, Any]  # the mount's evidence header (vcenter, vm, guest_root, case, ...)
    program: str
    version: str
    command_line: str
    started: float
    cwd: str = field(default_factory=os.getcwd)

    @property
    def case(self) -> dict[str, str]:
        case = self.head.get("case") or {}
        return {k: str(case[k]) for k in CASE_KEYS if case.get(k)}


class Skipped(list[str]):
    """Names left out of an export, with why (the command reports them)."""


def fleet_vms(ctx: Context) -> list[dict[str, Any]] | None:
    """The VMs of a fleet mount's export (``vm``, ``vm_name``, ``vm_dir``, ``guest_roots``);
    None for a single-VM mount."""
    vms = ctx.head.get("vms")
    return [v for v in vms if isinstance(v, dict)] if isinstance(vms, list) else None


def mount_path(ctx: Context, rec: dict[str, Any]) -> str:
    base = str(ctx.head["mountpoint"]).rstrip("/")
    return f"{base}/{rec['path']}" if rec["path"] else base or "/"


# -- hashdeep ------------------------------------------------------------------------------


def _comment(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def write_hashdeep(
    out: BinaryIO, ctx: Context, records: Iterable[dict[str, Any]], skipped: Skipped
) -> int:
    prompt = "#" if os.geteuid() == 0 else "$"
    head = ctx.head
    vcenter = _comment(str(head.get("vcenter")))
    lines = [
        "%%%% HASHDEEP-1.0",
        "%%%% size,md5,sha256,filename",
        f"## Invoked from: {_comment(ctx.cwd)}",
        f"## {prompt} {_comment(ctx.command_line)}",
    ]
    vms = fleet_vms(ctx)
    if vms is None:
        lines.append(
            f"## {ctx.program} {ctx.version}: VM {_comment(str(head.get('vm')))}"
            f" ({_comment(str(head.get('vm_name')))}) on {vcenter}"
        )
    else:
        lines.append(f"## {ctx.program} {ctx.version}: {len(vms)} VMs of {vcenter}")
        lines += [
            f"## {_comment(str(v['vm_dir']))}/: VM {_comment(str(v['vm']))}"
            f" ({_comment(str(v['vm_name']))})"
            for v in vms
        ]
    lines += [f"## {k}: {_comment(v)}" for k, v in ctx.case.items()]
    lines.append("## ")
    out.write("".join(line + "\n" for line in lines).encode())
    n = 0
    for rec in records:
        if rec["type"] != "FILE":
            continue
        name = os.fsencode(mount_path(ctx, rec))
        if rec["sha256"] is None or rec["md5"] is None:
            continue  # not fetched: counted by the command, not listed one by one
        if b"\n" in name or b"\r" in name:
            skipped.append(f"{rec['guest_path']!r}: a line break in the name (hashdeep has none)")
            continue
        md5, sha = rec["md5"].encode(), rec["sha256"].encode()
        out.write(b"%d,%s,%s,%s\n" % (rec["size"], md5, sha, name))
        n += 1
    return n


# -- bodyfile ------------------------------------------------------------------------------

_TYPE_CHAR = {"FILE": "r", "DIRECTORY": "d", "SYMLINK": "l"}


def mode_string(rec: dict[str, Any]) -> str:
    """``r/rrw-r--r--`` as Sleuth Kit writes it (name type / meta type and permissions)."""
    t = _TYPE_CHAR[rec["type"]]
    return f"{t}/{t}{statmod.filemode(rec['mode'])[1:]}"


def _body_field(data: bytes) -> bytes:
    # mactime splits on '|', then decodes %XX in every field; a name with a control
    # character it would drop, so those are shown as \xNN (as in our logs).
    data = re.sub(rb"[|%]", lambda m: b"%%%02X" % m.group()[0], data)
    return re.sub(rb"[\x00-\x1f\x7f]", lambda m: b"%%5Cx%02x" % m.group()[0], data)


def _secs(ns: int | None) -> int:
    return 0 if ns is None else ns // 1_000_000_000


def write_bodyfile(
    out: BinaryIO, ctx: Context, records: Iterable[dict[str, Any]], skipped: Skipped
) -> int:
    n = 0
    for rec in records:
        name = os.fsencode(rec["guest_path"])
        if rec.get("vm_dir"):
            # A fleet: the VM's directory in front, as `fls -m MOUNT` prefixes its names.
            name = os.fsencode(rec["vm_dir"]) + (b"" if name.startswith(b"/") else b"/") + name
        if rec["link_target"] is not None:
            name += b" -> " + os.fsencode(rec["link_target"])
        fields = [
            (rec["md5"] or "0").encode(),
            _body_field(name),
            b"0",  # no inode number: the guest API reports none
            mode_string(rec).encode(),
            b"%d" % (rec["uid"] or 0),
            b"%d" % (rec["gid"] or 0),
            b"%d" % rec["size"],
            b"%d" % _secs(rec["atime_ns"]),
            b"%d" % _secs(rec["mtime_ns"]),
            b"0",  # ctime: the guest API reports none
            b"%d" % _secs(rec["crtime_ns"]),
        ]
        out.write(b"|".join(fields) + b"\n")
        n += 1
    return n


# -- DFXML -----------------------------------------------------------------------------------

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """XML 1.0 cannot carry control characters nor undecodable guest bytes (lone
    surrogates here): shown as ``\\xNN``."""

    def esc(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"\\x{c - 0xDC00 if 0xDC80 <= c <= 0xDCFF else c:02x}"

    return _NOT_XML.sub(esc, text)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sub(parent: ET.Element, tag: str, text: str | None = None, ns: str = DFXML_NS) -> ET.Element:
    el = ET.SubElement(parent, f"{{{ns}}}{tag}")
    if text is not None:
        el.text = xml_text(text)
    return el


def _time(parent: ET.Element, tag: str, ns: int | None) -> None:
    if ns is not None:
        # The guest API's times are whole seconds on most guests: precision 1 s.
        _sub(parent, tag, _iso(ns // 1_000_000_000)).set("prec", "1")


def _image(head: dict[str, Any]) -> str:
    guest_root = str(head.get("guest_root") or "/")
    where = f"vsphere-guest://{head.get('vcenter')}/{head.get('vm')}"
    return where + ("" if guest_root.startswith("/") else "/") + guest_root


def _gm_attrs(el: ET.Element, head: dict[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        if head.get(key):
            el.set(f"{{{GM_NS}}}{key}", xml_text(str(head[key])))


def _fileobject(parent: ET.Element, rec: dict[str, Any]) -> None:
    fo = _sub(parent, "fileobject")
    _sub(fo, "filename", rec["guest_path"])
    _sub(fo, "name_type", _TYPE_CHAR[rec["type"]])
    _sub(fo, "filesize", str(rec["size"]))
    _sub(fo, "meta_type", {"FILE": "1", "DIRECTORY": "2", "SYMLINK": "3"}[rec["type"]])
    if rec["permissions_known"]:
        _sub(fo, "mode", str(rec["mode"] & 0o7777))
    if rec["uid"] is not None:
        _sub(fo, "uid", str(rec["uid"]))
    if rec["gid"] is not None:
        _sub(fo, "gid", str(rec["gid"]))
    _time(fo, "mtime", rec["mtime_ns"])
    _time(fo, "atime", rec["atime_ns"])
    _time(fo, "crtime", rec["crtime_ns"])
    if rec["link_target"] is not None:
        _sub(fo, "link_target", rec["link_target"])
    if rec["md5"]:
        _sub(fo, "hashdigest", rec["md5"]).set("type", "MD5")
    if rec["sha256"]:
        _sub(fo, "hashdigest", rec["sha256"]).set("type", "SHA256")
    if rec["fetched"] is not None:
        _sub(fo, "fetched", _iso(rec["fetched"]), ns=GM_NS)
    if rec.get("guest_path_b64"):
        # filename shows undecodable bytes as \xNN, like a name that has those 4 chars.
        _sub(fo, "filename_b64", rec["guest_path_b64"], ns=GM_NS)


def write_dfxml(
    out: BinaryIO, ctx: Context, records: Iterable[dict[str, Any]], skipped: Skipped
) -> int:
    """A single VM: one source, its fileobjects. A fleet: one image per VM in the source,
    and each VM's fileobjects inside a ``volume`` naming that VM (``gm:vm`` ...)."""
    ET.register_namespace("", DFXML_NS)
    ET.register_namespace("dc", DC_NS)
    ET.register_namespace("gm", GM_NS)
    root = ET.Element(f"{{{DFXML_NS}}}dfxml", {"version": DFXML_VERSION})
    meta = _sub(root, "metadata")
    _sub(meta, "type", "Guest file system metadata and hashes", ns=DC_NS)
    for k, v in ctx.case.items():
        _sub(meta, k, v, ns=GM_NS)
    creator = _sub(root, "creator")
    _sub(creator, "program", ctx.program)
    _sub(creator, "version", ctx.version)
    env = _sub(creator, "execution_environment")
    _sub(env, "command_line", ctx.command_line)
    _sub(env, "start_time", _iso(ctx.started))
    head = ctx.head
    source = _sub(root, "source")
    vms = fleet_vms(ctx)
    if vms is None:
        keys = ("vcenter", "vm", "vm_name", "instance_uuid", "guest_root", "mountpoint")
        _gm_attrs(source, head, keys)
        _sub(source, "image_filename", _image(head))
        parent = {None: root}
    else:
        _gm_attrs(source, head, ("vcenter", "mountpoint"))
        parent = {}
        for one in vms:
            roots = one.get("guest_roots") or ["/"]
            vm_head = {**head, **one, "guest_root": roots[0]}
            _sub(source, "image_filename", _image(vm_head))
            volume = _sub(root, "volume")
            _gm_attrs(volume, vm_head, ("vm", "vm_name", "vm_dir", "guest_root"))
            parent[one.get("vm")] = volume
    n = 0
    for rec in records:
        where = parent.get(rec.get("vm"))
        if where is None:
            skipped.append(f"{rec['guest_path']!r}: of a VM the export header does not name")
            continue
        _fileobject(where, rec)
        n += 1
    ET.indent(root)
    ET.ElementTree(root).write(out, encoding="UTF-8", xml_declaration=True)
    out.write(b"\n")
    return n


# -- JSON lines ------------------------------------------------------------------------------


def write_jsonl(
    out: BinaryIO, ctx: Context, records: Iterable[dict[str, Any]], skipped: Skipped
) -> int:
    header: dict[str, Any] = {
        "type": "header",
        "program": ctx.program,
        "version": ctx.version,
        "command_line": ctx.command_line,
        "time": _iso(ctx.started),
        **{k: ctx.head.get(k) for k in ("vcenter", "vm", "vm_name", "guest_root", "mountpoint")},
        **ctx.case,
    }
    vms = fleet_vms(ctx)
    if vms is not None:
        header["vms"] = vms  # and every entry names its VM (vm, vm_name, vm_dir)
    out.write(json.dumps(header, ensure_ascii=True).encode() + b"\n")
    n = 0
    for rec in records:
        out.write(json.dumps({"type": "entry", **rec}, ensure_ascii=True).encode() + b"\n")
        n += 1
    return n


WRITERS = {
    "hashdeep": write_hashdeep,
    "bodyfile": write_bodyfile,
    "dfxml": write_dfxml,
    "jsonl": write_jsonl,
}

"""``guestfs-sim ctl``: call the admin API of a running simulator found by its ready file.

    guestfs-sim ctl --ready-file ready.json GET stats
    guestfs-sim ctl --ready-file ready.json POST faults '{"busy_next": 3}'
    guestfs-sim ctl --ready-file ready.json POST vms/vm-42/power '{"state": "POWERED_OFF"}'

PATH is relative to ``/_sim`` (a leading ``/_sim/`` is accepted too). Prints the JSON
answer; exit status 0 on 2xx, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Sequence

import httpx


def ctl_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="guestfs-sim ctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ready-file", required=True, help="the simulator's --ready-file")
    p.add_argument("method", type=str.upper, choices=["GET", "POST"])
    p.add_argument("path", help="admin path, e.g. stats, faults, faults/reset, restart")
    p.add_argument("json", nargs="?", help="JSON body for POST")
    args = p.parse_args(list(argv))
    try:
        with open(args.ready_file, encoding="utf-8") as f:
            info = json.loads(f.readline())
        body = json.loads(args.json) if args.json else None
    except (OSError, ValueError) as exc:
        print(f"guestfs-sim ctl: {exc}", file=sys.stderr)
        return 2
    path = args.path.removeprefix("/").removeprefix("_sim/")
    url = f"{info['admin_url']}/{path}"
    ca = info.get("ca_file")
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
    try:
        with httpx.Client(verify=verify, timeout=30) as client:
            resp = client.request(args.method, url, json=body)
    except httpx.HTTPError as exc:
        print(f"guestfs-sim ctl: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(resp.text if resp.text.endswith("\n") else resp.text + "\n")
    return 0 if resp.is_success else 1

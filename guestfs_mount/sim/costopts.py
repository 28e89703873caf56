"""Cost-model settings from the command line and the config file's ``[cost]`` table.

Precedence: ``--cost-model`` (else ``cost.model`` in the config, else ``ideal``) picks the
preset; then the config's knobs apply, then the command line's.
"""

from __future__ import annotations

import argparse
from typing import Any

from .cost import KNOBS, MODELS, PRESETS, CostError, GuestCost, settings_from

_HELP = {
    "control_delay": "control-plane delay per API call, s (paid in parallel)",
    "control_jitter": "+- fraction of the control delay, uniform (0..1)",
    "guest_concurrency": "guest lane servers per VM (0 = unlimited)",
    "auth_posix": "guest authentication per lane use on a POSIX guest, s",
    "auth_windows": "guest authentication per lane use on a Windows guest, s",
    "scan_entry": "listing cost per entry of the whole directory, per page, s",
    "return_entry": "listing cost per entry returned, s",
    "stat_time": "cost of one stat (files.get, transfer create), s",
    "packet_time": "cost of one transfer-body packet, s (plus authentication)",
    "packet_size": "bytes per transfer-body packet",
    "queue_threshold": "waiting calls beyond which new calls may be rejected (0 = never)",
    "reject_step": "rejection probability per waiting call beyond the threshold",
    "bad_password_delay": "how long a refused guest login holds the lane, s",
}


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "cost model", "how guest operations are paid for; see docs/simulator.md"
    )
    g.add_argument(
        "--cost-model",
        choices=MODELS,
        default=None,
        help="ideal (default: no delays, unlimited parallelism) or realistic (one guest "
        "operation at a time per VM)",
    )
    g.add_argument("--seed", type=int, default=None, help="seed of the model's random numbers")
    realistic = PRESETS["realistic"]
    for knob, text in _HELP.items():
        kind = int if knob in ("guest_concurrency", "queue_threshold", "packet_size") else float
        default = realistic.get(knob)
        g.add_argument(
            "--" + knob.replace("_", "-"),
            type=kind,
            default=None,
            metavar="N" if kind is int else "S",
            help=text + (f" (realistic: {default})" if default is not None else ""),
        )
    g.add_argument(
        "--keep-alive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep ESXi connections open after a transfer body (realistic: no)",
    )


def cost_from(args: argparse.Namespace, config: dict[str, Any]) -> GuestCost:
    """The GuestCost the options and the config's ``cost`` table describe; CostError
    when either is malformed."""
    table = config.get("cost", {})
    if not isinstance(table, dict):
        raise CostError("cost: must be a table/object")
    table = dict(table)
    seed = table.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise CostError("cost.seed must be an integer")
    model = args.cost_model or table.pop("model", "ideal")
    table.pop("model", None)
    settings = settings_from({"model": model})
    settings = settings_from(table, settings)
    cli = {k: getattr(args, k) for k in KNOBS if k != "model" and getattr(args, k) is not None}
    settings = settings_from(cli, settings)
    return GuestCost(settings, seed=args.seed if args.seed is not None else seed)

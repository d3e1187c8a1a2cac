"""`--mode async` and the simulated fleet on the gkt-hub command line (docs/async.md)."""

from __future__ import annotations

import argparse

from server_hub.assembly.options import ModeOptions
from server_hub.async_mode.rules import MODES, AsyncConfig
from server_hub.simulation.speeds import build_fleet


def add_async_args(p: argparse.ArgumentParser, simulate: bool = False) -> None:
    g = p.add_argument_group("asynchronous mode (docs/async.md)")
    g.add_argument("--mode", choices=MODES, default="sync",
                   help="sync: rounds wait for every device; async: no device waits for another")
    g.add_argument("--staleness-decay", type=float, default=0.95,
                   help="async: loss weight per hub version of a device's features' age")
    g.add_argument("--max-staleness", type=int, default=50,
                   help="async: hub versions after which features are no longer trained on")
    g.add_argument("--logits-after", type=float, default=1.0,
                   help="async: passes over the bank between a device's upload and its logits")
    g.add_argument("--eval-every", type=int, default=0,
                   help="async: evaluate every N merged uploads (0: every --eval-seconds)")
    g.add_argument("--eval-seconds", type=float, default=10.0)
    g.add_argument("--max-updates", type=int, default=0,
                   help="async: stop after N merged uploads (default: rounds x devices, "
                        "unless --duration)")
    g.add_argument("--duration", type=float, default=0.0, help="async: stop after N seconds")
    if simulate:
        f = p.add_argument_group("simulated heterogeneous devices")
        f.add_argument("--device-speeds", metavar="F,F,...",
                       help="slowdown factor per device, e.g. 1,1,1,5 (1 = this machine)")
        f.add_argument("--device-profiles", metavar="ID,ID,...",
                       help="speed factors from the device catalog, e.g. rpi4b,jetson-orin-nano")
        f.add_argument("--bandwidths", metavar="B,B,...",
                       help="link bytes/s per device, e.g. 2M,2M,2M,400K (default: as is)")


def mode_options(args: argparse.Namespace, devices: int, rounds: int) -> ModeOptions:
    """ValueError names the bad option."""
    fleet = []
    if getattr(args, "device_speeds", None) or getattr(args, "device_profiles", None) \
            or getattr(args, "bandwidths", None):
        fleet = build_fleet(devices, args.device_speeds, args.device_profiles, args.bandwidths)
    if args.mode == "sync":
        return ModeOptions("sync", None, fleet)
    if getattr(args, "workers", 1) > 1:
        raise ValueError("--mode async runs one hub process; --workers is for sync rounds")
    acfg = AsyncConfig(decay=args.staleness_decay, max_staleness=args.max_staleness,
                       logits_after=args.logits_after, eval_every=args.eval_every,
                       eval_seconds=args.eval_seconds,
                       max_updates=args.max_updates or (0 if args.duration else rounds * devices),
                       duration=args.duration)
    return ModeOptions("async", acfg, fleet)

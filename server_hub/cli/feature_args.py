"""`gkt-hub` option groups of the optional features: several hub workers, monitoring, and
the `status` command (reads a running hub's status page)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from server_hub.assembly.exit_codes import EXIT_BROKER, EXIT_OK
from server_hub.monitoring.endpoints import format_status


def add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several hub workers (docs/scaling.md)")
    g.add_argument("--workers", type=_positive, default=1,
                   help="hub processes on this machine training one server model with DDP "
                        "(1 = a single process, no torch.distributed)")
    g.add_argument("--share-group", default=None,
                   help="MQTT v5 shared-subscription group the workers split uploads in "
                        "(default: derived from the hub's broker password, so a device "
                        "cannot join it; 'gkt-hub' on a broker without logins)")
    g.add_argument("--worker-threads", type=int, default=0,
                   help="torch CPU threads per worker (0 = cores / workers on this machine)")
    g.add_argument("--broker-user", help="MQTT user name of the hub (every worker) on a "
                                         "--broker that needs a login (password: "
                                         "$GKT_BROKER_PASSWORD)")
    g.add_argument("--trace-dir", help="write the (device, sample id) each worker trained, "
                                       "per epoch, as JSON lines here (an audit)")


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_monitoring_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("monitoring (off unless a port is given)")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (/metrics)")
    g.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port")
    g.add_argument("--status-port", type=int, default=None,
                   help="serve the live status page (/) and /status.json on this port")
    g.add_argument("--status-host", default="127.0.0.1", help="address of --status-port")
    g.add_argument("--monitor-linger", type=float, default=0.0, metavar="SECONDS",
                   help="after the last round keep serving both this long, so a scrape "
                        "sees the end (SIGTERM ends it sooner)")


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="print a running hub's status (from its --status-port)")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="the hub's status server, as given to serve --status-port")
    p.add_argument("--json", action="store_true", help="print the raw /status.json")
    p.add_argument("--timeout", type=float, default=5.0)


def run_status(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/status.json"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            snap = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(f"gkt-hub: error: cannot read {url}: {err}", file=sys.stderr)
        return EXIT_BROKER
    print(json.dumps(snap, indent=1) if args.json else format_status(snap))
    return EXIT_OK

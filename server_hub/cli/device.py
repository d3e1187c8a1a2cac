"""`gkt-hub device add|revoke|list`: enrol devices with the managed broker.

Exit codes: 0 done, 1 revoke of a device that is not enrolled, 2 bad arguments or
enrolment failed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import sys

from server_hub.assembly.exit_codes import EXIT_BAD_ARGS, EXIT_NOT_FOUND
from server_hub.broker.enrol import (
    EnrolError,
    SecurityPaths,
    add_device,
    list_devices,
    revoke_device,
)


def add_device_parser(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser("device", help="enrol, revoke and list devices (broker passwords, ACL)")
    verbs = dev.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="enrol a device (or give it a new password) and print "
                                       "what it needs")
    add.add_argument("device_id")
    add.add_argument("--host", default=socket.getfqdn(),
                     help="the hub's address as devices reach it (default: this host's name)")
    add.add_argument("--port", type=int, default=None,
                     help="broker port devices use (default 8883 with TLS, else 1883)")
    add.add_argument("--tls", action="store_true",
                     help="make the broker's CA and certificate (for --host) now if missing")
    add.add_argument("--json", action="store_true", help="print a JSON object instead")
    rev = verbs.add_parser("revoke", help="remove a device's password and topics")
    rev.add_argument("device_id")
    verbs.add_parser("list", help="enrolled and revoked devices")
    for p in (add, rev, verbs.choices["list"]):
        p.add_argument("--state-dir", required=True, help="the hub's state directory")


def add_access_args(srv: argparse.ArgumentParser) -> None:
    """`gkt-hub serve` options for the managed broker's TLS listener and exposure."""
    srv.add_argument("--tls", action="store_true",
                     help="TLS listener for devices (CA + certificate made in STATE/security)")
    srv.add_argument("--tls-port", type=int, default=8883)
    srv.add_argument("--tls-host", action="append", default=[], metavar="NAME",
                     help="a name devices use for the hub, for the certificate (repeatable)")
    srv.add_argument("--insecure", action="store_true",
                     help="allow unauthenticated MQTT on a non-loopback --listen (test only)")


def run_device(args: argparse.Namespace) -> int:
    try:
        if args.verb == "add":
            return _add(args)
        if args.verb == "revoke":
            if not revoke_device(args.state_dir, args.device_id):
                print(f"gkt-hub: device {args.device_id!r} is not enrolled", file=sys.stderr)
                return EXIT_NOT_FOUND
            print(f"revoked {args.device_id}; it can no longer connect")
            return 0
        rows = list_devices(args.state_dir)
        for r in rows:
            when = r.get("revoked") if r["status"] == "revoked" else r["added"]
            print(f"{r['device']:<24} {r['status']:<9} {when}")
        if not rows:
            print("no devices enrolled")
        return 0
    except (EnrolError, ValueError) as err:
        print(f"gkt-hub: error: {err}", file=sys.stderr)
        return EXIT_BAD_ARGS


def _add(args: argparse.Namespace) -> int:
    e = add_device(args.state_dir, args.device_id)
    if args.tls:
        from server_hub.broker.tls import ensure_tls

        ensure_tls(args.state_dir, [args.host])
    ca = SecurityPaths.of(args.state_dir).root / "ca.pem"
    tls = ca.is_file()
    port = args.port or (8883 if tls else 1883)
    url = f"{'mqtts' if tls else 'mqtt'}://{args.host}:{port}"
    secret = f"{e.device}.secret"
    cmd = ["gkt-edge", "run", "--hub", url, "--device-id", e.device, "--username", e.device,
           "--password-file", secret] + (["--ca-file", ca.name] if tls else [])
    info = {"device": e.device, "url": url, "username": e.device, "password": e.password,
            "ca_file": str(ca) if tls else None, "broker_reloaded": e.broker_reloaded,
            "command": shlex.join(cmd)}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"enrolled {e.device} in {e.paths.root}"
          + (" (running broker reloaded)" if e.broker_reloaded else ""))
    print(f"  broker:   {url}")
    print(f"  user:     {e.device}")
    print(f"  password: {e.password}   (shown once)")
    if tls:
        print(f"  CA file:  {ca}   (copy it to the device)")
    else:
        print("  no TLS: the password crosses the network in clear; enrol again with --tls "
              "and start the hub with `gkt-hub serve --tls`")
    print("on the device:")
    print(f"  (umask 077; printf '%s\\n' {shlex.quote(e.password)} > {secret})")
    print(f"  {shlex.join(cmd)} --data FOLDER")
    print("  (FOLDER: the device's own images, one subfolder per class; docs/own-data.md)")
    return 0

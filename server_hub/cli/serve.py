"""`gkt-hub serve`: a managed (or joined) broker and the hub (one process, or K workers).

Exit codes: server_hub/assembly/exit_codes.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edge_runtime.ops.state_dir import (
    archive_run,
    disk_full_message,
    is_disk_full,
    lock_state_dir,
)
from edge_runtime.protocol.round_auth import KEY_FILE
from server_hub.assembly.exit_codes import EXIT_BAD_ARGS, EXIT_DISK_FULL
from server_hub.assembly.hub_run import BrokerSetupError, HubOutcome, open_broker, run_hub
from server_hub.assembly.options import BrokerOptions, HubOptions
from server_hub.disk import DISK_FULL_ADVICE
from server_hub.run.spec_store import SPEC_FILE
from server_hub.simulation.inproc import FederationConfig

log = logging.getLogger("gkt.hub")


def serve(fed: FederationConfig, opts: HubOptions, broker_opts: BrokerOptions) -> int:
    state = Path(opts.service.state_dir)
    try:  # two hubs on one state dir would overwrite each other's checkpoints and journal
        lock = lock_state_dir(state, "gkt-hub serve")
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return EXIT_BAD_ARGS
    try:
        if opts.new_run:
            start_new_run(state)
        return _serve(fed, opts, broker_opts, state)
    finally:
        lock.close()


# what outlives a run: enrolled devices and TLS files, the broker, the run key
HUB_KEEPS = frozenset({"security", "broker", KEY_FILE})


def start_new_run(state: Path) -> None:
    """Move the state dir's last run (its run spec names it) to STATE/runs/RUN_ID."""
    try:
        run_id = json.loads((state / SPEC_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        run_id = "unknown"
    dest = archive_run(state, run_id, HUB_KEEPS)
    if dest is not None:
        log.info("run %s moved to %s; starting a new run", run_id, dest)


def _serve(fed: FederationConfig, opts: HubOptions, broker_opts: BrokerOptions,
           state: Path) -> int:
    if opts.workers.workers > 1:
        from server_hub.workers.launch import serve_workers

        return serve_workers(fed, opts, broker_opts)
    try:
        broker, url, access = open_broker(broker_opts, state, opts.service.max_payload)
    except BrokerSetupError as err:
        log.error("%s", err)
        return err.exit_code
    try:
        try:
            outcome = run_hub(fed, opts, url, (access.username, access.password))
        except OSError as err:
            if not is_disk_full(err):
                raise
            log.error("%s", disk_full_message(err, state, DISK_FULL_ADVICE))
            return EXIT_DISK_FULL
        line = finished_line(outcome, state)
        if line:
            print(line, flush=True)
        return outcome.code
    finally:
        if broker:
            broker.stop()


def finished_line(outcome: HubOutcome, state: Path) -> str | None:
    """The closing line of a finished run: where it ended, its accuracy, where things are
    (None for a run that did not finish: a SIGTERM ends with a restart note instead)."""
    last, status = outcome.last, outcome.status
    if outcome.code or last is None or status is None or status.phase != "done":
        return None
    parts = [f"run {status.run_id} finished" if status.run_id else "run finished",
             f"at round {last.round}: test accuracy {last.test_accuracy:.4f}"]
    report = status.class_report or {}
    scored = [(a, c) for c, a in zip(report.get("classes", []),
                                     report.get("per_class_accuracy") or []) if a is not None]
    if scored:
        acc, name = min(scored)
        parts.append(f"(weakest class {name}: {acc:.4f})")
    line = " ".join(parts) + f"; every round in {state / 'run.json'}"
    if status.delivery:
        d = status.delivery
        got = len(d["acked"])
        line += f"; {got}/{got + len(d['missing'])} devices hold their round {d['round']} model"
    return line

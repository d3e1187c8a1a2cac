"""`gkt-hub serve`: a managed (or joined) broker and the hub (one process, or K workers).

Exit codes: server_hub/assembly/exit_codes.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server_hub.assembly.hub_run import BrokerSetupError, open_broker, run_hub
from server_hub.assembly.options import BrokerOptions, HubOptions
from server_hub.simulation.inproc import FederationConfig

log = logging.getLogger("gkt.hub")


def serve(fed: FederationConfig, opts: HubOptions, broker_opts: BrokerOptions) -> int:
    state = Path(opts.service.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if opts.workers.workers > 1:
        from server_hub.workers.launch import serve_workers

        return serve_workers(fed, opts, broker_opts)
    try:
        broker, url, access = open_broker(broker_opts, state, opts.service.max_payload)
    except BrokerSetupError as err:
        log.error("%s", err)
        return err.exit_code
    try:
        return run_hub(fed, opts, url, (access.username, access.password)).code
    finally:
        if broker:
            broker.stop()

"""A systemd unit that runs a command from a config file, restarted when it fails.

The exit codes decide what systemd does (``Restart=on-failure``): 0 (the federation is
over, or a clean SIGTERM stop) ends the service; 2 (bad arguments or config) is listed in
``RestartPreventExitStatus`` because restarting cannot fix a typo, and so is 5 (the broker
refused the device's credentials: revoked), and so is 6 (the hub refused the device for
good: another run's settings); everything else (4 =
broker unreachable, a crash, SIGKILL, the OOM killer) restarts it after ``RestartSec``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.device.exit_codes import EXIT_USAGE, NO_RESTART
from edge_runtime.ops.config_file import read_file, subparser


@dataclass(frozen=True)
class UnitConfig:
    description: str
    exec_start: list[str]  # argv of the service's main process
    user: str | None = None
    working_directory: str | None = None
    restart_sec: float = 10.0
    stop_timeout: float = 90.0  # SIGTERM, then SIGKILL after this long
    environment: tuple[str, ...] = ("PYTHONUNBUFFERED=1",)
    no_restart: tuple[int, ...] = NO_RESTART  # exit codes a restart cannot fix


def console_script(name: str) -> str:
    """Absolute path of a console script of this installation (the venv's own)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name) or name


def render_unit(cfg: UnitConfig) -> str:
    lines = [
        "[Unit]",
        f"Description={cfg.description}",
        "Wants=network-online.target",
        "After=network-online.target",
        # Keep retrying forever: a device outlives hub and network outages.
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={shlex.join(cfg.exec_start)}",
    ]
    if cfg.user:
        lines.append(f"User={cfg.user}")
    if cfg.working_directory:
        lines.append(f"WorkingDirectory={cfg.working_directory}")
    lines += [f"Environment={e}" for e in cfg.environment]
    lines += [
        "Restart=on-failure",
        f"RestartSec={cfg.restart_sec:g}",
        f"RestartPreventExitStatus={' '.join(map(str, cfg.no_restart))}",
        "KillSignal=SIGTERM",
        # SIGTERM to the program alone: the hub stops its own broker and workers once its
        # step is done (they would otherwise die under it and be restarted); what is left
        # at TimeoutStopSec gets SIGKILL
        "KillMode=mixed",
        f"TimeoutStopSec={cfg.stop_timeout:g}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"



def add_service_parser(sub, program: str, command: str) -> None:
    """``PROGRAM service --config FILE ...``: print a unit that runs ``PROGRAM COMMAND``."""
    svc = sub.add_parser("service", help=f"print a systemd unit that runs `{program} {command} "
                                         "--config FILE` and restarts it on failure")
    svc.add_argument("--config", dest="unit_config", required=True, metavar="FILE",
                     help="the TOML config (made absolute in the unit)")
    svc.add_argument("--user", default=None, help="run as this user (User=)")
    svc.add_argument("--restart-sec", type=float, default=10.0)
    svc.add_argument("--working-directory", default=None,
                     help="WorkingDirectory= (relative paths in the config start there)")
    svc.add_argument("--executable", default=None,
                     help=f"path of {program} (default: the one of this installation)")


def print_unit(args: argparse.Namespace, parser: argparse.ArgumentParser, program: str,
               command: str, description: str, no_restart: tuple[int, ...],
               stop_timeout: float) -> int:
    """Print the unit for ``args`` (from add_service_parser); 2 if the config does not read
    as options of ``parser``'s ``command`` (read as the service will)."""
    path = Path(args.unit_config).resolve()
    try:
        read_file(subparser(parser, [command]), str(path))  # fail now, not at boot
    except ValueError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    exe = args.executable or console_script(program)
    print(render_unit(UnitConfig(description, [exe, command, "--config", str(path)],
                                 user=args.user, working_directory=args.working_directory,
                                 restart_sec=args.restart_sec, stop_timeout=stop_timeout,
                                 no_restart=no_restart)), end="")
    return 0

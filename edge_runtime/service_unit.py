"""A systemd unit that runs a command from a config file, restarted when it fails.

The exit codes decide what systemd does (``Restart=on-failure``): 0 (the federation is
over, or a clean SIGTERM stop) ends the service; 2 (bad arguments or config) is listed in
``RestartPreventExitStatus`` because restarting cannot fix a typo, and so is 5 (the broker
refused the device's credentials: revoked); everything else (4 =
broker unreachable, a crash, SIGKILL, the OOM killer) restarts it after ``RestartSec``.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .exit_codes import NO_RESTART


@dataclass(frozen=True)
class UnitConfig:
    description: str
    exec_start: list[str]  # argv of the service's main process
    user: str | None = None
    working_directory: str | None = None
    restart_sec: float = 10.0
    stop_timeout: float = 90.0  # SIGTERM, then SIGKILL after this long
    environment: tuple[str, ...] = ("PYTHONUNBUFFERED=1",)


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
        f"RestartPreventExitStatus={' '.join(map(str, NO_RESTART))}",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={cfg.stop_timeout:g}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


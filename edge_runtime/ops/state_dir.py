"""A state dir's ownership: one process at a time, one device's, one run's at a time.

Two devices (or two hubs) given one ``--state-dir`` overwrite each other's model, logits
and temporary files mid-save, and one of them dies with a traceback rounds later. The
first process to start holds an exclusive ``flock`` on ``STATE/.lock`` for its lifetime
(the kernel drops it when the process dies, however it dies); a second is refused at start.

A full disk under the state dir ends either program with what to do, not a traceback.

``--new-run`` (both programs) moves a finished run's files to ``STATE/runs/RUN_ID`` and
keeps what outlives a run: credentials, TLS files and the broker's config on the hub; the
decode cache on a device.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
OWNER_FILE = "device.json"


class StateDirError(ValueError):
    """The state dir cannot be used by this process (a usage error: exit 2)."""


def lock_state_dir(state_dir: Path, what: str) -> IO[str]:
    """Hold ``state_dir``'s lock; keep the returned file open for as long as the process
    uses the dir. StateDirError names the other holder's pid."""
    state_dir.mkdir(parents=True, exist_ok=True)
    f = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise StateDirError(f"{state_dir} is in use by another {what} (pid {holder}); "
                            f"give each one its own --state-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def claim_for_device(state_dir: Path, device_id: str) -> None:
    """Record ``device_id`` as the dir's owner; StateDirError if another device owns it
    (its model, logits and sample ids are that device's)."""
    path = state_dir / OWNER_FILE
    if path.exists():
        try:
            owner = json.loads(path.read_text())["device_id"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StateDirError(f"{path} cannot be read ({err}); delete it if {state_dir} "
                                f"is {device_id}'s") from None
        if owner != device_id:
            raise StateDirError(f"{state_dir} holds device {owner}'s state, not "
                                f"{device_id}'s: give {device_id} its own --state-dir")
        return
    tmp = path.with_name(OWNER_FILE + ".tmp")
    tmp.write_text(json.dumps({"device_id": device_id}) + "\n")
    tmp.replace(path)


def archive_run(state_dir: Path, run_id: str, keep: frozenset[str]) -> Path | None:
    """Move every entry of ``state_dir`` but ``keep`` (and ``runs/``, the lock) into
    ``state_dir/runs/RUN_ID``; the folder it made, or None if there was nothing to move."""
    keep = keep | {"runs", LOCK_FILE}
    moving = [p for p in sorted(state_dir.iterdir()) if p.name not in keep]
    if not moving:
        return None
    dest = state_dir / "runs" / (run_id or "unknown")
    if dest.exists():  # the same run archived before (restarted, archived again)
        dest = dest.with_name(f"{dest.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    dest.mkdir(parents=True)
    for p in moving:
        p.rename(dest / p.name)
    return dest


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL


def disk_full_message(err: OSError, state_dir: str | Path, advice: str) -> str:
    return (f"the disk of {state_dir} is full ({err.strerror}: {err.filename or 'a write'}). "
            f"{advice}")

"""Which round announcements a device follows.

Every announcement carries the run id (``run``), the announcing hub process's random
nonce (``hub``), the hub's clock when it was issued (``issued``) and, when the hub holds a
run key, an HMAC-SHA256 over all of them (``sig``). A device given the same key (a file the
hub writes into its state dir; ``gkt-hub simulate`` hands it to its devices) follows only
announcements that verify, so on an unauthenticated loopback broker a stray local client
can neither end the run (``stop``) nor open a fake round, nor replay an older one. Without
a key the device still ignores announcements of another run, but a client that copies
``run`` from the retained topic can forge one: with logins the broker ACL is what keeps
everyone but the hub off that topic.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

SIGNED = ("state", "deadline", "epoch", "run", "hub", "issued")
KEY_FILE = "round.key"


def _digest(key: bytes, round_: int, meta: dict) -> str:
    body = json.dumps([round_, *[meta.get(k) for k in SIGNED]], separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(key: bytes, round_: int, meta: dict) -> dict:
    """``meta`` with its ``sig``."""
    return {**meta, "sig": _digest(key, round_, meta)}


def load_or_create_key(state_dir: str | Path) -> Path:
    """The run key file in ``state_dir`` (created, mode 0600, on first use). Hub workers
    start together on one state dir: the first link() wins, the others read its key."""
    path = Path(state_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # atomic, and never replaces a key someone already uses
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path


def read_key(path: str | Path) -> bytes:
    text = Path(path).read_text().strip()
    if len(text) < 32:
        raise ValueError(f"{path}: a run key is at least 32 hex characters")
    return text.encode()


class RoundGuard:
    """Decides, announcement by announcement, whether a device follows it."""

    def __init__(self, key: bytes | None = None, run: str | None = None) -> None:
        self.key = key
        self.run = run  # the run the device adopted (None: the first one it sees)
        self.issued = float("-inf")

    def why_not(self, round_: int, meta: dict) -> str | None:
        """None to follow the announcement, else why it is ignored (and it is not adopted).
        It must name the run the device follows: the one it adopted, else the first it saw
        (a hub restarted with --new-run keeps its run key, and the old run's retained
        "stop" must not end a device that joined the new one). Signed: it must also verify
        and be no older than the last one followed (a replayed retained message).
        Unsigned, ordering by ``issued`` would let a forger who sets it far ahead lock the
        device out, so it is not used."""
        run = meta.get("run")
        if self.run is not None and run != self.run:
            return f"announces run {str(run)[:40]!r}; this device follows {self.run!r}"
        if self.key is not None:
            sig, issued = meta.get("sig"), meta.get("issued")
            if not isinstance(sig, str) or not hmac.compare_digest(
                    sig, _digest(self.key, round_, meta)):
                return "not signed with the run key"
            if isinstance(issued, (int, float)) and not isinstance(issued, bool):
                if issued < self.issued:
                    return "older than the announcement already followed (a replay)"
                self.issued = float(issued)
        if isinstance(run, str):
            self.run = run
        return None

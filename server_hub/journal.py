"""Accepted uploads on disk, so a hub that crashes mid-round loses nothing it acked.

Every message the hub accepts is appended, as the exact bytes that arrived, to a log under
``uploads/round-NNNN/<device>/<pid>.log`` (records: uint32 length, uint32 crc32, bytes).
A restarted hub replays them through the same validation as live traffic; a finished
round's folder is deleted once its checkpoint is written. The bytes are the compressed
wire form, so the journal costs about what crossed the network.

Group commit: ``record(..., then=ack)`` appends and returns at once; a committer thread
fsyncs every log written since its last pass in one go and only then runs the callbacks
(the acks), so an acknowledged upload is always durable while one fsync covers every
message that arrived during the previous one. ``record`` without ``then`` waits for that
fsync (the async hub and hub workers use it so). A crash can tear only the tail of a log,
which holds messages nobody acknowledged; replay stops there.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("gkt.hub")

_RECORD = struct.Struct(">II")  # payload length, crc32 of the payload


class UploadJournal:
    """Accepted upload messages on disk, per round and device, so a crashed hub
    replays them instead of asking devices to upload again."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._files: dict[tuple[int, str], object] = {}  # open logs
        self._dirty: set[tuple[int, str]] = set()  # written since the last commit
        self._callbacks: list[Callable[[], None]] = []  # waiting for the next commit
        self._busy = False  # a commit is between its flush and its callbacks
        self._thread: threading.Thread | None = None
        self.commits = 0  # fsync passes (each covers one batch of messages)
        self.records = 0

    def _dir(self, rnd: int) -> Path:
        return self.root / f"round-{rnd:04d}"

    def record(self, rnd: int, device: str, payload: bytes,
               then: Callable[[], None] | None = None) -> None:
        """Append ``payload``; ``then`` runs once it is on disk (this call waits for that
        when ``then`` is None)."""
        with self._lock:
            key = (rnd, device)
            f = self._files.get(key)
            if f is None:
                folder = self._dir(rnd) / device
                folder.mkdir(parents=True, exist_ok=True)
                f = self._files[key] = open(folder / f"{os.getpid()}.log", "ab")
                _fsync_dir(folder)  # the new file's name must survive a crash too
            f.write(_RECORD.pack(len(payload), zlib.crc32(payload)) + payload)
            self._dirty.add(key)
            self.records += 1
        self.after_commit(then)

    def after_commit(self, then: Callable[[], None] | None) -> None:
        """Run ``then`` once everything recorded so far is durable (at once if it is)."""
        if then is None:
            done = threading.Event()
            self.after_commit(done.set)
            done.wait()
            return
        with self._lock:
            if not self._dirty and not self._busy:
                run_now = True
            else:
                run_now = False
                self._callbacks.append(then)
                self._start()
                self._wake.notify()
        if run_now:
            then()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._committer, name="journal-commit",
                                            daemon=True)
            self._thread.start()

    def _committer(self) -> None:
        while True:
            with self._lock:
                while not self._callbacks:
                    if not self._wake.wait(timeout=5.0) and not self._callbacks:
                        self._thread = None  # idle: a later record starts another
                        return
                callbacks, self._callbacks = self._callbacks, []
                fds = []
                for key in self._dirty:
                    f = self._files[key]
                    f.flush()
                    fds.append(os.dup(f.fileno()))  # survives a drop() closing the file
                self._dirty.clear()
                self._busy = True
            try:
                for fd in fds:
                    os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
            self.commits += 1
            for cb in callbacks:
                try:
                    cb()
                except Exception:  # an ack that cannot go out must not stop later commits
                    log.exception("journal: a post-commit callback failed")
            with self._lock:
                self._busy = False

    def replay(self, rnd: int) -> Iterator[tuple[str, bytes]]:
        """(device, payload) in the order they were accepted, per device."""
        base = self._dir(rnd)
        if not base.is_dir():
            return
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.log"), key=lambda p: (p.stat().st_mtime_ns, p.name))
            for f in files:
                for payload in _records(f):
                    yield folder.name, payload

    def rounds(self) -> list[int]:
        """Round (async: upload) numbers that have something on disk, ascending."""
        if not self.root.is_dir():
            return []
        return sorted(int(d.name.split("-")[1]) for d in self.root.glob("round-*")
                      if any(f.stat().st_size for f in d.glob("*/*.log")))

    def _close(self, keep) -> None:
        for key in [k for k in self._files if not keep(k)]:
            self._files.pop(key).close()
            self._dirty.discard(key)

    def drop(self, upto: int) -> None:
        """Delete the journal of every round <= ``upto``."""
        with self._lock:
            self._close(lambda k: k[0] > upto)
        if not self.root.is_dir():
            return
        for d in self.root.glob("round-*"):
            if int(d.name.split("-")[1]) <= upto:
                shutil.rmtree(d, ignore_errors=True)

    def drop_device(self, rnd: int, device: str) -> None:
        with self._lock:
            self._close(lambda k: k != (rnd, device))
        shutil.rmtree(self._dir(rnd) / device, ignore_errors=True)


def _records(path: Path) -> Iterator[bytes]:
    """The log's intact records; stops at a torn or corrupt tail (never acknowledged)."""
    data = path.read_bytes()
    pos = 0
    while pos + _RECORD.size <= len(data):
        n, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size:pos + _RECORD.size + n]
        if len(payload) != n or zlib.crc32(payload) != crc:
            log.warning("journal %s: ignoring a torn record at byte %d (a crash mid-write; "
                        "it was never acknowledged)", path, pos)
            return
        yield payload
        pos += _RECORD.size + n


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def count_records(folder: Path) -> int:
    """Intact records in every log under ``folder`` (tests and tools look in with it)."""
    return sum(1 for f in Path(folder).rglob("*.log") for _ in _records(f))

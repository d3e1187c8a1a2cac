"""The upload journal: group commit (an ack only after the fsync that covers it), replay in
acceptance order, torn tails, and dropping rounds and devices. Real files, real fsync."""

from __future__ import annotations

import os
import threading
import time

from server_hub import journal as journal_mod
from server_hub.journal import UploadJournal, count_records

RECORD = 8 + 4  # length + crc32 + a 4-byte payload


def test_callbacks_run_only_after_the_fsync_that_covers_them(tmp_path, monkeypatch):
    events: list[tuple[str, int]] = []
    real_fsync = os.fsync
    lock = threading.Lock()

    def slow_fsync(fd):  # a slow disk: messages pile up while one fsync runs
        on_disk = os.fstat(fd).st_size // RECORD  # what this fsync makes durable
        time.sleep(0.02)
        real_fsync(fd)
        with lock:
            events.append(("fsync", on_disk))

    monkeypatch.setattr(journal_mod.os, "fsync", slow_fsync)
    j = UploadJournal(tmp_path)
    acked = threading.Event()
    n = 60
    for i in range(n):
        with lock:
            recorded = j.records + 1  # this message's position in the log
        j.record(0, "d", f"m{i:03d}".encode(),
                 then=lambda r=recorded: (events.append(("ack", r)),
                                          r == n and acked.set()))
        time.sleep(0.001)
    assert acked.wait(10)
    covered = 0  # records some finished fsync had on disk when it started
    for kind, value in events:
        if kind == "ack":
            assert value <= covered, "acknowledged before an fsync covered it"
        else:
            covered = max(covered, value)
    acks = [v for k, v in events if k == "ack"]
    assert sorted(acks) == list(range(1, n + 1))
    assert j.commits < n / 3  # one fsync covered many messages
    assert [p for _, p in j.replay(0)] == [f"m{i:03d}".encode() for i in range(n)]


def test_record_without_callback_is_durable_on_return(tmp_path):
    j = UploadJournal(tmp_path)
    j.record(3, "a", b"one")
    j.record(3, "b", b"two")
    assert count_records(tmp_path / "round-0003") == 2
    again = UploadJournal(tmp_path)  # a restarted hub
    assert sorted(again.replay(3)) == [("a", b"one"), ("b", b"two")]
    assert again.rounds() == [3]


def test_duplicate_ack_waits_for_a_pending_commit_and_runs_at_once_when_idle(tmp_path):
    j = UploadJournal(tmp_path)
    ran = threading.Event()
    j.after_commit(ran.set)  # nothing pending: runs now
    assert ran.is_set()
    order: list[str] = []
    done = threading.Event()
    j.record(0, "d", b"x", then=lambda: order.append("first"))
    j.after_commit(lambda: (order.append("dup"), done.set()))
    assert done.wait(5)
    assert order == ["first", "dup"]


def test_replay_stops_at_a_torn_tail(tmp_path):
    j = UploadJournal(tmp_path)
    for p in (b"a", b"bb", b"ccc"):
        j.record(1, "d", p)
    log_file = next((tmp_path / "round-0001" / "d").glob("*.log"))
    data = log_file.read_bytes()
    log_file.write_bytes(data[:-2])  # a crash in the middle of the last write
    assert [p for _, p in UploadJournal(tmp_path).replay(1)] == [b"a", b"bb"]


def test_drop_and_drop_device_close_and_delete(tmp_path):
    j = UploadJournal(tmp_path)
    j.record(0, "a", b"1")
    j.record(1, "a", b"2")
    j.record(1, "b", b"3")
    j.drop_device(1, "a")
    assert list(j.replay(1)) == [("b", b"3")]
    j.record(1, "a", b"4")  # the device's new upload starts a new log
    assert sorted(j.replay(1)) == [("a", b"4"), ("b", b"3")]
    j.drop(0)
    assert j.rounds() == [1]
    j.drop(1)
    assert j.rounds() == []

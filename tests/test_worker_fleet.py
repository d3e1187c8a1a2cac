"""Rank 0's view of the whole hub from the workers' counts (no network, no process group)."""

from __future__ import annotations

from types import SimpleNamespace

from server_hub.hub_status import HubStatus
from server_hub.workers.figures import WorkerFleet


def msg(kind: str, device: str, **meta) -> SimpleNamespace:
    """What the observer reads of an accepted message (the service validated it)."""
    return SimpleNamespace(kind=kind, device=device, round=0, meta=meta)


def service(received: int, sent: int, rejected: dict, uploads: dict | None = None):
    """A service whose status() the test changes (phase, uploads) between snapshots."""
    svc = SimpleNamespace(phase="collect", uploads=uploads or {})
    svc.status = lambda: HubStatus(
        "sync", 0, 3, svc.phase, 60.0, {"dev0": {"num_samples": 5}, "dev1": {"num_samples": 7}},
        dict(svc.uploads), dict(rejected), received, sent)
    return svc


def test_rank0_adds_the_other_workers_counts_and_merges_device_views():
    clock = iter(range(100, 200)).__next__
    rank0, rank1 = WorkerFleet(clock), WorkerFleet(clock)
    svc0 = service(1000, 50, {"bad_magic": 1}, {"dev0": False})
    svc1 = service(3000, 70, {"bad_magic": 2, "spoofed": 1})
    rank0.on_accepted("dev0", msg("hello", "dev0", codec="q8"), 100)
    rank0.on_accepted("dev0", msg("features", "dev0"), 400)
    rank1.on_accepted("dev0", msg("features", "dev0"), 500)
    rank1.on_accepted("dev0", msg("upload_done", "dev0", upload_id="u0", num_samples=5,
                                        device_metrics={"train_seconds": 2.0}), 60,
                       completed=("u0", 5))  # the worker intake's claimed_samples
    rank1.on_accepted("dev1", msg("hello", "dev1"), 90)  # dev1 seen by rank 1 only
    rank0.update([rank1.counts(svc1.status())], complete={}, started={"dev0"})
    s = rank0.snapshot(svc0)
    assert (s["bytes_received"], s["bytes_sent"]) == (4000, 120)
    assert s["rejected"] == {"bad_magic": 3, "spoofed": 1}
    assert s["samples_received"] == 5
    dev0, dev1 = s["devices"]
    assert (dev0["messages"], dev0["bytes_up"], dev0["codec"]) == (4, 960, "q8")
    assert dev0["train_seconds"] == 2.0  # reported through rank 1
    assert dev0["state"] == "uploading"  # a partial upload on rank 0, the rest elsewhere
    assert (dev1["id"], dev1["messages"], dev1["state"]) == ("dev1", 1, "training")
    # Once all workers' chunks complete dev0's upload, rank 0 shows it uploaded, and while
    # the server trains too; a new round forgets it.
    rank0.update([rank1.counts(svc1.status())], complete={"dev0"})
    assert rank0.snapshot(svc0)["devices"][0]["state"] == "uploaded"
    svc0.phase = "train"
    assert rank0.snapshot(svc0)["devices"][0]["state"] == "uploaded"
    svc0.phase, svc0.uploads = "collect", {}
    rank0.update(rank0.peers)
    assert rank0.snapshot(svc0)["devices"][0]["state"] == "training"
    assert rank0.snapshot(svc0)["bytes_received"] == 4000  # the peers' counts stay

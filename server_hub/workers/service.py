"""One of K hub workers that train one server model together (``gkt-hub serve --workers K``
or torchrun, see server_hub/workers/launch.py and docs/scaling.md).

Each worker runs the same ``RoundLoop`` (server_hub/rounds.py) as one hub, with its own
``UploadIntake`` on a shared MQTT subscription (``$share/GROUP/gkt/v1/dev/+/up``): the
broker hands every device message to one worker, which validates, stores, journals (its
own journal) and acknowledges it as one hub would. Rounds stay consistent through
collectives (``WorkerPeers``): while collecting, the workers all-gather what each holds
every ``poll`` seconds and rank 0 decides (deadline, extensions) and broadcasts the
decision; a device counts when the union of the workers' chunks completes its upload. Then
all ranks train with DDP (``DdpTrainer``, ddp_trainer.py), each sends the logits of the
samples it trained, they evaluate a share of the devices each, and rank 0 announces rounds
and writes the checkpoint. At the end rank 0 alone delivers the devices' models, as one hub
does (assembly/hub_run.py): their replies come on the unshared model topics, not ``up``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from edge_runtime.learning.perf import keep_freed_memory, to_channels_last
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from server_hub.checkpoint import latest_checkpoint, load_checkpoint, load_optimizer_state
from server_hub.hub import Evaluation, Hub
from server_hub.intake import NoDevicesError, UploadIntake
from server_hub.journal import UploadJournal
from server_hub.service import HubService, ServiceConfig, make_intake
from server_hub.trainer import (
    Rows,
    ServerStats,
    extractor_from_state,
    server_logits,
    split_accuracy,
)
from server_hub.workers.ddp_trainer import SampleTrace, Shard, train_server_ddp
from server_hub.workers.distributed import (
    MergedUpload,
    all_gather,
    broadcast,
    merge_uploads,
    owned_mask,
)
from server_hub.workers.figures import WorkerCounts, WorkerFleet, claimed_samples

log = logging.getLogger("gkt.hub")


@dataclass(frozen=True)
class WorkerConfig:
    """Hub workers' settings: subscription group, exchange period, seed, audit trace."""

    share_group: str = "gkt-hub"  # MQTT v5 shared-subscription group of the workers
    poll: float = 0.2  # seconds between the workers' round-state exchanges
    seed: int = 0
    trace_dir: str | None = None  # write each rank's trained (device, sample id) per epoch
    monitor: bool = False  # exchange traffic counts, so rank 0 can serve the whole hub's


def shared_up_filter(group: str) -> str:
    return f"$share/{group}/{topics.UP_WILDCARD}"


def share_group_for(password: str | None) -> str:
    """The workers' group name: secret where the broker has logins. Mosquitto 2.0 lets any
    client subscribe to any ``$share/...`` filter and checks read access only per message:
    an enrolled device in the workers' group receives nothing, but every message the broker
    hands to it is dropped. Derived from the hub's password, which every worker has and no
    device does (tests/test_workers_ops.py)."""
    if not password:
        return "gkt-hub"
    return "gkt-hub-" + hashlib.sha256(b"gkt share group\0" + password.encode()).hexdigest()[:16]


class WorkerPeers:
    """The workers' agreement: state exchanged through collectives, rank 0 decides."""

    def __init__(self, intake: UploadIntake, cfg: ServiceConfig, wcfg: WorkerConfig,
                 fleet: WorkerFleet | None) -> None:
        self.intake, self.cfg, self.wcfg, self.fleet = intake, cfg, wcfg, fleet
        self.hub = intake.hub
        self.rank = dist.get_rank()
        self.leads = self.rank == 0  # rank 0 announces, records and checkpoints
        self.log_prefix = f"rank {self.rank} "
        self.ddp: DistributedDataParallel | None = None
        self.merged: dict[str, MergedUpload] = {}  # the round's uploads, all workers

    def start(self) -> None:
        if self.hub.cfg.reuse_memory:
            keep_freed_memory()
        if self.hub.cfg.channels_last:  # before wrapping: DDP's buckets follow the layout
            to_channels_last(self.hub.model)
        dev = self.hub.device
        # No buffer broadcast before every forward: BN statistics are averaged once per
        # round instead (torch 2.14 renamed the option).
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        self.ddp = DistributedDataParallel(
            self.hub.model, device_ids=[dev.index] if dev.type == "cuda" else None,
            **{no_sync: False})
        self.intake.listen(shared_up_filter(self.wcfg.share_group))
        if self.rank == 0:
            self._scan_retained_hellos()
        log.info("rank %d: receiving uploads through the workers' shared subscription",
                 self.rank)  # not its name: where the broker has logins, it is a secret

    def stopping(self) -> bool:
        """A stop (SIGTERM) on any worker stops them all, as one hub's would."""
        if any(all_gather(self.intake.stopped.is_set())):
            self.intake.stopped.set()
        return self.intake.stopped.is_set()

    def restore(self) -> int:
        """Rank 0 reads the newest checkpoint and broadcasts it (other machines have none)."""
        state = None
        if self.rank == 0 and (found := latest_checkpoint(Path(self.cfg.state_dir))):
            ckpt = load_checkpoint(found)
            state = (ckpt.round, ckpt.server, ckpt.extractors, load_optimizer_state(found))
            log.info("resumed from %s (round %d)", found, ckpt.round)
        state = broadcast(state)
        if state is None:
            return 0
        rnd, server, extractors, opt = state
        self.hub.model.load_state_dict(server)
        self.hub.extractors = dict(extractors)
        if opt is not None:
            self.hub.optimizer.load_state_dict(opt)
        return rnd + 1

    def _scan_retained_hellos(self) -> None:
        """MQTT v5 (4.8.2) has brokers send no retained messages to a new shared
        subscription (Mosquitto 2.0 sends them anyway), so with a strict broker devices that
        said hello before the hub started would go unseen: read the retained hellos once
        with a plain subscription on a short-lived connection."""
        c = self.intake.link.cfg
        # a managed broker with logins takes user names as client ids: a worker's user
        # gkt-hub-K has a sibling gkt-hub-K-scan for this connection (broker/enrol.py)
        user = f"{c.username}-scan" if (c.username or "").startswith("gkt-hub-") else c.username
        scan = MqttLink(LinkConfig(c.url, f"{c.client_id}-scan", user, c.password,
                                   c.ca_file, c.cert_file, c.key_file, session_expiry=0,
                                   max_packet_size=c.max_packet_size))

        def on_up(topic: str, payload: bytes) -> None:
            if 0 < len(payload) <= 16384:  # a hello is small; skip decoding live uploads
                try:
                    kind = wire.decode_message(payload, max_bytes=16384).kind
                except wire.WireError:
                    kind = None  # counted by the worker that receives it
                if kind == "hello":
                    self.intake.on_up(topic, payload)

        try:
            scan.subscribe(topics.UP_WILDCARD, on_up)
            scan.connect()
            time.sleep(0.5)  # retained messages follow the SUBACK at once
        except ConnectionError as err:
            log.warning("could not read retained hellos: %s", err)
        finally:
            scan.close()

    def _sync(self) -> tuple[dict[str, MergedUpload], int, bool]:
        """All-gather what every rank holds; adopt the union of hellos, so a chunk from a
        device whose hello reached another worker is accepted here."""
        intake = self.intake
        with intake.cond:
            view = {"known": dict(intake.known), "stop": intake.stopped.is_set(),
                    "uploads": {d: {**asdict(u), "chunks": sorted(u.chunks)}
                                for d, u in intake.uploads.items()}}
        view["counts"] = self.peer_counts()
        views = all_gather(view)
        with intake.cond:
            for v in views:
                for d, hello in v["known"].items():
                    intake.known.setdefault(d, hello)
            intake.cond.notify_all()
        done, got = merge_uploads([v["uploads"] for v in views])
        if self.fleet and self.rank == 0:
            self.fleet.update([v["counts"] for v in views[1:]], done,
                              {d for v in views for d in v["uploads"]})
        return done, got, any(v["stop"] for v in views)

    def peer_counts(self) -> WorkerCounts | None:
        """This worker's traffic counts for rank 0's figures (rank 0 keeps its own)."""
        if not (self.fleet and self.rank):
            return None
        return self.fleet.counts(self.intake.status("sync", self.cfg.rounds,
                                                    self.cfg.round_deadline))

    def wait_for_devices(self, on_status) -> None:
        t_end = time.monotonic() + self.cfg.start_timeout
        while True:
            _, _, stop = self._sync()
            n = len(self.intake.known)  # may differ across ranks by now: rank 0's decides
            if self.rank == 0:
                on_status(f"waiting for devices: {n}/{self.cfg.min_devices}")
            ready, late = broadcast((n >= self.cfg.min_devices or stop,
                                     time.monotonic() > t_end))
            if ready:
                return
            if late:
                raise NoDevicesError(f"only {n} of {self.cfg.min_devices} devices joined "
                                     f"within {self.cfg.start_timeout:.0f}s")
            time.sleep(self.wcfg.poll)

    def open_round(self, rnd: int) -> None:
        self.intake.open_round(rnd)
        if self.fleet:  # last round's complete uploads are not this round's
            self.fleet.update(self.fleet.peers)
        dist.barrier()  # every worker takes round-rnd uploads before a device hears of it

    def view(self) -> tuple[dict[str, MergedUpload], int, bool]:
        done, got, stop = self._sync()
        if stop:
            self.intake.stopped.set()
        self.merged = done
        return done, got, stop

    def agree(self, decision: str | None) -> str:
        return broadcast(decision)  # rank 0's, decided on its clock

    def pause(self, view: tuple) -> None:
        time.sleep(self.wcfg.poll)

    def total_bytes_down(self, down: int) -> int:
        ends = all_gather((down, self.peer_counts()))
        if self.fleet and self.rank == 0:  # the round's figures include every worker's logits
            self.fleet.update([c for _, c in ends[1:]], self.merged)
        return sum(d for d, _ in ends)


class DdpTrainer:
    """The workers' server step (DDP over each rank's shard), logits and evaluation."""

    def __init__(self, intake: UploadIntake, peers: WorkerPeers, wcfg: WorkerConfig,
                 test_loader) -> None:
        self.intake, self.peers, self.wcfg = intake, peers, wcfg
        self.hub: Hub = intake.hub
        self.test_loader = test_loader
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.generator = torch.Generator().manual_seed(wcfg.seed * 1009 + self.rank)
        self._owned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> ids, H

    def _shard(self, done: dict[str, MergedUpload]) -> tuple[Shard, list[int], tuple]:
        """This rank's samples of the complete uploads, minus any a lower rank also holds.
        Features stay where the bank keeps them (memory-mapped when spilled), read a batch
        at a time."""
        devices = sorted(done)
        held = set(self.hub.bank.devices)
        uploads = self.intake.uploads
        mine = {d: self.hub.bank.get(d) for d in devices if d in held
                and getattr(uploads.get(d), "upload_id", None) == done[d].upload_id}
        ids_by_rank = all_gather({d: f.ids.numpy() for d, f in mine.items()})
        parts = []
        for i, d in enumerate(devices):
            if d in mine:
                keep = torch.from_numpy(owned_mask(ids_by_rank, self.rank, d))
                f = mine[d]
                keys = torch.stack([torch.full_like(f.ids[keep], i), f.ids[keep]], 1)
                feats = f.features if bool(keep.all()) else f.features[keep]  # no copy
                parts.append((d, keys, feats, f.logits[keep], f.labels[keep]))
        self._owned = {d: (k[:, 1], h) for d, k, h, _, _ in parts}
        shape = next((tuple(p[2].shape[1:]) for p in parts), None)
        counts_shapes = all_gather((sum(len(p[1]) for p in parts), shape))
        shape = next(s for _, s in counts_shapes if s is not None)
        ncls = self.hub.num_classes
        shard = Shard(
            torch.cat([p[1] for p in parts]) if parts else torch.empty(0, 2, dtype=torch.long),
            Rows([p[2] for p in parts] if parts else [torch.empty(0, *shape)]),
            torch.cat([p[3] for p in parts]) if parts else torch.empty(0, ncls),
            torch.cat([p[4] for p in parts]) if parts else torch.empty(0, dtype=torch.long))
        return shard, [c for c, _ in counts_shapes], shape

    def _gather_extractors(self, devices: list[str]) -> None:
        """Every rank gets every device's extractor (for its share of the evaluation, and
        so rank 0's checkpoint has them all)."""
        uploads = self.intake.uploads
        mine = {d: self.hub.extractors[d] for d in devices
                if d in self.hub.extractors and uploads.get(d) and uploads[d].extractor}
        for part in all_gather(mine):
            self.hub.extractors.update(part)

    def train(self, rnd: int, done: dict[str, MergedUpload]) -> tuple[ServerStats, str]:
        self._gather_extractors(sorted(done))
        shard, counts, shape = self._shard(done)
        trace = SampleTrace(sorted(done)) if self.wcfg.trace_dir else None
        stats = train_server_ddp(self.peers.ddp, self.hub.optimizer, shard, counts, shape,
                                 self.hub.cfg, self.generator, trace and trace.record)
        if trace:
            trace.write(Path(self.wcfg.trace_dir) / f"rank-{self.rank}.jsonl", rnd)
        return stats, f"{len(shard.labels)} of {stats.samples} samples here"

    def logits(self, devices: list[str]) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """The logits of the samples this rank trained, from this rank (a device's logits may
        come from several workers; it applies them by sample id)."""
        return {d: (ids.numpy(), server_logits(self.hub.model, feats))
                for d, (ids, feats) in self._owned.items()}

    def commit_features(self, devices: list[str], done: dict) -> None:
        """Workers hold no maps across rounds (each sees only some of a device's samples):
        their logits name no feature epoch, so devices keep sending full maps."""

    def evaluate(self, devices: list[str]) -> Evaluation:
        share = [d for d in devices[self.rank::self.world] if d in self.hub.extractors]
        mine = {d: split_accuracy(extractor_from_state(self.hub.extractors[d]), self.hub.model,
                                  self.test_loader) for d in share}
        merged: dict[str, float] = {}
        for part in all_gather(mine):
            merged.update(part)
        return Evaluation(dict(sorted(merged.items())))


class WorkerService(HubService):
    """One hub worker: a ``HubService`` whose intake listens on the shared subscription and
    whose round loop runs with the workers' peers and DDP trainer."""

    def __init__(self, link: MqttLink, hub: Hub, cfg: ServiceConfig, data_cfg, test_loader,
                 wcfg: WorkerConfig, on_round=None, on_status=None) -> None:
        self.rank = dist.get_rank()
        journal = UploadJournal(Path(cfg.state_dir) / "uploads" / f"rank-{self.rank}")
        intake = make_intake(link, hub, cfg, data_cfg, journal)
        intake.completed = partial(claimed_samples, intake)
        self.fleet = WorkerFleet() if wcfg.monitor else None
        if self.fleet:  # on rank 0 also the metrics' and status page's source
            intake.observers.append(self.fleet)
        peers = WorkerPeers(intake, cfg, wcfg, self.fleet)
        # rank 0 alone announces: the hub speaks to devices with one voice
        self.assemble(link, hub, cfg, data_cfg, intake, peers,
                      DdpTrainer(intake, peers, wcfg, test_loader), on_round, on_status,
                      speaks=self.rank == 0)

"""Server training across hub workers: DistributedDataParallel over uneven shards.

Each worker holds the features that reached it (a shared subscription spreads device
messages over the workers), so shards differ in size and may be empty. Every worker runs
the same number of steps per epoch, ``S = ceil(N / batch_size)`` for the N samples of all
workers together, and splits its own shuffled samples into S near-equal parts: each
sample is trained on exactly once per epoch, with no padding and no repeats.

A worker's loss is its part's *summed* loss times ``W / B_s`` (W workers, B_s samples in
step s on all of them), so after DDP's gradient average every step follows the mean loss
over its global batch of about ``batch_size`` samples, as one worker would. A worker with
no sample in a step runs a zero-weight forward in eval mode (DDP needs every worker in
every all-reduce; eval mode leaves BatchNorm statistics alone).

Why not DDP's ``join()``: a rank that joins early shadows the all-reduces but skips its
optimizer steps, so Adam's moments (and then the weights) would drift apart across ranks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from server_hub.trainer import Rows, ServerStats, ServerTrainConfig, server_autocast, server_step


@dataclass
class Shard:
    """The samples this worker trains on; ``keys`` = (device index, sample id) per sample."""

    keys: torch.Tensor  # int64 [n, 2]
    features: torch.Tensor | Rows  # [n, 16, S, S]; Rows keeps memory-mapped ones on disk
    logits: torch.Tensor  # [n, C]
    labels: torch.Tensor  # int64 [n]


def step_sizes(n: int, steps: int) -> list[int]:
    """``n`` samples over ``steps`` steps, sizes differing by at most one."""
    q, r = divmod(n, steps)
    return [q + (i < r) for i in range(steps)]


def plan_steps(counts: list[int], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Per-rank step sizes and the global size of every step, for shard sizes ``counts``."""
    steps = max(1, math.ceil(sum(counts) / batch_size))
    per_rank = [step_sizes(c, steps) for c in counts]
    return per_rank, [sum(col) for col in zip(*per_rank)]


def train_server_ddp(
    model: nn.Module,  # DistributedDataParallel-wrapped server model
    optimizer: torch.optim.Optimizer,
    shard: Shard,
    counts: list[int],  # every rank's shard size (the same list on all ranks)
    feature_shape: tuple[int, ...],
    cfg: ServerTrainConfig,
    generator: torch.Generator,
    on_step: Callable[[int, torch.Tensor], None] | None = None,  # (epoch, keys trained)
) -> ServerStats:
    """``cfg.epochs`` passes over every worker's shard; collective, call on all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = next(model.parameters()).device
    per_rank, global_sizes = plan_steps(counts, cfg.batch_size)
    mine = per_rank[rank]
    dummy = torch.zeros(1, *feature_shape, device=dev)
    h, y, z_c = shard.features, shard.labels, shard.logits.float()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * samples, correct, samples
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y), generator=generator)
        start = 0
        for b, b_all in zip(mine, global_sizes):
            idx = order[start : start + b]
            start += b
            if b:
                hb, yb = h[idx].float().to(dev, non_blocking=True), y[idx].to(dev)
                # the mean loss of b samples, weighted b x W / B_s: see the module docstring
                loss, z_s = server_step(model, optimizer, cfg, hb, yb, z_c[idx].to(dev),
                                        scale=b * world / b_all)
                sums += torch.tensor([float(loss) * b,
                                      int((z_s.argmax(1) == yb).sum()), b], dtype=torch.float64)
                if on_step is not None:
                    on_step(epoch, shard.keys[idx])
            else:  # nothing here this step: a zero-weight forward for DDP's all-reduce
                model.eval()
                with server_autocast(cfg, dev):
                    loss = model(dummy).sum() * 0.0
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    model.train()
    dist.all_reduce(sums)
    average_batchnorm_stats(model)
    seen = max(float(sums[2]), 1.0)
    return ServerStats(float(sums[0]) / seen, float(sums[1]) / seen, sum(counts), cfg.epochs)


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module) -> None:
    """Average BatchNorm running statistics over the ranks (each saw only its own batches;
    DDP keeps them per rank here, ``broadcast_buffers=False``), so every worker's model is
    the same for logits, evaluation and the checkpoint."""
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if bufs:  # one all-reduce for all of them, not one per layer
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))
    for b in model.buffers():  # num_batches_tracked: the same step count on every rank
        if not b.is_floating_point():
            dist.broadcast(b, 0)


class SampleTrace:
    """(device, sample id) of every sample this rank trained, per epoch: the audit that each
    upload is trained on exactly once per epoch."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices
        self.epochs: dict[int, list[list]] = {}

    def record(self, epoch: int, keys: torch.Tensor) -> None:
        self.epochs.setdefault(epoch, []).extend(
            [self.devices[int(d)], int(i)] for d, i in keys.tolist())

    def write(self, path: Path, rnd: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for epoch, samples in sorted(self.epochs.items()):
                f.write(json.dumps({"round": rnd, "epoch": epoch, "samples": samples}) + "\n")

"""Hub workers' pieces: the DDP trainer over uneven shards (2 gloo processes), the merges."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from server_hub.rounds import round_decision
from server_hub.trainer import ServerTrainConfig
from server_hub.workers.ddp_trainer import Shard, plan_steps, step_sizes, train_server_ddp
from server_hub.workers.distributed import merge_uploads, owned_mask

SHAPE = (16, 2, 2)


def tiny_model(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)] if bn else [nn.Conv2d(16, 8, 1)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 4, 10))


def make_shard(n: int, device: int, seed: int) -> Shard:
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) * 10 + device
    return Shard(torch.stack([torch.full((n,), device), ids], 1),
                 torch.randn(n, *SHAPE, generator=g), torch.zeros(n, 10),
                 torch.randint(0, 10, (n,), generator=g))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from server_hub.workers.distributed import init_group

    torch.set_num_threads(1)
    init_group("gloo", init, rank, world)
    cfg = ServerTrainConfig(epochs=3, batch_size=8, channels_last=False)
    result = {}
    # Uneven shards, one of them empty: [29, 0] then [3, 26] samples.
    for case, counts in (("empty", [29, 0]), ("small", [3, 26])):
        model = tiny_model()
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
        seen: dict[int, list] = {}
        shard = make_shard(counts[rank], rank, seed=rank)
        stats = train_server_ddp(ddp, opt, shard, counts, SHAPE, cfg,
                                 torch.Generator().manual_seed(rank),
                                 lambda e, k, seen=seen: seen.setdefault(e, []).extend(k.tolist()))
        flat = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()
                          if p.is_floating_point()])
        result[case] = {"seen": seen, "params": flat.tolist(), "samples": stats.samples,
                        "loss": stats.loss}
    # One global step over all samples with SGD, no BN: the same update as one process
    # over the same samples, whatever the split.
    counts = [5, 11]
    model = tiny_model(bn=False)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    full = make_shard(sum(counts), 0, seed=7)
    lo = sum(counts[:rank])
    part = Shard(*(t[lo:lo + counts[rank]] for t in (full.keys, full.features, full.logits,
                                                   full.labels)))
    train_server_ddp(ddp, opt, part, counts, SHAPE,
                     ServerTrainConfig(epochs=1, batch_size=64, channels_last=False),
                     torch.Generator().manual_seed(0))
    result["sgd"] = [p.detach().reshape(-1).tolist() for p in model.parameters()]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, f"file://{out}/pg", str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case,counts", [("empty", [29, 0]), ("small", [3, 26])])
def test_every_sample_once_per_epoch_on_uneven_shards(ranks, case, counts):
    for epoch in range(3):
        trained = [tuple(k) for r in ranks for k in r[case]["seen"].get(str(epoch), [])]
        assert len(trained) == sum(counts)  # no repeats, no padding
        expected = {(d, i * 10 + d) for d, n in enumerate(counts) for i in range(n)}
        assert set(trained) == expected
    assert ranks[0][case]["samples"] == sum(counts)
    assert ranks[0][case]["loss"] == pytest.approx(ranks[1][case]["loss"])


@pytest.mark.parametrize("case", ["empty", "small"])
def test_workers_end_with_the_same_model(ranks, case):
    assert ranks[0][case]["params"] == ranks[1][case]["params"]  # BN statistics included


def test_one_ddp_step_equals_one_process_step(ranks):
    model = tiny_model(bn=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    full = make_shard(16, 0, seed=7)
    loss = nn.functional.cross_entropy(model(full.features), full.labels)
    loss.backward()
    opt.step()
    for got, want in zip(ranks[0]["sgd"], model.parameters()):
        assert torch.allclose(torch.tensor(got), want.detach().reshape(-1), atol=1e-6)
    assert ranks[0]["sgd"] == ranks[1]["sgd"]


def test_step_plan():
    assert step_sizes(7, 3) == [3, 2, 2] and step_sizes(1, 3) == [1, 0, 0]
    per_rank, sizes = plan_steps([10, 0, 3], 4)  # ceil(13 / 4) = 4 steps on every rank
    assert per_rank == [[3, 3, 2, 2], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert sizes == [4, 4, 3, 2]


def view(uid, chunks, expected=3, extractor=False, done=False, nbytes=10, acc=None):
    return {"upload_id": uid, "chunks": chunks, "expected": expected, "extractor": extractor,
            "done": done, "bytes": nbytes, "edge_accuracy": acc}


def test_an_upload_split_over_workers_is_complete_only_as_a_union():
    a = {"d0": view("r0-a", [0, 2], extractor=True), "d1": view("r0-x", [0, 1, 2])}
    b = {"d0": view("r0-a", [1], done=True, acc=0.5), "d1": view("r0-x", [], done=True)}
    done, got = merge_uploads([a, b])
    assert set(done) == {"d0"}  # d1 has no extractor anywhere
    assert done["d0"].upload_id == "r0-a" and done["d0"].bytes == 20
    assert done["d0"].edge_accuracy == 0.5 and got == 40
    # Chunks of two different uploads of one device do not add up.
    c = {"d0": view("r0-b", [1], done=True)}
    assert merge_uploads([a, c])[0] == {}


def test_a_sample_held_twice_is_trained_by_the_lower_rank():
    ids = [{"d": np.array([1, 2, 3])}, {"d": np.array([3, 4]), "e": np.array([9])}]
    assert owned_mask(ids, 0, "d").tolist() == [True, True, True]
    assert owned_mask(ids, 1, "d").tolist() == [False, True]
    assert owned_mask(ids, 1, "e").tolist() == [True]


def test_round_decision_follows_the_single_hub_rules():
    assert round_decision(2, True, 2, False, True) == "go"
    assert round_decision(1, False, 1, False, True) == "wait"
    assert round_decision(1, False, 1, True, True) == "go"
    assert round_decision(0, False, 1, True, True) == "extend"
    assert round_decision(1, False, 2, True, False) == "go"
    assert round_decision(0, False, 1, True, False) == "fail"

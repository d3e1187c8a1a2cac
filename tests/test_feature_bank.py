"""The feature bank spilled to disk behaves as the in-memory one; Rows gathers batches; the
async hub's spilled bank trains as the in-memory one and keeps one file per device."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_runtime.learning.models import FeatureExtractor
from edge_runtime.protocol import wire
from server_hub.async_mode.hub import AsyncHub
from server_hub.async_mode.rules import AsyncConfig
from server_hub.feature_bank import DeviceFeatures, FeatureBank
from server_hub.hub import Hub
from server_hub.trainer import Rows, ServerTrainConfig


def chunk(ids, seed, size=4):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    return DeviceFeatures(torch.tensor(ids), torch.rand((n, 16, size, size), generator=g),
                          torch.rand((n, 10), generator=g), torch.tensor(ids) % 10)


def test_spilled_bank_matches_memory_bank_with_resends_and_out_of_order(tmp_path):
    banks = [FeatureBank(), FeatureBank(tmp_path / "spill")]
    # out of order, one sample re-sent with new values (last write wins), a later chunk
    # after a get() (appends to the compacted file)
    steps = [("a", [5, 6, 7], 0), ("a", [0, 1, 2], 1), ("b", [9], 2), ("a", [6], 3)]
    for b in banks:
        for d, ids, seed in steps[:3]:
            b.add(d, chunk(ids, seed))
        b.get("a")
        b.add(*steps[3][:1], chunk(steps[3][1], steps[3][2]))
    mem, disk = (b.get("a") for b in banks)
    assert disk.ids.tolist() == [0, 1, 2, 5, 6, 7]
    for f in ("ids", "features", "logits", "labels"):
        assert torch.equal(getattr(mem, f), getattr(disk, f)), f
    assert torch.equal(disk.features[4], chunk([6], 3).features[0])  # the re-sent one
    assert (tmp_path / "spill" / "a.features").stat().st_size == 6 * 16 * 4 * 4 * 4
    assert banks[1].resident_feature_bytes() == 0 < banks[0].resident_feature_bytes()
    banks[1].clear("a")
    assert not (tmp_path / "spill" / "a.features").exists()
    assert banks[1].devices == ["b"] and banks[1].num_samples() == 1


def test_rows_gathers_across_devices_like_a_concatenation():
    parts = [torch.rand(3, 2), torch.rand(0, 2), torch.rand(5, 2).double()]
    rows = Rows(parts)
    idx = torch.tensor([7, 0, 3, 2, 4])
    assert len(rows) == 8
    assert torch.equal(rows[idx], torch.cat([p.float() for p in parts])[idx])


def test_move_renames_the_spill_file_into_the_destination(tmp_path):
    src, dest = FeatureBank(tmp_path / "in"), FeatureBank(tmp_path / "in" / "merged")
    mem_src, mem_dest = FeatureBank(), FeatureBank()
    for b in (src, mem_src):
        b.add("a", chunk([3, 4], 0))
        b.add("a", chunk([0, 1, 2], 1))  # out of order: compacted before the move
    old = src.get("a")
    inode = (tmp_path / "in" / "a.features").stat().st_ino
    moved, mem_moved = src.move("a", dest), mem_src.move("a", mem_dest)
    assert not (tmp_path / "in" / "a.features").exists() and src.devices == []
    assert (tmp_path / "in" / "merged" / "a.features").stat().st_ino == inode  # not copied
    for f in ("ids", "features", "logits", "labels"):
        assert torch.equal(getattr(moved, f), getattr(mem_moved, f)), f
        assert torch.equal(getattr(dest.get("a"), f), getattr(old, f)), f
    assert mem_src.devices == [] and mem_dest.devices == ["a"]
    # the device's next upload replaces the file; the old mapping stays readable meanwhile
    src.add("a", chunk([7], 2))
    src.move("a", dest)
    assert dest.get("a").ids.tolist() == [7] and torch.equal(old.ids, torch.tensor([0, 1, 2, 3, 4]))
    assert torch.equal(old.features[0], chunk([0, 1, 2], 1).features[0])
    assert [p.name for p in (tmp_path / "in" / "merged").iterdir()] == ["a.features"]
    assert (tmp_path / "in" / "merged" / "a.features").stat().st_size == 16 * 4 * 4 * 4


def test_replace_in_memory_keeps_the_callers_tensor_when_already_in_id_order():
    bank, c = FeatureBank(), chunk([0, 1, 2], 0)
    assert bank.replace("a", c).features is c.features
    assert bank.replace("a", chunk([5, 4], 1)).ids.tolist() == [4, 5] and bank.num_samples() == 2


def deleted_spill_mappings(root: Path) -> list[str]:
    """Spill files this process still maps although they were deleted (disk not freed)."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if str(root) in line and line.endswith("(deleted)")]


def test_spilled_async_hub_trains_as_in_memory_and_keeps_one_file_per_device(tmp_path):
    torch.set_num_threads(1)
    spill = tmp_path / "state" / "features"
    cfg = ServerTrainConfig(batch_size=4, device="cpu")
    hubs = [AsyncHub(Hub(10, cfg, seed=0, feature_dir=d), AsyncConfig(max_updates=100))
            for d in (None, spill)]
    ext = FeatureExtractor().state_dict()
    # device a's second upload re-sends sample 1 and arrives out of order; b uploads once
    uploads = [("a", 0, [[0, 1, 2], [3, 4]]), ("b", 0, [[10, 11, 12]]), ("a", 1, [[5, 6], [1]])]
    losses = [[], []]
    for k, (device, update, chunks) in enumerate(uploads):
        for ah, loss in zip(hubs, losses):
            for i, ids in enumerate(chunks):  # what the service's receive path does
                ah.hub.receive_features(device, chunk(ids, 10 * k + i, size=8))
            ah.merge(device, ah.hub.bank, ext, update)
            loss.append(ah.train_steps(3))
    assert losses[0] == losses[1] and None not in losses[0]
    mem, disk = hubs
    assert disk.bank_samples == mem.bank_samples == 6  # a: 1, 5, 6; b: 10, 11, 12
    for d in ("a", "b"):
        m, s = mem.take_logits(d), disk.take_logits(d)
        assert m[0] == s[0] and torch.equal(m[1], s[1]) and torch.equal(m[2], s[2])
    assert disk.slots["a"].features.ids.tolist() == [1, 5, 6]
    assert disk.bank.resident_feature_bytes() == 0 < mem.bank.resident_feature_bytes()
    assert disk.hub.bank.devices == [] and not list(spill.glob("*.features"))  # moved
    files = sorted(p.name for p in (spill / "merged").iterdir())
    assert files == ["a.features", "b.features"]  # a's first upload's file is gone
    assert (spill / "merged" / "a.features").stat().st_size == 3 * 16 * 8 * 8 * 4
    assert deleted_spill_mappings(tmp_path) == []  # ... and no longer mapped: disk freed


def test_async_service_with_a_state_dir_spills_each_devices_newest_upload(tmp_path):
    from test_async_service import FakeLink, hello, send, upload

    from server_hub.async_mode.service import AsyncHubService
    from server_hub.service import ServiceConfig

    torch.set_num_threads(1)
    spill = tmp_path / "features"
    hub = Hub(10, ServerTrainConfig(batch_size=8, device="cpu"), feature_dir=spill)
    svc = AsyncHubService(FakeLink(), hub, ServiceConfig(str(tmp_path)),
                          AsyncConfig(max_updates=5), None, None)
    send(svc, "d", [hello("d")] + upload("d", 0))
    send(svc, "d", upload("d", 1, seed=1)[:1])  # update 1 half-way: its chunk is spilled
    assert (spill / "d.features").exists() and svc.ahub.slots["d"].update == 0
    send(svc, "d", upload("d", 1, seed=1)[1:])
    assert svc.merged == {"d": 1} and svc.ahub.train_steps(1) is not None
    assert not (spill / "d.features").exists()  # moved into merged/, nothing left behind
    assert [p.name for p in (spill / "merged").iterdir()] == ["d.features"]
    sent = upload("d", 1, seed=1)[0]
    got = svc.ahub.slots["d"].features.features
    assert torch.equal(got, torch.from_numpy(wire.decode_message(sent, max_bytes=1 << 20)
                                             .tensors["features"]))
    assert svc.ahub.bank.resident_feature_bytes() == 0
    assert deleted_spill_mappings(tmp_path) == []

"""The feature bank spilled to disk behaves as the in-memory one; Rows gathers batches."""

from __future__ import annotations

import torch

from server_hub.feature_bank import DeviceFeatures, FeatureBank
from server_hub.trainer import Rows


def chunk(ids, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    return DeviceFeatures(torch.tensor(ids), torch.rand((n, 16, 4, 4), generator=g),
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

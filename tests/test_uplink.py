"""Feature refresh: the device's copy of what the hub holds and the hub's own copy stay equal
through every policy, resyncs, restarts of either side and skipped rounds. Real codecs,
real wire messages, real files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime.device.refresh import FeatureMirror
from edge_runtime.learning.train import FeatureBatch
from edge_runtime.protocol import wire
from edge_runtime.protocol.messages import feature_chunk, parse_feature_chunk
from edge_runtime.protocol.refresh_policy import RefreshPolicy
from server_hub.uplink.held import HeldFeatures, Resync

IDS = np.arange(3, 43, dtype=np.int64) * 7  # sorted, not contiguous
DEV = "dev0"


def batches(feats: np.ndarray, size: int = 16):
    for s in range(0, len(IDS), size):
        ids = torch.from_numpy(IDS[s:s + size])
        yield FeatureBatch(ids, torch.from_numpy(feats[s:s + size]),
                           torch.randn(len(ids), 10), torch.zeros(len(ids), dtype=torch.int64))


def upload(mirror: FeatureMirror, held: HeldFeatures, feats: np.ndarray, digest: str,
           policy: RefreshPolicy, codec: str = "q8") -> tuple[int, str | None]:
    """One upload through the wire into the hub; (bytes, epoch the hub now holds)."""
    ids, maps, nbytes = [], [], 0
    for p in mirror.plan(batches(feats), digest, codec, policy):
        payload = feature_chunk(DEV, 0, "u:0", 0, 1, p.batch, p.codec, rows=p.rows, base=p.base)
        nbytes += len(payload)
        chunk = parse_feature_chunk(wire.decode_message(payload, max_bytes=1 << 24))
        maps.append(held.reconstruct(DEV, chunk))  # Resync propagates
        ids.append(chunk.ids)
    held.commit(DEV, torch.cat(ids), torch.cat(maps), mirror.pending_epoch)
    mirror.confirm(held.epoch(DEV))
    return nbytes, held.epoch(DEV)


def features(seed: int, scale: float = 1.0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.maximum(g.normal(size=(len(IDS), 16, 8, 8)), 0).astype(np.float32) * scale


def assert_same(mirror: FeatureMirror, held: HeldFeatures) -> None:
    assert mirror.epoch == held.epoch(DEV)
    if mirror.values is not None:
        probe = feature_chunk(DEV, 0, "c:0", 0, 1, _probe(), "q8",
                              rows=np.empty(0, np.int64), base=mirror.epoch)
        hub = held.reconstruct(DEV, parse_feature_chunk(wire.decode_message(
            probe, max_bytes=1 << 24)))
        np.testing.assert_array_equal(hub.numpy(), mirror.values)


def _probe() -> FeatureBatch:
    ids = torch.from_numpy(IDS)
    return FeatureBatch(ids, torch.zeros(0, 16, 8, 8), torch.zeros(len(IDS), 10),
                        torch.zeros(len(IDS), dtype=torch.int64))


@pytest.mark.parametrize("spec", ["full", "freeze:1", "drift:0.05", "delta",
                                  "drift:0.02+delta"])
def test_device_and_hub_copies_stay_equal_across_rounds(spec):
    policy = RefreshPolicy.parse(spec)
    mirror, held = FeatureMirror(IDS), HeldFeatures()
    base = features(0)
    sizes = []
    for rnd in range(4):
        drifted = base + 0.03 * rnd * features(rnd + 1)  # the extractor keeps moving
        n, _ = upload(mirror, held, drifted, f"x{rnd}", policy)
        sizes.append(n)
        assert_same(mirror, held)
    n, _ = upload(mirror, held, drifted, "x3", policy)  # same extractor: nothing to resend
    assert n < sizes[0] / 10  # ids, labels, logits and headers only
    if policy.delta:  # residuals feed the quantization error back: the copy converges
        err = np.abs(mirror.values - drifted).max()
        assert err < np.abs(drifted).max() / 255


def test_a_chunk_on_another_epoch_is_refused_and_a_full_upload_recovers():
    policy = RefreshPolicy.parse("drift:0.05+delta")
    mirror, held = FeatureMirror(IDS), HeldFeatures()
    upload(mirror, held, features(0), "a", policy)
    other = FeatureMirror(IDS)  # a device that lost its state (or a hub restored to older maps)
    other.epoch, other.digest, other.values = "stale-epoch", "z", features(9)
    with pytest.raises(Resync):
        upload(other, held, features(1), "b", policy)
    other.invalidate()  # what the agent does on an ack with resync
    upload(other, held, features(1), "b", policy)
    assert_same(other, held)


def test_an_unconfirmed_upload_keeps_the_old_copy_on_both_sides():
    """A skipped round: the device uploaded, the hub never committed it."""
    policy = RefreshPolicy.parse("drift:0.01")
    mirror, held = FeatureMirror(IDS), HeldFeatures()
    upload(mirror, held, features(0), "a", policy)
    before = held.epoch(DEV)
    list(mirror.plan(batches(features(1)), "b", "q8", policy))  # sent, never applied
    mirror.confirm(held.epoch(DEV))  # the logits name the epoch the hub still holds
    assert mirror.epoch == before
    assert_same(mirror, held)
    upload(mirror, held, features(1), "b", policy)
    assert_same(mirror, held)


def test_both_sides_survive_restarts(tmp_path):
    policy = RefreshPolicy.parse("delta")
    mirror, held = FeatureMirror(IDS), HeldFeatures(tmp_path / "hub")
    upload(mirror, held, features(0), "a", policy)
    upload(mirror, held, features(0) + 0.1 * features(1), "b", policy)
    maps_file = tmp_path / "hub" / f"{DEV}.maps"
    written = maps_file.stat().st_mtime_ns
    n, _ = upload(mirror, held, features(0) + 0.1 * features(1), "b", policy)  # unchanged
    assert maps_file.stat().st_mtime_ns == written  # only the epoch file was rewritten
    mirror.save(tmp_path / "dev")
    mirror2, held2 = FeatureMirror(IDS), HeldFeatures(tmp_path / "hub")  # both restarted
    mirror2.load(tmp_path / "dev")
    assert mirror2.epoch == held2.epoch(DEV) == mirror.epoch
    assert_same(mirror2, held2)
    upload(mirror2, held2, features(0) + 0.2 * features(1), "c", policy)
    assert_same(mirror2, held2)


def test_a_hub_crash_mid_commit_leaves_no_epoch(tmp_path):
    mirror, held = FeatureMirror(IDS), HeldFeatures(tmp_path)
    upload(mirror, held, features(0), "a", RefreshPolicy.parse("freeze:1"))
    (tmp_path / f"{DEV}.maps").write_bytes(b"torn")  # maps rewritten, epoch never written
    assert HeldFeatures(tmp_path).epoch(DEV) is None  # the device's next upload must be full


def test_policy_specs():
    assert RefreshPolicy.parse("freeze:2+drift:0.1+delta") == RefreshPolicy(2, 0.1, True)
    assert RefreshPolicy.parse("full") == RefreshPolicy()
    for bad in ("freeze:0", "drift:-1", "delta:3", "sometimes"):
        with pytest.raises(ValueError, match="refresh policy"):
            RefreshPolicy.parse(bad)


def test_extraction_is_deterministic_and_freezing_keeps_the_maps_bit_identical():
    from edge_runtime.device.edge_device import EdgeDevice
    from edge_runtime.learning.data import DataConfig
    from edge_runtime.learning.train import EdgeTrainConfig
    from server_hub.simulation.inproc import FederationConfig, prepare

    setup = prepare(FederationConfig(data=DataConfig("digits", augment=True), devices=2))
    assert setup.train_eval is not setup.train  # extraction reads the un-augmented copy
    dev = EdgeDevice("d", setup.train, setup.train_eval, setup.shards[0][:96], 10,
                     EdgeTrainConfig(batch_size=32))

    def maps():
        return torch.cat([b.features for b in dev.features()])

    first, digest = maps(), dev.extractor_digest()
    assert torch.equal(first, maps())  # same weights, same maps, bit for bit
    dev.train(freeze_extractor=True)  # the classifier learns; the extractor must not move
    assert dev.extractor_digest() == digest
    assert torch.equal(first, maps())
    dev.train()
    assert dev.extractor_digest() != digest
    assert not torch.equal(first, maps())

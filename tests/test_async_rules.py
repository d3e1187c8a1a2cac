"""Asynchronous GKT's pure rules (staleness, scheduling), the throttle, the fleet options,
and the transport-free AsyncHub, including a device that vanishes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from edge_runtime.device.throttle import (
    DeviceSpeed,
    Throttle,
    compute_delay,
    parse_bandwidth,
    transfer_delay,
)
from server_hub.async_mode.hub import AsyncHub
from server_hub.async_mode.rules import (
    AsyncConfig,
    due_devices,
    finished,
    should_evaluate,
    staleness_weight,
    steps_for,
)
from server_hub.feature_bank import DeviceFeatures
from server_hub.hub import Hub
from server_hub.simulation.speeds import build_fleet, parse_speeds, profile_speeds
from server_hub.trainer import ServerTrainConfig, server_logits


def test_staleness_weight_decays_then_drops():
    assert staleness_weight(0, 0.9, 5) == 1.0
    assert staleness_weight(3, 0.9, 5) == pytest.approx(0.729)
    assert staleness_weight(5, 0.9, 5) == pytest.approx(0.9**5)
    assert staleness_weight(6, 0.9, 5) == 0.0
    assert staleness_weight(1000, 1.0, 0) == 1.0  # max_staleness 0: never dropped
    with pytest.raises(ValueError, match="age"):
        staleness_weight(-1, 0.9, 5)


def test_steps_and_due_devices():
    assert steps_for(100, 32, 1.0) == 4
    assert steps_for(100, 32, 0.5) == 2
    assert steps_for(0, 32, 1.0) == 1
    waiting = {"a": 10, "b": 3, "c": 12}
    assert due_devices(waiting, 12, 2) == ["b", "a"]  # oldest first; c is 0 steps old
    assert due_devices(waiting, 14, 2) == ["b", "a", "c"]
    assert due_devices({}, 99, 1) == []


def test_evaluation_and_stopping_rules():
    by_count = AsyncConfig(eval_every=3, max_updates=10)
    assert not should_evaluate(by_count, 2, 0, 100.0, 0.0)
    assert should_evaluate(by_count, 3, 0, 0.0, 0.0)
    by_time = AsyncConfig(eval_seconds=5.0, duration=60.0)
    assert not should_evaluate(by_time, 4, 1, 4.0, 0.0)
    assert should_evaluate(by_time, 4, 1, 5.0, 0.0)
    assert not should_evaluate(by_time, 4, 4, 50.0, 0.0)  # nothing new merged
    assert finished(by_count, 10, 0.0) and not finished(by_count, 9, 1e9)
    assert finished(by_time, 0, 60.0) and not finished(by_time, 10**6, 59.0)
    with pytest.raises(ValueError, match="stopping rule"):
        AsyncConfig()
    with pytest.raises(ValueError, match="decay"):
        AsyncConfig(decay=0.0, max_updates=1)


def test_throttle_delays_and_bandwidth_parsing():
    assert compute_delay(2.0, 5.0) == 8.0 and compute_delay(2.0, 1.0) == 0.0
    assert transfer_delay(1_000_000, 2e6) == 0.5 and transfer_delay(10, 0) == 0.0
    assert parse_bandwidth("400K") == 4e5 and parse_bandwidth("2.5MB") == 2.5e6
    assert parse_bandwidth("0") == 0.0 and parse_bandwidth("1g") == 1e9
    with pytest.raises(ValueError, match="bytes/s"):
        parse_bandwidth("fast")
    with pytest.raises(ValueError, match=">= 1"):
        DeviceSpeed(0.5)
    th = Throttle(DeviceSpeed(3.0, 1e6))
    t0 = time.perf_counter()
    th.run(lambda: time.sleep(0.05))  # 0.05 s of "work" takes 3x as long
    th.transfer(50_000)  # + 0.05 s on a 1 MB/s link
    assert time.perf_counter() - t0 >= 0.19
    assert 0.149 <= th.slept < 0.5  # 2x the measured work + 0.05 s; sleep overshoots under load
    stop = threading.Event()
    stop.set()
    quick = Throttle(DeviceSpeed(1.0, 1.0), stop)  # a device shutting down does not sleep on
    t0 = time.perf_counter()
    quick.transfer(10**6)
    assert time.perf_counter() - t0 < 1.0


def test_fleet_options():
    assert parse_speeds("2", 3) == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="2 values for 4 devices"):
        parse_speeds("1,5", 4)
    rpi, jetson = profile_speeds("rpi4b,jetson-orin-nano", 2)  # family id, exact id
    assert jetson == 1.0 and rpi == pytest.approx(163.2 / 57.6)
    with pytest.raises(ValueError, match="no device"):
        profile_speeds("toaster", 1)
    fleet = build_fleet(4, "1,1,1,5", None, "2M,2M,2M,400K")
    assert fleet[3] == DeviceSpeed(5.0, 4e5) and fleet[0] == DeviceSpeed(1.0, 2e6)
    with pytest.raises(ValueError, match="not both"):
        build_fleet(2, "1", "rpi4b", None)


def features(ids, label_of=lambda i: i % 10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(ids, dtype=torch.long)
    return DeviceFeatures(ids, torch.rand(len(ids), 16, 8, 8, generator=g),
                          torch.zeros(len(ids), 10), torch.tensor([label_of(int(i)) for i in ids]))


def small_hub(**cfg) -> AsyncHub:
    torch.set_num_threads(1)
    hub = Hub(10, ServerTrainConfig(batch_size=8, device="cpu"), seed=0)
    return AsyncHub(hub, AsyncConfig(max_updates=100, **cfg))


def extractor():
    from edge_runtime.learning.models import FeatureExtractor

    return {k: v.clone() for k, v in FeatureExtractor().state_dict().items()}


def test_async_hub_sends_logits_once_features_are_trained_on():
    ah = small_hub(logits_after=1.0)
    assert ah.train_steps(1) is None  # nothing to train on yet
    ah.merge("a", features(range(16)), extractor(), update=0)
    ah.merge("b", features(range(100, 108)), extractor(), update=0)
    assert ah.due() == []
    ah.train_steps(2)
    assert ah.due() == []  # 24 samples at batch 8: three steps make one pass
    ah.train_steps(1)
    assert ah.due() == ["a", "b"]
    update, ids, z = ah.take_logits("a")
    assert update == 0 and ids.tolist() == list(range(16))
    assert torch.allclose(z, server_logits(ah.hub.model, features(range(16)).features))
    assert ah.due() == ["b"]  # a is no longer waiting
    ah.merge("a", features(range(16), seed=1), extractor(), update=1)  # replaces a's features
    ah.train_steps(1)
    assert ah.bank_samples == 24 and ah.slots["a"].update == 1


def test_a_vanished_device_blocks_nobody_and_ages_out():
    ah = small_hub(decay=0.5, max_staleness=3)
    ah.merge("ghost", features(range(100, 108)), extractor(), update=0)  # then never again
    for u in range(5):
        ah.merge("a", features(range(16), seed=u), extractor(), update=u)
        steps = 0
        while "a" not in ah.due():
            ah.train_steps(1)
            steps += 1
            assert steps < 10, "a waited for the ghost"
        assert ah.take_logits("a")[0] == u
        if u == 1:
            assert ah.weights()["ghost"] == pytest.approx(0.5**2)
    ah.train_steps(1)
    assert ah.weights()["ghost"] == 0.0 and ah.bank_samples == 16  # past max_staleness
    assert "ghost" in ah.due()  # still owed logits from its only upload; nobody waits on it


def test_cli_names_bad_async_and_fleet_options(capsys, tmp_path):
    from server_hub.cli.main import main

    assert main(["simulate", "--devices", "4", "--device-speeds", "1,5"]) == 2
    assert "--device-speeds: 2 values for 4 devices" in capsys.readouterr().err
    assert main(["simulate", "--mode", "async", "--staleness-decay", "1.5"]) == 2
    assert "staleness decay" in capsys.readouterr().err
    assert main(["serve", "--mode", "async", "--workers", "2", "--state-dir",
                 str(tmp_path)]) == 2
    assert "--workers" in capsys.readouterr().err

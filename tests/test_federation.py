"""In-process federations on real data (scikit-learn's digits)."""

import json

import numpy as np
import pytest
import torch

from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.learning.data import DataConfig
from edge_runtime.learning.train import EdgeTrainConfig
from server_hub.cli.main import main as hub_main
from server_hub.feature_bank import DeviceFeatures, FeatureBank
from server_hub.hub import Hub
from server_hub.simulation.inproc import (
    FederationConfig,
    prepare,
    run_centralized,
    run_fedavg,
    run_gkt,
    weighted_average,
)
from server_hub.trainer import ServerTrainConfig

SMALL = FederationConfig(
    data=DataConfig("digits"),
    devices=2,
    rounds=2,
    edge=EdgeTrainConfig(batch_size=32),
    server=ServerTrainConfig(epochs=1, batch_size=32),
)


@pytest.fixture(scope="module")
def setup():
    return prepare(SMALL)


def test_gkt_learns_and_counts_bytes(setup):
    result = run_gkt(SMALL, setup)  # default: q4 maps, extractor frozen after round 0
    assert [r.round for r in result.rounds] == [0, 1]
    assert result.rounds[-1].test_accuracy > 0.4  # chance is 0.1
    n = sum(len(s) for s in setup.shards)
    raw_maps = n * 16 * 8 * 8 * 4
    first, second = result.rounds[0].upload_bytes, result.rounds[1].upload_bytes
    assert n * 16 * 8 * 8 / 8 < first < raw_maps / 6  # q4 + zstd: counted as sent
    # the hub holds the maps and trains CE only (server alpha 0): ids and labels alone
    assert second < n * 8
    assert second < first / 20
    assert n * 10 * 2 * 0.5 < result.rounds[0].download_bytes < n * (10 * 4 + 8)  # fp16
    series = result.to_dict()["bytes"]
    assert series["uplink_cumulative"] == [first, first + second]
    assert series["downlink_per_round"] == [r.download_bytes for r in result.rounds]


def test_baselines_run_on_the_same_split(setup):
    fedavg = run_fedavg(SMALL, setup)
    central = run_centralized(SMALL, setup)
    assert len(fedavg.rounds) == len(central.rounds) == 2
    model_bytes = fedavg.rounds[0].upload_bytes / 2
    assert model_bytes > 591_322 * 4 * 0.8  # the whole ResNet-56 goes up, framed, zstd
    assert fedavg.rounds[0].download_bytes > 591_322 * 4 * 0.8 * 2
    assert central.rounds[-1].test_accuracy > 0.2


def test_weighted_average():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(4)}
    out = weighted_average([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([3.0, 5.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 4  # 3.5 rounds to even


def test_feature_bank_dedups_resent_samples():
    bank = FeatureBank()
    chunk = DeviceFeatures(torch.tensor([3, 1]), torch.ones(2, 16, 4, 4), torch.zeros(2, 10),
                           torch.tensor([0, 1]))
    bank.add("a", chunk)
    bank.add("a", chunk)  # a duplicated chunk after a reconnect
    assert bank.num_samples("a") == 2
    assert bank.get("a").ids.tolist() == [1, 3]


def test_hub_rejects_labels_out_of_range():
    hub = Hub(10, ServerTrainConfig(device="cpu"))
    bad = DeviceFeatures(torch.tensor([0]), torch.ones(1, 16, 4, 4), torch.zeros(1, 10),
                         torch.tensor([10]))
    with pytest.raises(ValueError, match="labels outside"):
        hub.receive_features("a", bad)
    assert hub.bank.devices == []


def test_devices_send_their_logits_only_to_a_hub_that_distils(setup):
    from dataclasses import replace

    one = replace(SMALL, rounds=2)
    ce = run_gkt(one, setup).rounds[1].upload_bytes
    kd = run_gkt(replace(one, server=replace(one.server, alpha=0.5)), setup).rounds[1].upload_bytes
    n = sum(len(s) for s in setup.shards)
    assert kd - ce > n * 10 * 2 * 0.5  # fp16 logits of every sample, after zstd
    # what the run spec tells devices over MQTT
    from server_hub.run.plan import dataset_plan

    assert not dataset_plan(one).spec.device_logits
    assert dataset_plan(replace(one, server=replace(one.server, alpha=0.5))).spec.device_logits


def test_a_hub_that_distils_refuses_an_upload_without_logits():
    from edge_runtime.protocol.errors import WireError
    from edge_runtime.protocol.messages import FeatureChunk

    ids, labels = torch.tensor([3, 4]), torch.tensor([1, 2])
    chunk = FeatureChunk(ids, labels, None, torch.ones(2, 16, 4, 4))
    kd = Hub(10, ServerTrainConfig(device="cpu", alpha=0.5))
    with pytest.raises(WireError, match="no logits") as err:
        kd.receive_chunk("a", chunk)
    assert err.value.reason == "schema" and kd.bank.devices == []
    ce = Hub(10, ServerTrainConfig(device="cpu"))
    ce.receive_chunk("a", chunk)
    held = ce.bank.get("a")
    assert held.ids.tolist() == [3, 4] and not held.logits.any()


def test_device_state_survives_a_restart(setup, tmp_path):
    def make():
        return EdgeDevice("d", setup.train, setup.train_eval, setup.shards[0], 10,
                          EdgeTrainConfig(batch_size=32))

    dev = make()
    dev.train()
    ids = setup.shards[0][:5]
    dev.receive_logits(ids, torch.randn(5, 10))
    dev.progress.completed_round = 0
    dev.save(tmp_path)
    again = make()
    assert again.load(tmp_path)
    for k, v in dev.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    assert torch.equal(dev.bank.lookup(torch.as_tensor(ids))[0],
                       again.bank.lookup(torch.as_tensor(ids))[0])
    assert again.progress.completed_round == 0
    assert not make().load(tmp_path / "empty")


def test_simulate_cli_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = hub_main(["simulate", "--transport", "inproc", "--devices", "2", "--rounds", "1",
                   "--server-epochs", "1", "--no-progress", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"algorithm", "dataset", "devices", "rounds", "final"} <= set(data)
    assert set(data["rounds"][0]) >= {"round", "test_accuracy", "upload_bytes",
                                      "download_bytes", "seconds"}
    assert 0 <= data["final"]["test_accuracy"] <= 1
    assert "round" in capsys.readouterr().out  # the per-round table


def test_bad_partition_is_reported_by_the_cli(capsys):
    assert hub_main(["simulate", "--partition", "dirichlet:-1"]) == 2
    assert "bad partition" in capsys.readouterr().err


@pytest.mark.slow
def test_gkt_reaches_90_percent_on_digits():
    cfg = FederationConfig(rounds=10, edge=EdgeTrainConfig(batch_size=32),
                           server=ServerTrainConfig(epochs=3, batch_size=32))
    result = run_gkt(cfg, prepare(cfg))
    assert max(r.test_accuracy for r in result.rounds[-3:]) >= 0.90
    assert np.isfinite(result.rounds[-1].train_loss)

"""A device killed while saving its state can still resume (what systemd restarts)."""

from __future__ import annotations

import pytest
import torch

from edge_runtime.device import edge_device as device_mod
from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.learning.data import DataConfig
from edge_runtime.learning.train import EdgeTrainConfig
from server_hub.simulation.inproc import FederationConfig, prepare


def make_device(setup) -> EdgeDevice:
    return EdgeDevice("d0", setup.train, setup.train_eval, setup.shards[0], 10,
                      EdgeTrainConfig(batch_size=32))


def test_a_save_cut_short_leaves_the_previous_state_loadable(tmp_path, monkeypatch):
    setup = prepare(FederationConfig(data=DataConfig("digits"), devices=8))
    dev = make_device(setup)
    dev.progress.completed_round = 0
    dev.save(tmp_path)
    dev.progress.completed_round = 1

    def killed_mid_write(obj, path):  # half a file on disk, then the process is gone
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half an optimizer")
        raise SystemExit("SIGKILL")

    monkeypatch.setattr(device_mod.torch, "save", killed_mid_write)
    with pytest.raises(SystemExit):
        dev.save(tmp_path)
    monkeypatch.undo()
    again = make_device(setup)
    assert again.load(tmp_path)  # not a crash loop on a torn optimizer.pt or progress.json
    assert again.progress.completed_round == 0
    for k, v in torch.load(tmp_path / "optimizer.pt", weights_only=True)["param_groups"][0].items():
        if k != "params":
            assert v == again.optimizer.state_dict()["param_groups"][0][k]


def test_a_state_dir_saved_for_another_device_is_refused_with_what_to_do(tmp_path):
    setup = prepare(FederationConfig(data=DataConfig("digits"), devices=8))
    make_device(setup).save(tmp_path)
    other = EdgeDevice("d0", setup.train, setup.train_eval, setup.shards[0], 100,
                       EdgeTrainConfig(batch_size=32))  # 100 classes: another head
    with pytest.raises(device_mod.DeviceStateError, match="does not fit.*--state-dir"):
        other.load(tmp_path)
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(device_mod.DeviceStateError, match="damaged"):
        make_device(setup).load(tmp_path)


def test_a_first_save_cut_short_is_nothing_saved_yet(tmp_path):
    setup = prepare(FederationConfig(data=DataConfig("digits"), devices=8))
    make_device(setup).save(tmp_path)
    (tmp_path / "progress.json").unlink()  # killed before the mark of its first save
    assert not make_device(setup).load(tmp_path)

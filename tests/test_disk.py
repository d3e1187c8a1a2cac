"""A hub whose disk fills: a warning when the devices that joined hold more samples than
the state dir's disk can keep maps for, and exit 5 with what to do instead of a traceback
(seen for real on a 30 MB tmpfs: the held copy's write failed mid-round; with space freed
the restarted hub resumed and finished)."""

from __future__ import annotations

import errno
import logging
import shutil
from collections import namedtuple

import pytest

from server_hub.cli.main import main as hub_main
from server_hub.disk import DiskRoom, feature_bytes

Usage = namedtuple("Usage", "total used free")


def test_feature_bytes_are_two_float32_copies_of_16_maps():
    assert feature_bytes(1, 32) == 2 * 16 * 32 * 32 * 4 == 131072
    assert feature_bytes(1000, 8) == 1000 * 2 * 16 * 64 * 4


def test_a_fleet_larger_than_the_disk_is_warned_about_once_per_increase(tmp_path, monkeypatch,
                                                                         caplog):
    free = {"bytes": 10 * feature_bytes(1, 32)}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(0, 0, free["bytes"]))
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "d.maps").write_bytes(b"\0" * feature_bytes(2, 32))  # reusable
    room = DiskRoom(tmp_path)
    caplog.set_level(logging.WARNING, logger="gkt.hub")
    room.check(12, 32)  # 10 free + 2 already held: fits
    assert not caplog.records
    room.check(13, 32)
    room.check(13, 32)  # the same fleet again: said already
    assert len(caplog.records) == 1
    assert "13 samples" in caplog.text and "need about 1.7 MB" in caplog.text
    assert "only 1.6 MB are free" in caplog.text
    room.check(20, 32)
    assert len(caplog.records) == 2
    room.check(5, None)  # no feature size known yet: nothing to say
    assert len(caplog.records) == 2


@pytest.mark.mqtt
def test_serve_stops_with_exit_5_and_what_to_do_when_the_disk_fills(broker, tmp_path,
                                                                  monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "held" / "x"))

    monkeypatch.setattr("server_hub.cli.serve.run_hub", full)
    rc = hub_main(["serve", "--broker", broker.url, "--state-dir", str(tmp_path),
                   "--dataset", "digits", "--device", "cpu", "--no-progress"])
    assert rc == 5
    err = capsys.readouterr().err
    assert f"the disk of {tmp_path} is full" in err and "resumes from its last checkpoint" in err
    assert "Traceback" not in err



@pytest.mark.mqtt
def test_a_device_whose_disk_fills_exits_7_and_says_what_to_do(broker, make_link, tmp_path,
                                                             monkeypatch, capsys):
    from edge_runtime.device.agent import EdgeAgent
    from edge_runtime.device.cli import main as edge_main
    from edge_runtime.learning.data import DataConfig
    from server_hub.run.plan import dataset_plan
    from server_hub.run.spec_store import publish_run_spec
    from server_hub.simulation.inproc import FederationConfig

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "optimizer.pt"))

    monkeypatch.setattr(EdgeAgent, "run", full)
    publish_run_spec(make_link(broker.url, "hub"),
                     dataset_plan(FederationConfig(data=DataConfig("digits"))).spec)
    rc = edge_main(["run", "--hub", broker.url, "--device-id", "a", "--dataset", "digits",
                    "--state-dir", str(tmp_path), "--threads", "1"])
    assert rc == 7
    err = capsys.readouterr().err
    assert f"the disk of {tmp_path} is full" in err and "resumes from its last saved" in err

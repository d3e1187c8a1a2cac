"""Faults survived: broker killed mid-upload, hub killed mid-round, device killed mid-round."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from test_mqtt_federation import make_hub, run_threads

from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.data import DataConfig
from edge_runtime.device import EdgeDevice
from edge_runtime.train import EdgeTrainConfig
from edge_runtime.transport import LinkConfig, MqttLink
from server_hub.checkpoint import latest_checkpoint
from server_hub.federation import FederationConfig, prepare

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def setup():
    return prepare(FederationConfig(data=DataConfig("digits"), devices=2))


def agent(broker, tmp_path, setup, i, max_payload=16 * 1024):
    dev = EdgeDevice(f"dev{i}", setup.train, setup.train_eval, setup.shards[i], 10,
                     EdgeTrainConfig(batch_size=32), seed=i)
    link = MqttLink(LinkConfig(broker.url, f"dev{i}-{tmp_path.name}", reconnect_max=1.0))
    link.connect()
    cfg = AgentConfig(f"dev{i}", codec="fp32", state_dir=str(tmp_path / f"dev{i}"),
                      max_payload=max_payload, window=2, ack_timeout=1.0, logits_timeout=5.0)
    return EdgeAgent(link, dev, cfg)


def wait_until(pred, timeout=120.0) -> bool:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_broker_killed_during_uploads(broker, tmp_path, setup):
    service, records = make_hub(broker, tmp_path, rounds=1, min_devices=2)
    agents = [agent(broker, tmp_path, setup, i) for i in range(2)]
    killer_saw = {}

    def killer():
        ok = wait_until(lambda: any(len(u.chunks) >= 3 for u in service.uploads.values()))
        killer_saw["chunks"] = sum(len(u.chunks) for u in service.uploads.values())
        broker.broker.kill()  # kill -9: its in-memory queues are gone
        time.sleep(1.0)
        broker.broker.start()
        return ok

    results = run_threads(("hub", service.run), ("a0", agents[0].run), ("a1", agents[1].run),
                          ("killer", killer), timeout=240)
    assert results == {"hub": 0, "a0": 0, "a1": 0, "killer": True}
    assert 0 < killer_saw["chunks"]
    assert len(records) == 1
    for a in agents:  # every sample arrived, exactly once, and every logit came back
        ids = service.hub.bank.get(a.device.device_id).ids.tolist()
        assert sorted(ids) == a.device.sample_ids.tolist()
        assert len(a.device.bank) == a.device.num_samples


def hub_cmd(url: str, state, rounds: int) -> list[str]:
    return [sys.executable, "-m", "server_hub.cli", "serve", "--broker", url, "--state-dir",
            str(state), "--rounds", str(rounds), "--min-devices", "2", "--server-epochs", "1",
            "--round-deadline", "120", "--no-progress"]


@pytest.mark.slow  # starts hub processes (torch import each time): ~1 min on 2 idle cores
def test_hub_killed_mid_round_resumes_without_losing_uploads(broker, tmp_path, setup):
    state = tmp_path / "hub"
    log1 = open(tmp_path / "hub1.log", "w")
    hub = subprocess.Popen(hub_cmd(broker.url, state, 2), stdout=log1, stderr=log1)
    agents = [agent(broker, tmp_path, setup, i, max_payload=64 * 1024) for i in range(2)]
    threads = [threading.Thread(target=a.run) for a in agents]
    for t in threads:
        t.start()
    # Kill it once round 1 has accepted (and acknowledged) some uploads.
    journal = state / "uploads" / "round-0001"
    assert wait_until(lambda: journal.is_dir() and len(list(journal.rglob("*.msg"))) >= 2,
                      timeout=180), (tmp_path / "hub1.log").read_text()[-2000:]
    hub.kill()
    hub.wait()
    accepted = len(list(journal.rglob("*.msg")))
    log2 = open(tmp_path / "hub2.log", "w")
    hub2 = subprocess.Popen(hub_cmd(broker.url, state, 2), stdout=log2, stderr=log2)
    assert hub2.wait(timeout=240) == 0, (tmp_path / "hub2.log").read_text()[-3000:]
    for t in threads:
        t.join(60)
    text = (tmp_path / "hub2.log").read_text()
    assert "resumed from" in text and "round-0000" in text
    assert "replayed" in text
    assert accepted >= 2
    assert latest_checkpoint(state).name == "round-0001"
    assert all(a.device.progress.completed_round == 1 for a in agents)
    assert not journal.exists()  # dropped once the round's checkpoint was written


@pytest.mark.slow  # four rounds with a device process killed and restarted
def test_device_killed_mid_round_rejoins_and_resumes(broker, tmp_path, setup):
    """Device process kill -9 mid-upload: the hub goes on without it at the deadline; the
    restarted device resumes from its state directory and takes part again."""
    service, records = make_hub(broker, tmp_path, rounds=4, min_devices=1, deadline=8.0)
    steady = agent(broker, tmp_path, setup, 0, max_payload=64 * 1024)
    state = tmp_path / "dev1p"
    cmd = [sys.executable, "-m", "edge_runtime.cli", "run", "--hub", broker.url,
           "--device-id", "dev1", "--state-dir", str(state), "--num-shards", "2",
           "--shard", "1", "--partition", "dirichlet:0.5", "--threads", "1",
           "--no-local-eval", "--max-payload", "16384"]
    logf = open(tmp_path / "dev1.log", "w")
    victim = subprocess.Popen(cmd, stdout=logf, stderr=logf)
    hub_thread = threading.Thread(target=service.run)
    steady_thread = threading.Thread(target=steady.run)
    hub_thread.start()
    steady_thread.start()
    assert wait_until(lambda: "dev1" in service.uploads, 240)
    killed_in = service.round
    victim.kill()  # mid-upload
    victim.wait()
    assert wait_until(lambda: len(records) > killed_in, 240)  # that round went on without it
    assert killed_in < 3, "the device joined too late to be restarted within the run"
    again = subprocess.Popen(cmd, stdout=logf, stderr=logf)
    assert again.wait(timeout=300) == 0, (tmp_path / "dev1.log").read_text()[-2000:]
    hub_thread.join(60)
    steady_thread.join(60)
    assert len(records) == 4
    progress = json.loads((state / "progress.json").read_text())
    assert progress["completed_round"] > killed_in  # it finished a round after the restart

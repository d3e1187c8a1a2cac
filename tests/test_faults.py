"""Faults survived: broker killed mid-upload, hub killed mid-round, device killed mid-round."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from polling import wait_for
from test_mqtt_federation import make_hub, run_threads

from edge_runtime.device.agent import AgentConfig, EdgeAgent
from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.learning.data import DataConfig
from edge_runtime.learning.train import EdgeTrainConfig
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics
from server_hub.checkpoint import latest_checkpoint
from server_hub.journal import count_records
from server_hub.run.spec_store import publish_run_spec
from server_hub.simulation.inproc import FederationConfig, prepare

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def setup():
    # 8 IID shards of digits (~180 samples each); the tests use the first two, which keeps
    # each round (and the hub's training) short.
    return prepare(FederationConfig(data=DataConfig("digits"), devices=8, partition="iid"))


def agent(broker, tmp_path, setup, i, max_payload=16 * 1024, logits_timeout=5.0):
    dev = EdgeDevice(f"dev{i}", setup.train, setup.train_eval, setup.shards[i], 10,
                     EdgeTrainConfig(batch_size=32), seed=i)
    link = MqttLink(LinkConfig(broker.url, f"dev{i}-{tmp_path.name}", reconnect_max=1.0))
    link.connect()
    cfg = AgentConfig(f"dev{i}", codec="fp32", state_dir=str(tmp_path / f"dev{i}"),
                      max_payload=max_payload, window=2, ack_timeout=1.0,
                      logits_timeout=logits_timeout)
    return EdgeAgent(link, dev, cfg)


def test_broker_killed_during_uploads(broker, tmp_path, setup):
    service, records = make_hub(broker, tmp_path, rounds=1, min_devices=2)
    agents = [agent(broker, tmp_path, setup, i) for i in range(2)]
    killer_saw = {}

    def killer():
        def mid_upload():  # an upload has begun and is not complete: the hub cannot train yet
            ups = list(service.intake.uploads.values())
            return any(len(u.chunks) >= 3 and not u.complete for u in ups)

        ok = wait_for(mid_upload, 120, interval=0.005)
        killer_saw["chunks"] = sum(len(u.chunks) for u in service.intake.uploads.values())
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


def test_broker_restarted_before_logits_reach_a_device(broker, tmp_path, setup, caplog):
    """The broker restarts (no persistence) while the hub trains. The hub sends dev1's
    logits before dev1 is back, to nobody; dev1 asks again on return and gets them."""
    caplog.set_level(logging.INFO, "gkt.hub")
    caplog.set_level(logging.INFO, "gkt.edge")
    service, records = make_hub(broker, tmp_path, rounds=2, min_devices=2)
    agents = [agent(broker, tmp_path, setup, 0)]
    late = agent(broker, tmp_path, setup, 1, logits_timeout=60.0)  # only the loss makes it ask
    late.link.client.reconnect_delay_set(6.0, 6.0)  # back well after the hub sent logits
    agents.append(late)
    train = service.loop.trainer.train

    def train_then_restart_broker(rnd, done):
        out = train(rnd, done)
        if rnd == 0:
            broker.broker.kill()
            time.sleep(1.0)
            broker.broker.start()
        return out

    service.loop.trainer.train = train_then_restart_broker
    results = run_threads(("hub", service.run), ("a0", agents[0].run), ("a1", late.run),
                          timeout=240)
    assert results == {"hub": 0, "a0": 0, "a1": 0}
    assert len(records) == 2
    assert "resending" in caplog.text and "logits chunks to dev1" in caplog.text
    assert "dev1: round 0 complete" in caplog.text  # not given up when the hub moved on
    assert "dev1: hub moved past round 0" not in caplog.text
    assert late.device.progress.completed_round == 1
    assert len(late.device.bank) == late.device.num_samples


def hub_cmd(url: str, state, rounds: int) -> list[str]:
    return [sys.executable, "-m", "server_hub.cli.main", "serve", "--broker", url, "--state-dir",
            str(state), "--rounds", str(rounds), "--min-devices", "2", "--server-epochs", "1",
            "--round-deadline", "120", "--no-progress"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # two hub processes (a torch import each): 17-40 s on 2 shared cores
def test_hub_killed_mid_round_resumes_without_losing_uploads(broker, tmp_path, setup):
    state = tmp_path / "hub"
    log1 = open(tmp_path / "hub1.log", "w")
    hub = subprocess.Popen(hub_cmd(broker.url, state, 2), stdout=log1, stderr=log1,
                           env=ONE_THREAD)
    agents = [agent(broker, tmp_path, setup, i, max_payload=64 * 1024) for i in range(2)]
    threads = [threading.Thread(target=a.run) for a in agents]
    for t in threads:
        t.start()
    # Kill it (kill -9) once round 1 has accepted, journaled and acknowledged some uploads.
    journal = state / "uploads" / "round-0001"
    assert wait_for(lambda: journal.is_dir() and count_records(journal) >= 2,
                      timeout=180), (tmp_path / "hub1.log").read_text()[-2000:]
    hub.kill()
    hub.wait()
    accepted = count_records(journal)
    log2 = open(tmp_path / "hub2.log", "w")
    hub2 = subprocess.Popen(hub_cmd(broker.url, state, 2), stdout=log2, stderr=log2,
                            env=ONE_THREAD)
    assert hub2.wait(timeout=240) == 0, (tmp_path / "hub2.log").read_text()[-3000:]
    for t in threads:
        t.join(60)
    text = (tmp_path / "hub2.log").read_text()
    assert "resumed from" in text and "round-0000" in text  # the model and optimizer
    replayed = re.search(r"round 1: replayed (\d+) accepted messages", text)
    assert replayed and int(replayed.group(1)) == accepted >= 2  # every acked upload kept
    assert latest_checkpoint(state).name == "round-0001"
    assert all(a.device.progress.completed_round == 1 for a in agents)
    assert not journal.exists()  # dropped once the round's checkpoint was written


@pytest.mark.slow  # a device process killed, a round waiting out its deadline: ~50 s
def test_device_killed_mid_round_rejoins_and_resumes(broker, tmp_path, setup, caplog):
    """Device process kill -9 mid-upload of round 1: the hub goes on without it at the
    deadline; the restarted device resumes from its state directory (round 0 done) and
    takes part in round 2."""
    caplog.set_level(logging.INFO, "gkt.hub")
    service, records = make_hub(broker, tmp_path, rounds=3, min_devices=1, deadline=20.0)
    steady = agent(broker, tmp_path, setup, 0, max_payload=64 * 1024)
    state = tmp_path / "dev1p"
    cmd = [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", broker.url,
           "--device-id", "dev1", "--state-dir", str(state), "--num-shards", "8",
           "--shard", "1", "--partition", "iid", "--threads", "1", "--codec", "fp32",
           "--no-local-eval", "--max-payload", "16384",
           "--refresh", "full"]  # maps every round: its round 1 upload is long enough to cut
    logf = open(tmp_path / "dev1.log", "w")
    victim = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=ONE_THREAD)
    # Start the hub once the victim said hello (retained), so it takes part from round 0.
    # The device says hello once it adopted the run spec: publish the hub's (retained).
    probe = MqttLink(LinkConfig(broker.url, f"probe-{tmp_path.name}", session_expiry=0))
    probe.connect()
    publish_run_spec(probe, service.intake.run_spec)
    hello = threading.Event()
    probe.subscribe(topics.up("dev1"), lambda t, p: p and hello.set())
    assert hello.wait(120), (tmp_path / "dev1.log").read_text()[-2000:]
    probe.close()
    hub_thread = threading.Thread(target=service.run)
    steady_thread = threading.Thread(target=steady.run)
    hub_thread.start()
    steady_thread.start()
    def mid_upload() -> bool:
        up = service.intake.uploads.get("dev1")
        return service.intake.round == 1 and up is not None and len(up.chunks) >= 2 \
            and not up.complete

    assert wait_for(mid_upload, 240, interval=0.005)
    victim.kill()  # kill -9 in the middle of its round 1 upload
    victim.wait()
    t_kill = time.monotonic()
    assert wait_for(lambda: len(records) >= 2, 240)  # round 1 went on without it
    waited = time.monotonic() - t_kill
    assert "round 1 deadline: going on with 1 of 2 devices" in caplog.text
    assert records[1].round == 1 and waited < 20.0 + 30  # the deadline, not forever
    again = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=ONE_THREAD)
    assert again.wait(timeout=300) == 0, (tmp_path / "dev1.log").read_text()[-2000:]
    hub_thread.join(60)
    steady_thread.join(60)
    assert [r.round for r in records] == [0, 1, 2]
    log_text = (tmp_path / "dev1.log").read_text()
    assert "dev1: resumed from" in log_text and "last completed round 0" in log_text
    progress = json.loads((state / "progress.json").read_text())
    assert progress["completed_round"] == 2  # it took part again after the restart
    assert "dev1" in service.intake.uploads and service.intake.uploads["dev1"].complete

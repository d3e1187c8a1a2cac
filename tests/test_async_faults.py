"""Faults survived in async mode: what a restarted async hub restores (fake link), and the
`gkt-hub serve --mode async` process killed (kill -9) while devices upload over a real
Mosquitto, then restarted on the same state dir."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from polling import wait_for
from probes import status

from edge_runtime.device.agent import AgentConfig, EdgeAgent
from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.learning.data import DataConfig
from edge_runtime.learning.train import EdgeTrainConfig
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import wire
from server_hub.async_mode.rules import AsyncConfig
from server_hub.async_mode.service import AsyncHubService
from server_hub.async_mode.state import FILE, load_state
from server_hub.broker.mosquitto import free_port
from server_hub.checkpoint import latest_checkpoint
from server_hub.hub import Hub
from server_hub.journal import count_records
from server_hub.service import ServiceConfig
from server_hub.simulation.inproc import FederationConfig, prepare
from server_hub.trainer import ServerTrainConfig

pytestmark = pytest.mark.mqtt
TINY = 120  # samples per device
MAX_UPDATES = 10
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    return prepare(FederationConfig(data=DataConfig("digits"), devices=4, partition="iid"))


def spilling_service(state: Path) -> AsyncHubService:
    """As serve builds it: the feature bank spills to the state dir."""
    from test_async_service import FakeLink

    hub = Hub(10, ServerTrainConfig(batch_size=8, device="cpu"), feature_dir=state / "features")
    return AsyncHubService(FakeLink(), hub, ServiceConfig(str(state)), AsyncConfig(max_updates=9),
                           None, None)


def test_a_restarted_async_hub_keeps_its_version_staleness_and_hellos(tmp_path):
    from test_async_service import hello, send, upload

    torch.set_num_threads(1)
    first = spilling_service(tmp_path)
    send(first, "d", [hello("d")] + upload("d", 0))
    send(first, "e", [hello("e")] + upload("e", 0, seed=2) + upload("e", 1, seed=3))
    half = upload("d", 1, seed=1)
    send(first, "d", half[:1])  # d's next upload is half in when the hub dies
    # "killed": nothing closed; the next process finds the files as they are
    again = spilling_service(tmp_path)
    again._resume()
    slots = {d: (s.update, s.version) for d, s in again.ahub.slots.items()}
    assert again.ahub.version == 3 and slots == {"d": (0, 1), "e": (1, 3)}  # not recounted
    assert again.ahub.weights() == first.ahub.weights() == {"d": 0.95**2, "e": 1.0}
    for dev in ("d", "e"):  # the same samples, once each, with the same feature maps
        a, b = first.ahub.slots[dev].features, again.ahub.slots[dev].features
        assert a.ids.tolist() == b.ids.tolist() == list(range(6))
        assert torch.equal(a.features, b.features)
    send(again, "d", [hello("d")])  # its retained hello, re-delivered: not a device restart
    assert again.merged == {"d": 0, "e": 1} and again.intake.rejected == {}
    send(again, "d", half[1:])  # the rest of the half-done upload
    assert again.merged["d"] == 1 and again.ahub.version == 4
    assert load_state(tmp_path).slots == {"d": (1, 4), "e": (1, 3)}
    (tmp_path / FILE).write_text("{not json")  # unusable: recount from the journal, logged
    recount = spilling_service(tmp_path)
    recount._resume()
    assert recount.ahub.version == 2 and recount.merged == {"d": 1, "e": 1}


def two_chunk_upload(device: str, update: int, seed: int) -> tuple[torch.Tensor, list[bytes]]:
    """(feature maps, messages) of an upload of 6 samples in two chunks."""
    from test_async_service import upload

    from edge_runtime.protocol.messages import FeatureBatch, feature_chunk

    feats = torch.rand(6, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    ids, uid = torch.arange(6), f"r{update}-{seed}"
    chunks = [feature_chunk(device, update, f"{uid}:{i}", i, 2,
                            FeatureBatch(ids[s], feats[s], torch.zeros(3, 10), ids[s] % 10), "fp32")
              for i, s in enumerate((slice(0, 3), slice(3, 6)))]
    ext, done = upload(device, update, seed)[1:]  # extractor and upload_done (1 chunk)
    done_msg = wire.decode_message(done, max_bytes=1 << 20)
    done = wire.encode_message("upload_done", device, update, {}, msg_id=f"{uid}:done",
                               meta={**done_msg.meta, "num_chunks": 2, "upload_id": uid})
    return feats, chunks + [ext, done]


def test_an_upload_half_in_when_the_hub_died_completes_with_its_own_features(tmp_path):
    """The killed hub left the half upload's chunk in its spill file; the restarted one
    must not map that leftover as the rows of the chunks that come after it."""
    from test_async_service import hello, send

    torch.set_num_threads(1)
    first = spilling_service(tmp_path)
    feats, msgs = two_chunk_upload("d", 0, seed=4)
    send(first, "d", [hello("d")] + msgs[:1])
    again = spilling_service(tmp_path)
    again._resume()
    send(again, "d", msgs[1:])
    assert again.merged == {"d": 0}
    got = again.ahub.slots["d"].features
    assert got.ids.tolist() == list(range(6)) and torch.equal(got.features, feats)


def test_sigterm_stops_the_async_hub_without_ending_the_federation(tmp_path):
    """SIGTERM (a restart by systemd) is not the end: no "stop" goes out, so devices wait."""
    from test_async_service import FakeLink, hello, send, upload

    from edge_runtime.protocol import topics

    class Link(FakeLink):
        def subscribe(self, topic, handler) -> None:
            pass

    torch.set_num_threads(1)
    hub = Hub(10, ServerTrainConfig(batch_size=8, device="cpu"))
    svc = AsyncHubService(Link(), hub, ServiceConfig(str(tmp_path), start_timeout=60),
                          AsyncConfig(max_updates=100), None, None)
    rc = []
    t = threading.Thread(target=lambda: rc.append(svc.run()))
    t.start()
    assert wait_for(svc.intake.listening.is_set, 30)
    send(svc, "d", [hello("d")] + upload("d", 0))
    assert wait_for(lambda: svc.ahub.steps > 0, 60)  # training
    svc.stop()  # what serve's SIGTERM handler calls
    t.join(60)
    states = [wire.decode_message(p, max_bytes=1 << 20).meta["state"]
              for topic, p in svc.link.sent if topic == topics.ROUND_TOPIC]
    assert rc == [0] and states and set(states) == {"async"}


def agent(broker, tmp_path, setup, i):
    dev = EdgeDevice(f"dev{i}", setup.train, setup.train_eval, setup.shards[i][:TINY], 10,
                     EdgeTrainConfig(batch_size=32), seed=i)
    link = MqttLink(LinkConfig(broker.url, f"dev{i}-{tmp_path.name}", reconnect_max=1.0))
    link.connect()
    cfg = AgentConfig(f"dev{i}", state_dir=str(tmp_path / f"dev{i}"), max_payload=16 * 1024,
                      window=2, ack_timeout=1.0, logits_timeout=3.0, mode="async",
                      evaluate_local=False)
    return EdgeAgent(link, dev, cfg)


def hub_cmd(url: str, state: Path, status_port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "server_hub.cli.main", "serve", "--mode", "async", "--broker", url,
           "--state-dir", str(state), "--min-devices", "2", "--max-updates", str(MAX_UPDATES),
           "--eval-every", "2", "--batch-size", "32", "--start-timeout", "120", "--no-progress"]
    return cmd + (["--status-port", str(status_port)] if status_port else [])


def journal(state: Path) -> dict[tuple[int, str], int]:
    """{(update, device): accepted messages on disk}"""
    out = {}
    for folder in (state / "uploads").glob("round-*/*"):
        n = count_records(folder)
        if n:
            out[(int(folder.parent.name.split("-")[1]), folder.name)] = n
    return out


def mid_upload(state: Path) -> bool:
    """Kill time: a checkpoint exists, 3+ uploads were merged, and a device's next upload
    is partly accepted (on disk, acknowledged)."""
    try:
        saved = load_state(state)
        if saved is None or saved.version < 3 or latest_checkpoint(state) is None:
            return False
        return any(u > saved.slots.get(d, (-1, 0))[0] for u, d in journal(state))
    except (OSError, ValueError):  # the hub renames and deletes as we look
        return False


@pytest.mark.slow  # two hub processes (a torch import each), 10 uploads: 32-53 s on 2 loaded cores
def test_async_hub_killed_mid_upload_resumes_without_losing_uploads(broker, tmp_path, setup):
    state = tmp_path / "hub"
    log1 = open(tmp_path / "hub1.log", "w")
    hub = subprocess.Popen(hub_cmd(broker.url, state), stdout=log1, stderr=log1,
                           env=ONE_THREAD)
    agents = [agent(broker, tmp_path, setup, i) for i in range(2)]
    results: dict[str, int] = {}
    threads = [threading.Thread(target=lambda a=a: results.__setitem__(a.cfg.device_id,
                                                                        a.run()))
               for a in agents]
    for t in threads:
        t.start()
    assert wait_for(lambda: mid_upload(state), timeout=240), \
        (tmp_path / "hub1.log").read_text()[-3000:]
    hub.kill()  # kill -9: nothing is flushed, no "stop" is announced
    hub.wait()
    shutil.copytree(state, tmp_path / "hub-at-kill", ignore=shutil.ignore_patterns("*.tmp"))
    saved, on_disk, ckpt = load_state(state), journal(state), latest_checkpoint(state)
    done_at_kill = {a.cfg.device_id: a.device.progress.completed_round for a in agents}
    assert saved is not None and saved.version >= 3

    port = free_port()
    log2 = open(tmp_path / "hub2.log", "w")
    hub2 = subprocess.Popen(hub_cmd(broker.url, state, port), stdout=log2, stderr=log2,
                            env=ONE_THREAD)
    snaps = []  # the restarted hub's status page while it runs
    t_end = time.monotonic() + 300
    while hub2.poll() is None:
        assert time.monotonic() < t_end, (tmp_path / "hub2.log").read_text()[-3000:]
        snap = status(port)
        if snap and snap["devices"] and snap["phase"] not in ("starting", "resuming"):
            # replay is done (the registry names the devices from the start)
            snaps.append(snap)
        time.sleep(0.3)
    text = (tmp_path / "hub2.log").read_text()
    assert hub2.returncode == 0, text[-3000:]
    for t in threads:
        t.join(60)
    assert results == {"dev0": 0, "dev1": 0}

    # It resumed: the model from the checkpoint, evaluations numbered on from it, the hub
    # version as it was (not recounted from the journal), every device's newest upload.
    assert f"resumed from {ckpt}" in text
    evals = [int(x) for x in re.findall(r"async evaluation (\d+):", text)]
    assert evals and evals[0] == int(ckpt.name.split("-")[1]) + 1
    m = re.search(r"resumed async state: hub version (\d+), newest uploads of (.*)", text)
    assert m, text[-3000:]
    replayed = dict(re.findall(r"(dev\d) \(update (\d+)\)", m.group(2)))
    replayed = {d: int(u) for d, u in replayed.items()}
    assert set(replayed) == set(saved.slots) == {"dev0", "dev1"}
    newer = sum(replayed[d] != saved.slots[d][0] for d in replayed)
    assert all(replayed[d] >= saved.slots[d][0] for d in replayed)  # no merged upload lost
    assert int(m.group(1)) == saved.version + newer
    n_replayed = sum(int(x) for x in re.findall(r"replayed (\d+) accepted messages", text))
    assert n_replayed == sum(on_disk.values())  # every acknowledged message came back
    assert "restarted from update" not in text  # re-delivered hellos are not device restarts
    versions = [int(x) for x in re.findall(r"hub version (\d+)\)", text[m.end():])]
    assert versions and versions[0] > int(m.group(1)) and versions[-1] >= MAX_UPDATES

    # The devices went on and got their logits; the status page showed it as it went.
    for a in agents:
        d = a.cfg.device_id
        assert a.device.progress.completed_round > done_at_kill[d]
        assert len(a.device.bank) == a.device.num_samples == TINY
        assert a.rejected == 0
    assert snaps, "the status page never answered"
    first = snaps[0]
    assert first["mode"] == "async" and first["version"] >= saved.version
    for d in first["devices"]:  # what was replayed: each device's samples, once
        assert d["bank_samples"] == TINY and d["update"] >= saved.slots[d["id"]][0]
    states = {d["state"] for s in snaps for d in s["devices"]}
    assert states <= {"uploading", "waiting for logits", "training", "finished"}, states
    assert len(states - {"finished"}) >= 2
    assert max(d["staleness"] for s in snaps for d in s["devices"]) >= 1
    assert latest_checkpoint(state).name > ckpt.name

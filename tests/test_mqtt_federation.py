"""Hub service and edge agents exchanging real messages through a real Mosquitto."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from edge_runtime.device.agent import AgentConfig, EdgeAgent
from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.device.upload import rebatch
from edge_runtime.learning.data import DataConfig, make_loader
from edge_runtime.learning.train import EdgeTrainConfig
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.messages import FeatureBatch
from server_hub.checkpoint import latest_checkpoint
from server_hub.hub import Hub
from server_hub.run.plan import dataset_plan
from server_hub.service import HubService, ServiceConfig
from server_hub.simulation.inproc import FederationConfig, prepare
from server_hub.trainer import ServerTrainConfig

pytestmark = pytest.mark.mqtt
DATA = DataConfig("digits")


@pytest.fixture(scope="module")
def setup():
    return prepare(FederationConfig(data=DATA, devices=2))


def make_hub(broker, tmp_path, rounds=2, min_devices=2, deadline=60.0, max_extensions=3,
             alpha=0.0):
    link = MqttLink(LinkConfig(broker.url, f"hub-{tmp_path.name}"))
    link.connect()
    hub = Hub(10, ServerTrainConfig(epochs=1, batch_size=32, device="cpu", alpha=alpha))
    test_loader = make_loader(prepare_test(), 256, shuffle=False)
    cfg = ServiceConfig(str(tmp_path / "hub"), rounds=rounds, min_devices=min_devices,
                        round_deadline=deadline, start_timeout=60,
                        max_extensions=max_extensions,
                        run_spec=dataset_plan(FederationConfig(
                            data=DATA, server=ServerTrainConfig(alpha=alpha))).spec)
    records = []
    return HubService(link, hub, cfg, DATA, test_loader, records.append), records


def prepare_test():
    from edge_runtime.learning.data import load_split

    return load_split(DataConfig("digits", augment=False), train=False).dataset


def make_agent(broker, tmp_path, setup, i, codec="q8", spec_watch=None, **cfg):
    dev = EdgeDevice(f"dev{i}", setup.train, setup.train_eval, setup.shards[i], 10,
                     EdgeTrainConfig(batch_size=32), seed=i)
    link = MqttLink(LinkConfig(broker.url, f"dev{i}-{tmp_path.name}"))
    link.connect()
    acfg = AgentConfig(f"dev{i}", codec=codec, state_dir=str(tmp_path / f"dev{i}"),
                       max_payload=64 * 1024, **cfg)
    return EdgeAgent(link, dev, acfg, spec_watch=spec_watch)


def run_threads(*targets, timeout=120):
    results = {}
    threads = [threading.Thread(target=lambda n=n, f=f: results.__setitem__(n, f()))
               for n, f in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "federation did not finish"
    return results


def test_two_devices_two_rounds_over_mqtt(broker, tmp_path, setup):
    service, records = make_hub(broker, tmp_path)
    agents = [make_agent(broker, tmp_path, setup, i) for i in range(2)]
    results = run_threads(("hub", service.run), *[(f"a{i}", a.run) for i, a in
                                                     enumerate(agents)])
    assert results == {"hub": 0, "a0": 0, "a1": 0}
    assert [r.round for r in records] == [0, 1]
    assert 0 < records[0].elapsed < records[1].elapsed  # the time axis of plots
    assert records[-1].test_accuracy > 0.4
    n = sum(len(s) for s in setup.shards)
    assert records[0].upload_bytes < n * 16 * 8 * 8 * 4 / 3  # q8 + zstd, not raw fp32
    for a in agents:
        assert a.device.progress.completed_round == 1
        assert len(a.device.bank) == a.device.num_samples  # a logit for every sample
        assert a.rejected == 0
        assert (tmp_path / a.device.device_id / "edge.safetensors").exists()
    assert sum(service.intake.rejected.values()) == 0
    assert latest_checkpoint(tmp_path / "hub").name == "round-0001"


def test_logits_come_back_for_the_right_samples(broker, tmp_path, setup):
    """The hub's logits for each id equal the server model's output on that id's features."""
    service, _ = make_hub(broker, tmp_path, rounds=1, min_devices=1)
    agent = make_agent(broker, tmp_path, setup, 0, codec="fp32")
    run_threads(("hub", service.run), ("a0", agent.run))
    dev = agent.device
    feats = {int(i): (h, y) for b in dev.features() for i, h, y in zip(b.ids, b.features,
                                                                      b.labels)}
    # Round 0's features came from the model before this round's local training ended,
    # so recompute z_s from what the hub stored and compare per id.
    stored = service.hub.bank.get("dev0")
    from server_hub.trainer import server_logits

    z = server_logits(service.hub.model, stored.features)
    got, mask = dev.bank.lookup(stored.ids)
    assert mask.all()
    assert torch.allclose(got, z.half().float(), atol=1e-5)  # logits travel as fp16
    assert set(stored.ids.tolist()) == set(feats)


def test_a_hub_that_distils_gets_logits_and_refuses_a_device_that_leaves_them_out(
        broker, tmp_path, setup):
    """Server alpha > 0: the run spec asks for the devices' logits; one that sends none is
    refused (a retry would not help) and the round goes on with the other. A device
    follows the hub's newest spec: one that adopted it without logits sends them now."""
    from edge_runtime.device.adopt import RunSpecWatch
    from edge_runtime.device.exit_codes import EXIT_REFUSED

    service, records = make_hub(broker, tmp_path, rounds=1, min_devices=1, deadline=20.0,
                                alpha=0.5)
    assert service.cfg.run_spec.device_logits
    watch = RunSpecWatch(None)
    watch.spec = service.cfg.run_spec  # as the retained spec topic delivers it
    good = make_agent(broker, tmp_path, setup, 0, spec_watch=watch, send_logits=False)
    bad = make_agent(broker, tmp_path, setup, 1, send_logits=False)  # follows no spec
    results = run_threads(("hub", service.run), ("a0", good.run), ("a1", bad.run))
    assert results == {"hub": 0, "a0": 0, "a1": EXIT_REFUSED}
    assert bad.refused == "protocol" and service.intake.rejected["schema"] >= 1
    assert len(records) == 1 and good.device.progress.completed_round == 0
    assert service.hub.bank.devices == ["dev0"]
    held = service.hub.bank.get("dev0")
    assert held.logits.abs().sum() > 0  # the device's own logits, for KD on the hub


def hostile_messages(device: str) -> list[tuple[str, bytes, str]]:
    ok = wire.encode_message("logits_request", device, 0, {}, msg_id="x", meta={"round": 0})
    feats = {
        "ids": (np.arange(2, dtype=np.int64), "exact"),
        "labels": (np.zeros(2, dtype=np.int64), "exact"),
        "logits": (np.zeros((2, 10), np.float32), "fp32"),
        "features": (np.zeros((2, 16, 8, 8), np.float32), "q8"),
    }
    up = topics.up(device)
    return [
        (up, b"\x80\x04pickle-bytes", "bad_magic"),
        (up, ok[:3] + b"\x07" + ok[4:], "bad_version"),
        (up, ok[: len(ok) // 2], "truncated"),
        (up, wire.encode_message("logits_request", "other", 0, {}, msg_id="x",
                                 meta={"round": 0}), "spoofed"),
        (up, wire.encode_message("features", device, 0, feats, msg_id="u:0"), "unknown_device"),
        (up, wire.encode_message("features", device, 7, feats, msg_id="u:0"),
         "unknown_device"),
    ]


def test_hostile_input_is_rejected_and_the_hub_keeps_serving(broker, tmp_path, setup):
    service, records = make_hub(broker, tmp_path, rounds=1, min_devices=1)
    before = {k: v.clone() for k, v in service.hub.model.state_dict().items()}
    hub_thread = threading.Thread(target=service.run)
    hub_thread.start()
    assert service.intake.listening.wait(60)  # non-retained junk sent earlier would reach no one
    attacker = MqttLink(LinkConfig(broker.url, f"attacker-{tmp_path.name}"))
    attacker.connect()
    cases = hostile_messages("mallory")
    for topic, payload, _ in cases:
        attacker.publish(topic, payload)
    t_end = time.monotonic() + 10
    while sum(service.intake.rejected.values()) < len(cases) and time.monotonic() < t_end:
        time.sleep(0.05)
    expected = {}
    for _, _, why in cases:
        expected[why] = expected.get(why, 0) + 1
    assert dict(service.intake.rejected) == expected
    assert service.hub.bank.devices == [] and service.intake.known == {}
    for k, v in service.hub.model.state_dict().items():
        assert torch.equal(v, before[k])
    # ... and a real device still gets a full round done.
    agent = make_agent(broker, tmp_path, setup, 0)
    assert run_threads(("a0", agent.run)) == {"a0": 0}
    hub_thread.join(30)
    assert len(records) == 1 and agent.device.progress.completed_round == 0
    attacker.close()


def test_a_silent_device_does_not_block_the_round(broker, tmp_path, setup):
    """A device that says hello and then vanishes: the round goes on at the deadline."""
    service, records = make_hub(broker, tmp_path, rounds=1, min_devices=1, deadline=3.0)
    ghost = say_hello(broker, tmp_path)
    agent = make_agent(broker, tmp_path, setup, 0)
    t0 = time.monotonic()
    results = run_threads(("hub", service.run), ("a0", agent.run), timeout=60)
    assert results == {"hub": 0, "a0": 0}
    assert len(records) == 1 and "ghost" in service.intake.known
    assert time.monotonic() - t0 < 40
    ghost.close()


def say_hello(broker, tmp_path, name="ghost") -> MqttLink:
    """A device that says hello (retained, as a real one does) and then stays silent."""
    link = MqttLink(LinkConfig(broker.url, f"{name}-{tmp_path.name}"))
    link.connect()
    hello = wire.encode_message("hello", name, 0, {}, msg_id="h",
                                meta={"num_samples": 5, "num_classes": 10, "codec": "q8"})
    link.publish(topics.up(name), hello, retain=True)
    return link


def test_too_few_devices_extend_the_deadline_a_bounded_number_of_times(broker, tmp_path,
                                                                        setup, caplog):
    """min_devices=2 with one silent device: the deadline is extended max_extensions
    times, then the round goes on with the one device that uploaded."""
    service, records = make_hub(broker, tmp_path, rounds=1, min_devices=2, deadline=2.0,
                                max_extensions=1)
    ghost = say_hello(broker, tmp_path)
    agent = make_agent(broker, tmp_path, setup, 0)
    t0 = time.monotonic()
    results = run_threads(("hub", service.run), ("a0", agent.run), timeout=90)
    assert results == {"hub": 0, "a0": 0}
    assert "extending the deadline (1/1)" in caplog.text
    assert "round 0: going on with 1 devices (< min 2)" in caplog.text
    assert len(records) == 1 and agent.device.progress.completed_round == 0
    assert 4.0 <= time.monotonic() - t0 < 60  # two deadlines, not forever
    ghost.close()


def test_nobody_uploading_ends_the_hub_with_exit_3(broker, tmp_path):
    service, records = make_hub(broker, tmp_path, rounds=1, min_devices=1, deadline=1.0,
                                max_extensions=1)
    ghost = say_hello(broker, tmp_path)
    results = run_threads(("hub", service.run), timeout=60)
    assert results == {"hub": 3} and records == []
    assert service.intake.rejected == {}  # nothing was wrong with what came in; nothing came
    ghost.close()


def test_rebatch_regroups_exactly():
    def fb(lo, hi):
        ids = torch.arange(lo, hi)
        return FeatureBatch(ids, torch.zeros(hi - lo, 16, 2, 2), torch.zeros(hi - lo, 10), ids)

    out = list(rebatch(iter([fb(0, 3), fb(3, 10), fb(10, 11)]), 4))
    assert [len(b.ids) for b in out] == [4, 4, 3]
    assert torch.equal(torch.cat([b.ids for b in out]), torch.arange(11))

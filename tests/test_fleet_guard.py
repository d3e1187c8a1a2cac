"""The hub's registry, phantom devices, stray round announcements, refusals a device
cannot retry, and a restarted hub repeating the uninterrupted run. Through a real
Mosquitto without logins (the loopback simulation set-up), except the in-process RNG test."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from polling import wait_for
from test_mqtt_federation import DATA, make_agent, prepare_test, setup  # noqa: F401 (fixture)
from test_poison import TRAIN, hello, upload

from edge_runtime.device.exit_codes import EXIT_REFUSED
from edge_runtime.learning.data import make_loader
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from server_hub.admission import AdmissionLimits
from server_hub.checkpoint import load_checkpoint
from server_hub.feature_bank import DeviceFeatures
from server_hub.hub import Hub
from server_hub.service import HubService, ServiceConfig

pytestmark = pytest.mark.mqtt
ALICE = "alice"


class Run:
    """A hub service on its own thread; ``rc`` once it returned."""

    def __init__(self, broker, state, num_classes: int = 10, **cfg) -> None:
        self.link = MqttLink(LinkConfig(broker.url, f"hub-{time.monotonic_ns()}"))
        self.link.connect()
        self.records: list = []
        self.service = HubService(
            self.link, Hub(num_classes, TRAIN), ServiceConfig(str(state), **{
                "rounds": 1, "min_devices": 1, "round_deadline": 60.0, "start_timeout": 60,
                **cfg}), DATA, make_loader(prepare_test(), 256, shuffle=False),
            self.records.append)
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        self.rc = self.service.run()

    def collecting(self, rnd: int) -> bool:
        return self.service.intake.round == rnd and self.service.intake.phase == "collect"

    def close(self) -> None:
        self.service.stop()
        self.thread.join(30)
        self.link.close()


@pytest.fixture
def client(broker, make_link):
    """A plain client: a device (alice) or a stray local process; retained messages it
    leaves are cleared afterwards."""
    link = make_link(broker.url, "stray", max_packet_size=1 << 20)
    left: set[str] = set()

    def publish(topic: str, payload: bytes, retain: bool = False) -> None:
        link.publish(topic, payload, retain=retain)
        if retain:
            left.add(topic)

    yield publish
    for t in left:
        link.publish(t, b"", retain=True)


def alice_chunks(run) -> set | None:
    """The chunks of alice's upload the hub holds (None before the first arrives)."""
    up = run.service.intake.uploads.get(ALICE)
    return None if up is None else up.chunks


def test_a_restarted_hub_remembers_devices_whose_retained_hellos_were_cleared(
        broker, client, tmp_path):
    state = tmp_path / "hub"
    run = Run(broker, state, start_timeout=10)
    client(topics.up(ALICE), hello(ALICE), retain=True)
    assert wait_for(lambda: run.collecting(0), 30)
    parts = upload(ALICE, 0, "a0")
    for m in parts[:2]:  # acked and journaled, then the hub goes down
        client(topics.up(ALICE), m)
    assert wait_for(lambda: alice_chunks(run) == {0, 1}, 30)
    run.close()
    client(topics.up(ALICE), b"", retain=True)  # a stray client clears alice's hello
    again = Run(broker, state, start_timeout=10)
    try:
        assert ALICE in again.service.intake.known  # from registry.json, before any hello
        assert wait_for(lambda: again.collecting(0), 30)
        # replayed
        assert wait_for(lambda: alice_chunks(again) == {0, 1}, 30)
        for m in parts[2:]:
            client(topics.up(ALICE), m)
        again.thread.join(60)
        assert again.rc == 0 and [r.round for r in again.records] == [0]
        assert again.service.hub.bank.get(ALICE).ids.tolist() == list(range(6))
    finally:
        again.close()


def test_phantom_hellos_are_bounded_and_hold_up_one_round_at_most(broker, client, make_link,
                                                                   tmp_path):
    deadline = 3.0
    run = Run(broker, tmp_path / "hub", rounds=3, round_deadline=deadline,
              admission=AdmissionLimits(max_devices=21))
    try:
        client(topics.up(ALICE), hello(ALICE), retain=True)
        assert wait_for(lambda: run.collecting(0), 30)
        for i in range(40):  # 40 unknown ids; room for 20 beside alice
            client(topics.up(f"ph{i}"), hello(f"ph{i}"), retain=True)
        assert wait_for(lambda: run.service.intake.rejected["too_many_devices"] == 20, 20)
        assert len(run.service.intake.known) == 21
        for rnd in range(3):
            assert wait_for(lambda rnd=rnd: run.collecting(rnd), 30)
            for m in upload(ALICE, rnd, f"a{rnd}"):
                client(topics.up(ALICE), m)
        run.thread.join(60)
        assert run.rc == 0 and [r.round for r in run.records] == [0, 1, 2]
        seconds = [r.seconds for r in run.records]
        assert seconds[0] >= deadline  # the phantoms' first round waits out the deadline
        assert max(seconds[1:]) < deadline  # then they hold up nothing
        # The refused phantoms' retained hellos were cleared from the broker.
        retained: list[str] = []
        make_link(broker.url, "count").subscribe(topics.UP_WILDCARD,
                                                 lambda t, p: retained.append(t) if p else None)
        time.sleep(1.0)
        assert len(retained) == 21
    finally:
        run.close()


@pytest.mark.slow  # two devices train digits for 2 rounds plus a derailed one: 60-150 s
def test_stray_round_announcements_neither_end_nor_derail_the_run(broker, client, make_link,
                                                                   setup, tmp_path):  # noqa: F811
    """A stray client copies the hub's retained announcement and publishes a `collect` for
    round 99 and a `stop` of another run. The device holding the run key ignores both;
    the one without it ignores the other run's stop, follows round 99, is told the hub
    never opened it, and comes back to the real round without a traceback. Both finish."""
    run = Run(broker, tmp_path / "hub", rounds=2, min_devices=2)
    agents = [make_agent(broker, tmp_path, setup, 0, round_key=run.service.announcer.round_key),
              make_agent(broker, tmp_path, setup, 1)]
    codes: list[int] = []
    threads = [threading.Thread(target=lambda a=a: codes.append(a.run())) for a in agents]
    seen: list[wire.Message] = []
    make_link(broker.url, "watch").subscribe(
        topics.ROUND_TOPIC, lambda t, p: seen.append(wire.decode_message(p, max_bytes=1 << 16))
        if p else None)
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: any(m.meta["state"] == "collect" for m in seen), 60)
        genuine = next(m for m in seen if m.meta["state"] == "collect")
        forged = {**genuine.meta, "epoch": "forged", "issued": genuine.meta["issued"] + 1}
        client(topics.ROUND_TOPIC, wire.encode_message(
            "round", "hub", 99, {}, msg_id="round-99-collect", meta=forged), retain=True)
        time.sleep(0.5)
        client(topics.ROUND_TOPIC, wire.encode_message(
            "round", "hub", 0, {}, msg_id="round-0-stop", meta={
                **forged, "state": "stop", "run": "someone-elses-run"}), retain=True)
        run.thread.join(240)
        for t in threads:
            t.join(60)
        assert run.rc == 0 and [r.round for r in run.records] == [0, 1]
        assert codes == [0, 0]
        assert [a.device.progress.completed_round for a in agents] == [1, 1]
        assert agents[0].guard.run == run.service.intake.registry.run_id
        assert agents[0]._ignored >= 2 and agents[1]._ignored >= 1
    finally:
        for a in agents:
            a.stop()
        run.close()


def test_a_device_refused_for_good_exits_6(broker, setup, tmp_path):  # noqa: F811
    run = Run(broker, tmp_path / "hub", num_classes=11, start_timeout=30)  # not the device's 10
    agent = make_agent(broker, tmp_path, setup, 0)
    try:
        assert agent.run() == EXIT_REFUSED
        assert agent.refused == "wrong_run"
        intake = run.service.intake
        assert intake.rejected["wrong_run"] == 1 and "dev0" not in intake.known
    finally:
        agent.link.close()
        run.close()


@pytest.fixture
def one_thread():
    """Tiny models on shared cores: more threads only contend (35 s vs 1 s here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_resumed_hub_repeats_the_uninterrupted_run(tmp_path, one_thread):
    """In-process: three rounds straight vs. one round, a checkpoint, a new Hub whose global
    RNG was disturbed, restored, and two more rounds. Same weights, same accuracies."""
    g = torch.Generator().manual_seed(1)
    feats = DeviceFeatures(torch.arange(40), torch.rand((40, 16, 8, 8), generator=g),
                           torch.randn((40, 10), generator=g), torch.arange(40) % 10)
    loader = [(torch.rand((16, 3, 8, 8), generator=g), torch.arange(16) % 10)]

    def one_round(hub: Hub) -> float:
        hub.start_round()
        hub.receive_features("d", feats)
        hub.receive_extractor("d", extractor_state)
        hub.train(["d"])
        return hub.evaluate(loader).mean

    from edge_runtime.learning.models import FeatureExtractor

    extractor_state = FeatureExtractor().state_dict()
    straight = Hub(10, TRAIN)
    accs = [one_round(straight) for _ in range(3)]
    first = Hub(10, TRAIN)
    resumed_accs = [one_round(first)]
    first.save(tmp_path, first.checkpoint_meta(0, DATA, resumed_accs[0]))
    torch.manual_seed(1234)
    second = Hub(10, TRAIN, seed=99)  # another seed: everything must come from the checkpoint
    second.restore(load_checkpoint(tmp_path))
    resumed_accs += [one_round(second) for _ in range(2)]
    assert resumed_accs == accs
    for k, v in straight.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k


def test_a_hub_stopped_mid_round_and_restarted_repeats_the_uninterrupted_run(
        broker, client, tmp_path, one_thread):
    """Through the broker: 3 rounds straight vs. a hub stopped in round 1 after it acked
    part of the upload and restarted on its state dir (checkpoint + journal). The
    per-round accuracies are the same."""
    from edge_runtime.learning.models import FeatureExtractor

    torch.manual_seed(5)
    ext = FeatureExtractor().state_dict()

    def messages(rnd: int) -> list[bytes]:
        from edge_runtime.protocol.messages import extractor_message

        msgs = upload(ALICE, rnd, f"a{rnd}")
        return [*msgs[:3], extractor_message(ALICE, rnd, f"a{rnd}:extractor", ext), msgs[4]]

    def send(run: Run, rnd: int, parts: list[bytes]) -> None:
        assert wait_for(lambda: run.collecting(rnd), 60)
        for m in parts:
            client(topics.up(ALICE), m)

    client(topics.up(ALICE), hello(ALICE), retain=True)
    straight = Run(broker, tmp_path / "a", rounds=3)
    for rnd in range(3):
        send(straight, rnd, messages(rnd))
    straight.thread.join(120)
    straight.close()
    first = Run(broker, tmp_path / "b", rounds=3)
    send(first, 0, messages(0))
    send(first, 1, messages(1)[:2])
    assert wait_for(lambda: alice_chunks(first) == {0, 1}, 30)
    first.close()  # round 0 checkpointed, round 1 half acked and journaled
    again = Run(broker, tmp_path / "b", rounds=3)
    try:
        send(again, 1, messages(1)[2:])
        send(again, 2, messages(2))
        again.thread.join(120)
        accs = [r.test_accuracy for r in first.records + again.records]
        assert [r.round for r in first.records + again.records] == [0, 1, 2]
        assert accs == [r.test_accuracy for r in straight.records]
        for k, v in straight.service.hub.model.state_dict().items():
            assert torch.equal(again.service.hub.model.state_dict()[k], v), k
    finally:
        again.close()

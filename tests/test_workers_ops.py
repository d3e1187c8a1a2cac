"""Operating `gkt-hub serve --workers 2`: rank 0 serves metrics and the status page for the
whole hub, and each worker spills its features to its own folder; a real Mosquitto,
real devices, two gloo workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from polling import wait_for
from probes import scrape, status
from test_mqtt_federation import say_hello
from test_workers import run_devices, setup, small, start_hub  # noqa: F401 (fixtures)

from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from server_hub.broker.access import AccessConfig, broker_access
from server_hub.broker.enrol import add_device, ensure_hub_users
from server_hub.broker.mosquitto import free_port
from server_hub.workers.service import share_group_for, shared_up_filter

pytestmark = pytest.mark.mqtt
HOSTILE = 6


def test_rank0_serves_metrics_and_status_of_both_workers(broker, tmp_path, small):  # noqa: F811
    mport, sport = free_port(), free_port()
    state = tmp_path / "hub"
    proc, log = start_hub(broker.url, state, workers=2, rounds=1, epochs=1, extra=(
        "--metrics-port", str(mport), "--status-port", str(sport), "--monitor-linger", "120"))
    try:
        # Both workers hold the shared subscription before anything is published, so every
        # message reaches exactly one of them (a retained one would reach both).
        assert wait_for(lambda: log.read_text().count("receiving uploads through") == 2, 120), \
            log.read_text()[-3000:]
        attacker = MqttLink(LinkConfig(broker.url, f"mallory-{tmp_path.name}"))
        attacker.connect()
        for _ in range(HOSTILE):  # spread over both workers by the broker
            attacker.publish(topics.up("mallory"), b"\x80\x04pickle-bytes")
        attacker.close()
        agents = run_devices(broker.url, tmp_path, small, "ops")
        assert wait_for(lambda: (status(sport) or {}).get("phase") == "done", 60)
        m, snap = scrape(mport), status(sport)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # ends the linger
        code = proc.wait(60)
    text = log.read_text()
    assert code == 0, text[-3000:]

    # Each worker rejected part of the hostile messages: the figures are sums over both.
    rejecting = set(re.findall(r"rank(\d) gkt.hub: rejected message on", text))
    assert rejecting == {"0", "1"}, rejecting
    assert m[("gkt_hub_rejected_messages_total", (("reason", "bad_magic"),))] == HOSTILE
    sent = sum(a.link.bytes_sent for a in agents) + attacker.bytes_sent
    assert m[("gkt_hub_received_bytes_total", ())] == sent  # every byte devices sent, once
    n = sum(a.device.num_samples for a in agents)
    assert m[("gkt_hub_samples_received_total", ())] == n
    assert m[("gkt_hub_rounds_completed_total", ())] == 1
    assert m[("gkt_hub_round_duration_seconds_count", ())] == 1
    assert m[("gkt_hub_devices_known", ())] == 2
    meta = json.loads((state / "checkpoints" / "round-0000" / "meta.json").read_text())
    assert m[("gkt_hub_test_accuracy", ())] == pytest.approx(meta["test_accuracy"])
    # The hub sent at least every logit message the devices received (plus acks, rounds).
    assert m[("gkt_hub_sent_bytes_total", ())] > n * 4 * 10
    for a in agents:
        d = (("device", a.device.device_id),)
        assert m[("gkt_device_samples", d)] == a.device.num_samples
        assert 0 < m[("gkt_device_sent_bytes_total", d)] < a.link.bytes_sent  # hello aside

    assert [d["id"] for d in snap["devices"]] == ["dev0", "dev1"]
    assert {d["state"] for d in snap["devices"]} == {"finished"}
    for d, a in zip(snap["devices"], agents):  # every message of a device, whichever worker
        assert d["messages"] == a.link.msgs_sent
    assert snap["rejected"] == {"bad_magic": HOSTILE}
    assert snap["bytes_received"] == sent
    assert snap["bytes_sent"] == m[("gkt_hub_sent_bytes_total", ())]
    assert snap["samples_received"] == n and snap["rounds_completed"] == 1

    # Each worker spilled the feature maps it received to its own folder; together they
    # hold every sample once (float32, 16 x size x size each).
    row = 16 * meta["image_size"] ** 2 * 4
    for dev in ("dev0", "dev1"):
        files = [state / "features" / f"rank-{r}" / f"{dev}.features" for r in (0, 1)]
        assert all(f.is_file() for f in files), files
        assert sum(f.stat().st_size for f in files) == len(small.shards[0]) * row


@pytest.mark.slow  # ~30 s: two workers start (torch, data) only to stop
def test_a_port_that_is_taken_ends_the_workers_with_exit_2(broker, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc, log = start_hub(broker.url, tmp_path / "hub", workers=2, rounds=1, extra=(
            "--metrics-port", str(taken.getsockname()[1])))
        t0 = time.monotonic()
        code = proc.wait(120)
    assert code == 2, log.read_text()[-3000:]
    assert "cannot serve metrics" in log.read_text()
    assert time.monotonic() - t0 < 120


def test_shared_subscription_under_the_acl(broker_dir, broker_factory, make_link):
    """Enrolled devices and two workers with the hub's login on the ACL'd managed broker.
    Mosquitto 2.0 grants any client any ``$share/...`` subscription and checks read access
    per message: a device in the workers' group reads nothing, yet every message the broker
    hands to it is dropped. So the workers' group is derived from the hub's password."""
    keys = {d: add_device(broker_dir, d).password for d in ("devA", "devB")}
    ensure_hub_users(broker_dir, [f"gkt-hub-{i}" for i in range(4)])  # client id = user
    access = broker_access(AccessConfig(str(broker_dir)))
    url = broker_factory("acl", **access.broker_fields).url
    dev = {d: make_link(url, d, username=d, password=k) for d, k in keys.items()}

    def workers(group: str, first: int) -> list[list[bytes]]:
        """Two workers' links with hub logins (users ``first``, ``first + 1``) in ``group``;
        what each receives."""
        got: list[list[bytes]] = [[], []]
        for i in range(2):
            link = make_link(url, f"w{i}-{group}", username=f"gkt-hub-{first + i}",
                             password=access.password)
            link.subscribe(shared_up_filter(group), lambda t, p, i=i: got[i].append(p))
        return got

    def upload(tag: str) -> list[bytes]:
        sent = []
        for k in range(12):
            for d, link in dev.items():
                sent.append(f"{tag}-{d}-{k}".encode())
                link.publish(topics.up(d), sent[-1])
        return sent

    # A device joins the group under the name the workers use: granted, it reads nothing,
    # and what the broker hands to it is lost.
    got = workers("gkt-hub", 0)
    spy: list[bytes] = []
    dev["devA"].subscribe(shared_up_filter("gkt-hub"), lambda t, p: spy.append(p))
    sent = upload("guessed")
    assert wait_for(lambda: len(got[0] + got[1]) >= len(sent) * 2 // 3)
    time.sleep(0.5)
    assert spy == [] and all(got)
    assert set(got[0] + got[1]) < set(sent)  # a third went to the device: dropped

    # The workers' group derived from the hub's password (what `serve --workers` uses under
    # an ACL): the device cannot name it, and every upload reaches exactly one worker.
    group = share_group_for(access.password)
    assert group.startswith("gkt-hub-") and group == share_group_for(access.password)
    got = workers(group, 2)
    sent = upload("secret")
    assert wait_for(lambda: len(got[0] + got[1]) >= len(sent))
    time.sleep(0.5)
    assert sorted(got[0] + got[1]) == sorted(sent) and all(got)
    assert spy == []


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_sigterm_mid_round_stops_every_worker_as_it_stops_one_hub(broker, tmp_path, ctrl_c):
    """SIGTERM to `gkt-hub serve --workers 2` while round 0 collects: both workers stop at
    the next exchange with exit 0 and tell the devices nothing (a restart resumes), as the
    single hub does; no round is recorded. Ctrl-C (SIGINT to the whole group, so each
    worker gets it twice: from the terminal and passed on) stops them the same way."""
    ghosts = [say_hello(broker, tmp_path, f"ghost{i}") for i in range(2)]  # never upload
    rounds: list[dict] = []
    watcher = MqttLink(LinkConfig(broker.url, f"watch-{tmp_path.name}"))
    watcher.subscribe(topics.ROUND_TOPIC, lambda t, p: rounds.append(
        wire.decode_message(p, max_bytes=1 << 20).meta))
    watcher.connect()
    proc, log = start_hub(broker.url, tmp_path / "hub", workers=2, rounds=3)
    try:
        assert wait_for(lambda: any(r["state"] == "collect" for r in rounds), 120), \
            log.read_text()[-3000:]
        if ctrl_c:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("the hub did not stop:\n" + log.read_text()[-4000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        for link in (*ghosts, watcher):
            link.close()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text
    assert len(re.findall(r"rank\d gkt.hub: stopped; a restart resumes", text)) == 2, text
    assert [r["state"] for r in rounds] == ["collect"]  # no "stop" reached the devices
    assert not (tmp_path / "hub" / "checkpoints").exists()

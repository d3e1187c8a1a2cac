"""Enrolment, ACL and TLS against a real Mosquitto: a device can act only as itself."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
from polling import wait_for

from edge_runtime.device import cli as edge_cli
from edge_runtime.mqtt.link import AuthRefusedError, LinkConfig, MqttLink
from edge_runtime.ops.service_unit import UnitConfig, render_unit
from edge_runtime.protocol import topics
from server_hub.broker.access import AccessConfig, AccessError, broker_access
from server_hub.broker.enrol import (
    HUB_USER,
    EnrolError,
    SecurityPaths,
    add_device,
    ensure_hub_users,
    hub_credentials,
    list_devices,
    refresh_acl,
    render_acl,
    revoke_device,
)
from server_hub.broker.mosquitto import free_port
from server_hub.broker.tls import certificate_names, ensure_tls
from server_hub.cli import main as hub_cli

pytestmark = pytest.mark.mqtt


def secure_broker(broker_factory, state, tls=False):
    """The managed broker as `gkt-hub serve` configures it from ``state``."""
    access = broker_access(AccessConfig(str(state), tls=tls, tls_port=free_port()))
    return broker_factory("broker", **access.broker_fields), access


def test_acl_gives_each_device_only_its_topics():
    acl = render_acl(["b", "a"])
    assert acl.index("user a") < acl.index("user b")
    block = acl.split("user a\n")[1].split("\n\n")[0].splitlines()
    assert block == ["topic write gkt/v1/dev/a/up", "topic write gkt/v1/dev/a/model",
                     "topic read gkt/v1/dev/a/down", "topic read gkt/v1/hub/round",
                     "topic read gkt/v1/hub/run"]
    assert f"user {HUB_USER}\ntopic readwrite gkt/v1/#" in acl


def test_an_acl_from_before_the_model_topic_is_rewritten_when_the_hub_starts(broker_dir):
    add_device(broker_dir, "devO")
    acl = SecurityPaths.of(broker_dir).acl
    old = acl.read_text().replace(f"topic write {topics.model('devO')}\n", "")
    acl.write_text(old)  # what an older version generated: devO could not ack its model
    broker_access(AccessConfig(str(broker_dir)))
    assert f"user devO\ntopic write {topics.up('devO')}\ntopic write " \
           f"{topics.model('devO')}\n" in acl.read_text()
    assert not refresh_acl(broker_dir)  # current: left alone


def test_enrol_rejects_bad_ids_and_the_hub_user(broker_dir):
    with pytest.raises(ValueError, match="wildcard"):
        add_device(broker_dir, "dev+1")
    with pytest.raises(EnrolError, match="hub's own"):
        add_device(broker_dir, HUB_USER)


def test_device_a_cannot_publish_as_b_nor_read_b_logits(broker_dir, broker_factory):
    a, b = add_device(broker_dir, "devA"), add_device(broker_dir, "devB")
    broker, access = secure_broker(broker_factory, broker_dir)
    assert access.username == HUB_USER
    hub = MqttLink(LinkConfig(broker.url, "hub", username=access.username,
                              password=access.password))
    la = MqttLink(LinkConfig(broker.url, "a", username="devA", password=a.password))
    lb = MqttLink(LinkConfig(broker.url, "b", username="devB", password=b.password))
    anon = MqttLink(LinkConfig(broker.url, "anon"))
    with pytest.raises(ConnectionError, match="0x8[67]"):
        anon.connect(timeout=5)
    for link in (hub, la, lb):
        link.connect(timeout=5)
    try:
        ups: list[str] = []
        hub.subscribe(topics.UP_WILDCARD, lambda t, p: ups.append(t))
        la.publish(topics.up("devA"), b"mine")
        with pytest.raises(ConnectionError, match="refused the publish.*authorized"):
            la.publish(topics.up("devB"), b"spoofed")
        # model delivery's replies: A may write its own model topic, not B's
        models: list[str] = []
        hub.subscribe(topics.MODEL_WILDCARD, lambda t, p: models.append(t))
        la.publish(topics.model("devA"), b"ack")
        with pytest.raises(ConnectionError, match="refused the publish.*authorized"):
            la.publish(topics.model("devB"), b"spoofed ack")
        # A tries every way to see B's logits; the broker delivers none of them to A.
        seen_a: list[tuple[str, bytes]] = []
        for f in (topics.down("devB"), "gkt/v1/dev/+/down", "#", topics.down("devA")):
            la.subscribe(f, lambda t, p: seen_a.append((t, p)))
        seen_b: list[bytes] = []
        lb.subscribe(topics.down("devB"), lambda t, p: seen_b.append(p))
        hub.publish(topics.down("devB"), b"logits for B")
        hub.publish(topics.down("devA"), b"logits for A")
        assert wait_for(lambda: seen_b == [b"logits for B"] and len(seen_a) >= 3)
        time.sleep(0.3)
        assert {p for _, p in seen_a} == {b"logits for A"}
        assert ups == [topics.up("devA")]  # the spoofed upload never reached the hub
        assert models == [topics.model("devA")]
    finally:
        for link in (hub, la, lb):
            link.close()


def test_revoked_device_is_disconnected_and_cannot_connect(broker_dir, broker_factory):
    e, keep = add_device(broker_dir, "devR"), add_device(broker_dir, "devK")
    broker, _ = secure_broker(broker_factory, broker_dir)
    link = MqttLink(LinkConfig(broker.url, "r", username="devR", password=e.password))
    refused: list[str] = []
    link.on_auth_refused = refused.append  # what makes gkt-edge stop with exit 5
    link.connect(timeout=5)
    try:
        assert revoke_device(broker_dir, "devR")  # SIGHUPs the running broker
        assert wait_for(lambda: not link.connected, 5)
        assert wait_for(lambda: bool(refused), 5), "the reconnect was not refused"
        assert "0x8" in refused[0]
    finally:
        link.close()
    again = MqttLink(LinkConfig(broker.url, "r2", username="devR", password=e.password))
    with pytest.raises(AuthRefusedError, match="0x8[67]"):
        again.connect(timeout=5)
    kept = MqttLink(LinkConfig(broker.url, "k", username="devK", password=keep.password))
    kept.connect(timeout=5)  # the reloaded broker still knows everyone else
    kept.close()
    assert [(d["device"], d["status"]) for d in list_devices(broker_dir)] == [
        ("devK", "enrolled"), ("devR", "revoked")]
    assert not revoke_device(broker_dir, "devR")


def test_tls_with_generated_ca_and_plain_mqtt_refused_on_tls_port(broker_dir, broker_factory):
    e = add_device(broker_dir, "devT")
    broker, access = secure_broker(broker_factory, broker_dir, tls=True)
    assert {"127.0.0.1", "localhost"} <= set(certificate_names(ensure_tls(broker_dir).cert))
    url = f"mqtts://127.0.0.1:{broker.cfg.tls_port}"
    tls = MqttLink(LinkConfig(url, "t", username="devT", password=e.password,
                              ca_file=access.ca_file))
    tls.connect(timeout=5)
    try:
        tls.publish(topics.up("devT"), b"over tls")
    finally:
        tls.close()
    plain = MqttLink(LinkConfig(f"mqtt://127.0.0.1:{broker.cfg.tls_port}", "p",
                                username="devT", password=e.password))
    with pytest.raises(ConnectionError):
        plain.connect(timeout=3)
    other_ca = ensure_tls(broker_dir / "elsewhere").ca_cert  # a CA that did not sign it
    wrong = MqttLink(LinkConfig(url, "w", username="devT", password=e.password,
                                ca_file=str(other_ca)))
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        wrong.connect(timeout=5)


@pytest.mark.mqtt
def test_a_device_whose_clock_is_behind_is_told_to_check_its_date(broker_dir, broker_factory,
                                                                  monkeypatch):
    """A Raspberry Pi has no battery-backed clock: until NTP sets it the broker's
    certificate looks issued in the future. Here the certificate is (a month ahead)."""
    import datetime as dt

    from server_hub.broker import tls

    ahead = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    with monkeypatch.context() as m:
        m.setattr(tls, "_now", lambda: ahead)
        ensure_tls(broker_dir)
    e = add_device(broker_dir, "devC")
    broker, access = secure_broker(broker_factory, broker_dir, tls=True)
    link = MqttLink(LinkConfig(f"mqtts://127.0.0.1:{broker.cfg.tls_port}", "c",
                               username="devC", password=e.password, ca_file=access.ca_file))
    with pytest.raises(ConnectionError, match=r"not yet valid.*check this machine's date"):
        link.connect(timeout=5)


def test_open_broker_on_the_network_is_refused_unless_insecure(tmp_path, caplog):
    with pytest.raises(AccessError, match="unauthenticated MQTT on 0.0.0.0"):
        broker_access(AccessConfig(str(tmp_path), listen="0.0.0.0"))
    with caplog.at_level(logging.WARNING, "gkt.hub"):
        access = broker_access(AccessConfig(str(tmp_path), listen="0.0.0.0", insecure=True))
    assert access.broker_fields == {} and "INSECURE" in caplog.text
    assert broker_access(AccessConfig(str(tmp_path))).username is None  # loopback simulation
    assert hub_cli.main(["serve", "--state-dir", str(tmp_path), "--listen", "0.0.0.0",
                         "--no-progress"]) == 2


def test_device_cli_prints_a_working_edge_command(broker_dir, capsys):
    assert hub_cli.main(["device", "add", "pi-1", "--state-dir", str(broker_dir),
                         "--host", "hub.lan", "--tls", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["url"] == "mqtts://hub.lan:8883" and info["username"] == "pi-1"
    assert "hub.lan" in certificate_names(ensure_tls(broker_dir).cert)
    secret = broker_dir / "pi-1.secret"
    secret.write_text(info["password"] + "\n")
    argv = info["command"].split()[1:]
    argv[argv.index("--password-file") + 1] = str(secret)
    argv[argv.index("--ca-file") + 1] = info["ca_file"]
    args = edge_cli.build_parser().parse_args(argv)
    assert edge_cli.login_fields(args) == {"username": "pi-1", "password": info["password"],
                                           "ca_file": info["ca_file"]}
    assert hub_cli.main(["device", "list", "--state-dir", str(broker_dir)]) == 0
    assert "pi-1" in capsys.readouterr().out
    assert hub_cli.main(["device", "revoke", "pi-1", "--state-dir", str(broker_dir)]) == 0
    assert hub_cli.main(["device", "revoke", "pi-1", "--state-dir", str(broker_dir)]) == 1
    assert SecurityPaths.of(broker_dir).enabled and hub_credentials(broker_dir)[0] == HUB_USER


def test_serve_joins_a_broker_that_needs_a_login(broker_dir, broker_factory, monkeypatch):
    add_device(broker_dir, "devS")
    broker, access = secure_broker(broker_factory, broker_dir)
    argv = ["serve", "--broker", broker.url, "--state-dir", str(broker_dir / "hub"),
            "--rounds", "1", "--start-timeout", "1", "--no-progress"]
    assert hub_cli.main(argv) == 4  # no login: the broker refuses the hub
    monkeypatch.setenv("GKT_BROKER_PASSWORD", access.password)
    assert hub_cli.main([*argv, "--broker-user", HUB_USER]) == 3  # in; no device joined


def test_edge_with_refused_credentials_exits_5_and_the_unit_does_not_restart_it(
        broker_dir, broker_factory, tmp_path):
    add_device(broker_dir, "devW")
    broker, _ = secure_broker(broker_factory, broker_dir)
    cmd = [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", broker.url,
           "--device-id", "devW", "--username", "devW", "--password", "wrong",
           "--state-dir", str(tmp_path / "devW"), "--dataset", "digits", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 5, out.stderr
    assert "refused the connection" in out.stderr and "gkt-hub device add" in out.stderr
    unit = render_unit(UnitConfig("gkt-edge devW", exec_start=cmd))
    assert "RestartPreventExitStatus=2 5 6 7" in unit


def test_a_device_cannot_take_over_the_hub_or_another_device(broker_dir, broker_factory, caplog):
    """An enrolled device connecting under the hub's or another device's client id gets its
    own user name as client id instead (use_username_as_clientid): the victims keep their
    connections and sessions. Hub workers get a user per connection for the same reason."""
    a, m = add_device(broker_dir, "devA"), add_device(broker_dir, "devM")
    broker, access = secure_broker(broker_factory, broker_dir)
    assert "use_username_as_clientid true" in broker.conf_path.read_text()
    ensure_hub_users(broker_dir, ["gkt-hub-0", "gkt-hub-0-scan"])

    def link(name: str, client_id: str, user: str, password: str) -> MqttLink:
        return MqttLink(LinkConfig(broker.url, client_id, user, password),
                        logger=logging.getLogger(f"t.{name}"))

    hub = link("hub", "gkt-hub", access.username, access.password)
    worker = link("worker", "gkt-hub-0", "gkt-hub-0", access.password)
    scan = link("scan", "gkt-hub-0-scan", "gkt-hub-0-scan", access.password)
    victim = link("victim", "gkt-edge-devA", "devA", a.password)
    for ln in (hub, worker, scan, victim):
        ln.connect(timeout=5)
    ups: list[bytes] = []
    downs: list[bytes] = []
    hub.subscribe(topics.UP_WILDCARD, lambda t, p: ups.append(p))
    victim.subscribe(topics.down("devA"), lambda t, p: downs.append(p))
    try:
        with caplog.at_level(logging.WARNING):
            for stolen in ("gkt-hub", "gkt-edge-devA", "gkt-hub-0"):
                thief = link("thief", stolen, "devM", m.password)
                thief.connect(timeout=5)
                thief.publish(topics.up("devM"), b"from the thief")
                time.sleep(1.0)
                thief.close()
        victims = ("t.hub", "t.worker", "t.scan", "t.victim")
        assert [r.getMessage() for r in caplog.records
                if r.name in victims and "lost the connection" in r.getMessage()] == []
        assert all(ln.connected for ln in (hub, worker, scan, victim))
        victim.publish(topics.up("devA"), b"still me")  # both sessions still carry traffic
        hub.publish(topics.down("devA"), b"for A")
        assert wait_for(lambda: b"for A" in downs and b"still me" in ups, 10)
        assert ups.count(b"from the thief") == 3  # on its own topic, as itself
        assert broker.log_path.read_text().count(" as devM ") == 3
    finally:
        for ln in (hub, worker, scan, victim):
            ln.close()

"""The managed Mosquitto: its generated config (pure) and the process (real broker)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from polling import wait_for

from edge_runtime.mqtt.link import LinkConfig, MqttLink
from server_hub.broker import mosquitto as broker_mod
from server_hub.broker.mosquitto import (
    BrokerConfig,
    BrokerError,
    ManagedBroker,
    find_mosquitto,
    free_port,
    render_config,
)


def lines(cfg: BrokerConfig) -> list[str]:
    return render_config(cfg).splitlines()


def give_to_broker_user(path: Path) -> None:
    """What an admin does for a secret the broker reads (it drops to its user as root)."""
    if os.geteuid() == 0:
        pw = broker_mod.pwd.getpwnam(broker_mod.BROKER_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


# -- render_config (pure) --------------------------------------------------------------------
def test_config_has_the_lessons_learned(tmp_path):
    conf = lines(BrokerConfig(str(tmp_path), port=1999))
    assert "set_tcp_nodelay true" in conf
    assert "listener 1999 127.0.0.1" in conf
    assert "max_packet_size 524288" in conf
    assert "max_queued_bytes 67108864" in conf
    assert "max_queued_messages 10000" in conf
    assert "persistence true" in conf and "autosave_interval 10" in conf
    assert f"persistence_location {tmp_path.resolve() / 'data'}/" in conf
    assert "log_dest stderr" in conf  # a file the broker's user need not be able to open
    assert "allow_anonymous true" in conf


def test_zero_packet_limit_is_omitted_not_written(tmp_path):
    # Mosquitto 2.0.11 refuses to start on `max_packet_size 0`.
    conf = lines(BrokerConfig(str(tmp_path), max_packet_size=0))
    assert not any(c.startswith("max_packet_size") for c in conf)


def test_unlimited_queue_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_queued_messages"):
        render_config(BrokerConfig(str(tmp_path), max_queued_messages=0))


def test_nodelay_and_persistence_can_be_turned_off(tmp_path):
    conf = lines(BrokerConfig(str(tmp_path), tcp_nodelay=False, persistence=False))
    assert "set_tcp_nodelay false" in conf and "persistence false" in conf


def test_closed_broker_needs_a_password_file(tmp_path):
    with pytest.raises(ValueError, match="password_file"):
        render_config(BrokerConfig(str(tmp_path), allow_anonymous=False))
    conf = lines(BrokerConfig(str(tmp_path), allow_anonymous=False, password_file="pw",
                              acl_file="acl"))
    assert "allow_anonymous false" in conf
    assert "password_file pw" in conf and "acl_file acl" in conf


def test_tls_listener_needs_its_files_and_keeps_plain_mqtt_local(tmp_path):
    with pytest.raises(ValueError, match="TLS listener"):
        render_config(BrokerConfig(str(tmp_path), tls_port=8883))
    cfg = BrokerConfig(str(tmp_path), host="0.0.0.0", port=1883, tls_port=8883, cafile="ca",
                       certfile="c", keyfile="k")
    conf = lines(cfg)
    assert "listener 1883 127.0.0.1" in conf  # plain MQTT only for the hub on this machine
    tls = conf.index("listener 8883 0.0.0.0")
    assert conf[tls + 1:tls + 4] == ["cafile ca", "certfile c", "keyfile k"]
    assert cfg.url == "mqtt://127.0.0.1:1883"


def test_missing_mosquitto_names_the_install_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    with pytest.raises(FileNotFoundError) as err:
        find_mosquitto()
    assert "apt-get install mosquitto mosquitto-clients" in str(err.value)
    assert "--broker mqtt://HOST:PORT" in str(err.value)


# -- the process -----------------------------------------------------------------------------
@pytest.mark.mqtt
def test_start_stop_and_context_manager(tmp_path):
    state = Path(tmp_path / "b")
    cfg = BrokerConfig(str(state), port=free_port())
    with ManagedBroker(cfg) as b:
        assert b.is_running()
        socket.create_connection(("127.0.0.1", cfg.port), timeout=1).close()
        assert "set_tcp_nodelay true" in b.conf_path.read_text()
    assert not b.is_running()
    assert "mosquitto version" in b.log_path.read_text()  # stderr went to our log file
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cfg.port), timeout=1).close()


@pytest.mark.mqtt
def test_failure_to_start_raises_with_the_log_tail(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        b = ManagedBroker(BrokerConfig(str(tmp_path / "b"), port=port))
        with pytest.raises(BrokerError, match="Address already in use"):
            b.start(timeout=5)
    assert not b.is_running()


@pytest.mark.mqtt
@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop happens only when run as root")
def test_as_root_the_state_dir_goes_to_the_broker_user(broker, tmp_path, caplog):
    from conftest import start_broker

    data = broker.broker.state_dir / "data"
    assert data.stat().st_uid == broker_mod.pwd.getpwnam("mosquitto").pw_uid
    assert broker.broker.persistent
    # Under pytest's 0700 tmp dir the broker's user cannot save: said loudly, not silently.
    with caplog.at_level(logging.WARNING, "gkt.broker.test"):
        b = start_broker(tmp_path / "unreachable")
    b.stop()
    assert not b.persistent
    assert "persistence is OFF" in caplog.text


@pytest.mark.mqtt
def test_clean_restart_keeps_queued_messages(broker, make_link, topic):
    """SIGTERM saves persistence: a QoS 1 message queued for an offline persistent session
    survives the broker's restart."""
    sub = make_link(broker.url, "sub")
    got = []
    sub.subscribe(f"{topic}/x", lambda t, p: got.append(p))
    sub.close()
    pub = make_link(broker.url, "pub", reconnect_min=0.1, reconnect_max=0.5)
    pub.publish(f"{topic}/x", b"queued")
    broker.broker.restart()
    again = make_link(broker.url, "sub", connect=False)  # same client id: the saved session
    again.subscribe(f"{topic}/x", lambda t, p: got.append(p))  # before connect: see connect()
    again.connect()
    assert wait_for(lambda: got == [b"queued"], 5)


@pytest.mark.mqtt
def test_supervisor_restarts_a_dead_broker(tmp_path, caplog):
    cfg = BrokerConfig(str(tmp_path / "b"), port=free_port())
    b = ManagedBroker(cfg, supervise=True)
    b.start()
    try:
        with caplog.at_level(logging.WARNING, "gkt.broker"):
            b.kill()
            assert wait_for(lambda: b.restarts == 1 and b.is_running(), 10)
        socket.create_connection(("127.0.0.1", cfg.port), timeout=1).close()
        assert "mosquitto died" in caplog.text
    finally:
        b.stop()
    time.sleep(0.7)  # longer than the supervisor's period: it must not bring it back
    assert not b.is_running()


@pytest.mark.mqtt
def test_a_broker_left_over_by_a_killed_hub_is_replaced(tmp_path):
    cfg = BrokerConfig(str(tmp_path / "b"), port=free_port())
    first = ManagedBroker(cfg)
    first.start()
    orphan = first.proc
    second = ManagedBroker(cfg)  # as after `kill -9` of the hub: same state dir and port
    second.start()
    try:
        assert orphan.wait(timeout=5) is not None and second.is_running()
    finally:
        second.stop()


@pytest.mark.mqtt
def test_password_and_acl_are_enforced(broker_dir, broker_factory):
    pw, acl = broker_dir / "passwd", broker_dir / "acl"
    pw.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "dev1", "s3cret"], check=True)
    acl.write_text("pattern readwrite gkt/v1/dev/%u/#\n")
    give_to_broker_user(pw)
    b = broker_factory(allow_anonymous=False, password_file=str(pw), acl_file=str(acl))
    bad = MqttLink(LinkConfig(b.url, "intruder", username="dev1", password="wrong"))
    with pytest.raises(ConnectionError, match=r"refused the connection: .*0x8[67]"):
        bad.connect(timeout=5)
    dev = MqttLink(LinkConfig(b.url, "dev1", username="dev1", password="s3cret"))
    dev.connect(timeout=5)
    try:
        dev.publish("gkt/v1/dev/dev1/up", b"mine")
        with pytest.raises(ConnectionError, match="refused the publish.*authorized"):
            dev.publish("gkt/v1/dev/dev2/up", b"spoof")
    finally:
        dev.close()


@pytest.mark.mqtt
def test_tls_listener_accepts_mqtts(broker_dir, broker_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = broker_dir
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    give_to_broker_user(d / "key.pem")
    tls_port = free_port()
    broker_factory(tls_port=tls_port, cafile=str(d / "cert.pem"),
                   certfile=str(d / "cert.pem"), keyfile=str(d / "key.pem"))
    link = MqttLink(LinkConfig(f"mqtts://127.0.0.1:{tls_port}", "tls-client",
                               ca_file=str(d / "cert.pem")))
    link.connect(timeout=5)
    try:
        got = []
        link.subscribe("t/tls", lambda t, p: got.append(p))
        link.publish("t/tls", b"secret")
        assert wait_for(lambda: got == [b"secret"], 5)
    finally:
        link.close()


@pytest.mark.mqtt
@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop happens only when run as root")
def test_a_secret_the_broker_user_cannot_read_is_named_before_starting(broker_dir):
    pw = broker_dir / "passwd"
    pw.write_text("")
    pw.chmod(0o600)  # root's own: mosquitto, once it dropped to its user, could not open it
    b = ManagedBroker(BrokerConfig(str(broker_dir / "b"), port=free_port(),
                                   allow_anonymous=False, password_file=str(pw)))
    with pytest.raises(BrokerError, match=f"cannot read its password_file {pw}"):
        b.start()
    assert not b.is_running()

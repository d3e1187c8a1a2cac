import pytest

from server_hub.broker import BrokerConfig, render_config


def lines(cfg):
    return render_config(cfg).splitlines()


def test_config_has_the_lessons_learned(tmp_path):
    conf = lines(BrokerConfig(str(tmp_path), port=1999))
    assert "set_tcp_nodelay true" in conf
    assert "listener 1999 127.0.0.1" in conf
    assert "max_packet_size 524288" in conf
    assert any(c.startswith("max_queued_bytes ") for c in conf)
    assert "persistence true" in conf
    assert not any(c == "max_queued_messages 0" for c in conf)


def test_zero_packet_limit_is_omitted_not_written(tmp_path):
    # Mosquitto 2.0.11 refuses to start on `max_packet_size 0`.
    conf = lines(BrokerConfig(str(tmp_path), max_packet_size=0))
    assert not any(c.startswith("max_packet_size") for c in conf)


def test_unlimited_queue_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_queued_messages"):
        render_config(BrokerConfig(str(tmp_path), max_queued_messages=0))


def test_tls_listener_needs_its_files(tmp_path):
    with pytest.raises(ValueError, match="TLS listener"):
        render_config(BrokerConfig(str(tmp_path), tls_port=8883))
    conf = lines(BrokerConfig(str(tmp_path), tls_port=8883, cafile="ca", certfile="c",
                              keyfile="k", allow_anonymous=False, password_file="pw",
                              acl_file="acl"))
    assert "listener 8883 127.0.0.1" in conf and "allow_anonymous false" in conf
    assert "acl_file acl" in conf and "password_file pw" in conf

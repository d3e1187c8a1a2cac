"""Shared fixtures. Integration tests talk to a real Mosquitto on a free loopback port."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from server_hub.broker import BrokerConfig, ManagedBroker, find_mosquitto, free_port


@dataclass
class BrokerInfo:
    host: str
    port: int
    url: str
    broker: ManagedBroker


def start_broker(tmp_path, **overrides) -> ManagedBroker:
    find_mosquitto()  # fails the test with the install hint (CI installs Mosquitto)
    cfg = BrokerConfig(str(tmp_path / "broker"), port=free_port(), **overrides)
    broker = ManagedBroker(cfg)
    broker.start()
    return broker


@pytest.fixture
def broker(tmp_path):
    b = start_broker(tmp_path)
    yield BrokerInfo(b.cfg.host, b.cfg.port, b.url, b)
    b.stop()


_ids = itertools.count()


@pytest.fixture
def client_id(request):
    """A unique MQTT client id per test (persistent sessions must not leak across tests)."""
    return f"t{next(_ids)}-{request.node.name[:40]}"

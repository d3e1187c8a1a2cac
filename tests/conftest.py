"""Shared fixtures. Integration tests talk to a real Mosquitto on a free loopback port.

A missing Mosquitto fails the test with the install hint (CI installs it); nothing is
skipped silently.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_runtime.mqtt.link import LinkConfig, MqttLink
from server_hub.broker.mosquitto import BrokerConfig, ManagedBroker, find_mosquitto, free_port


@dataclass
class BrokerInfo:
    host: str
    port: int
    url: str
    broker: ManagedBroker  # for kill / restart tests


def start_broker(state_dir: Path, **overrides) -> ManagedBroker:
    """A ManagedBroker on a free loopback port, started (fails the test if it cannot)."""
    try:
        find_mosquitto()
    except FileNotFoundError as err:
        pytest.fail(str(err), pytrace=False)
    cfg = BrokerConfig(str(state_dir), port=free_port(), **overrides)
    broker = ManagedBroker(cfg, logger=logging.getLogger("gkt.broker.test"))
    broker.start()
    return broker


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A temp dir the broker's user can enter (for its state, passwords, certificates).
    Not under pytest's tmp_path: as root, mosquitto drops to its own user, which cannot
    enter /tmp/pytest-of-root (0700), and its persistence would be off."""
    path = Path(tempfile.mkdtemp(prefix="gkt-test-broker-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker(broker_dir) -> Iterator[BrokerInfo]:
    b = start_broker(broker_dir / "state")
    yield BrokerInfo(b.cfg.host, b.cfg.port, b.url, b)
    b.stop()


@pytest.fixture
def broker_factory(broker_dir) -> Iterator:
    """broker_factory(name, **BrokerConfig fields) -> a started ManagedBroker, stopped after."""
    started: list[ManagedBroker] = []

    def make(name: str = "b", **overrides) -> ManagedBroker:
        b = start_broker(broker_dir / name, **overrides)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


_ids = itertools.count()


@pytest.fixture
def client_id(request) -> str:
    """A unique MQTT client id per test (persistent sessions must not leak across tests)."""
    return f"t{next(_ids)}-{request.node.name[:40]}"


@pytest.fixture
def topic() -> str:
    """A unique topic prefix per test, e.g. 'test/3f2a9c1e'."""
    return f"test/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_link(client_id) -> Iterator:
    """make_link(url, name, **LinkConfig fields) -> a connected MqttLink, closed after."""
    links: list[MqttLink] = []

    def make(url: str, name: str = "c", connect: bool = True, **fields) -> MqttLink:
        link = MqttLink(LinkConfig(url, f"{client_id}-{name}", **fields))
        if connect:
            link.connect(timeout=5)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()

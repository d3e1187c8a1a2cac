"""Who may reach the managed broker: the state dir's passwords, ACL and TLS, applied.

``gkt-hub serve`` asks ``broker_access`` for the BrokerConfig fields and for how the hub
itself logs in. The rule for plain, unauthenticated MQTT: fine on a loopback address (a
local simulation); on any other address it is refused unless explicitly asked for
(``insecure``), and then it is logged as a warning at start.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

from server_hub.broker.enrol import SecurityPaths, hub_credentials, refresh_acl

log = logging.getLogger("gkt.hub")


class AccessError(ValueError):
    """The requested broker exposure is not allowed (the message says what to do)."""


@dataclass(frozen=True)
class AccessConfig:
    """Who may reach the managed broker: listen address, TLS, and --insecure."""

    state_dir: str
    listen: str = "127.0.0.1"
    tls: bool = False
    tls_port: int = 8883
    tls_hosts: tuple[str, ...] = ()  # names devices use for the hub, added to the certificate
    insecure: bool = False  # allow anonymous MQTT on a non-loopback address


@dataclass(frozen=True)
class BrokerAccess:
    """The managed broker's access fields and the hub's own login."""

    broker_fields: dict = field(default_factory=dict)  # for BrokerConfig
    username: str | None = None  # the hub's own login
    password: str | None = None
    ca_file: str | None = None  # for devices (mqtts)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def broker_access(cfg: AccessConfig) -> BrokerAccess:
    """BrokerConfig fields and the hub's login for ``cfg``; AccessError for an open broker
    on the network."""
    paths = SecurityPaths.of(cfg.state_dir)
    creds = hub_credentials(cfg.state_dir)
    exposed = not is_loopback(cfg.listen)
    if exposed and creds is None:
        if not cfg.insecure:
            raise AccessError(
                f"refusing to accept unauthenticated MQTT on {cfg.listen}: anyone on the "
                "network could publish as any device. Enrol devices first (gkt-hub device add "
                "ID --state-dir DIR), or pass --insecure for a trusted test network")
        log.warning("INSECURE: the broker accepts unauthenticated, unencrypted MQTT on %s "
                    "(--insecure); any host that reaches it can act as any device. Use this "
                    "for a local simulation only", cfg.listen)
    fields: dict = {}
    if creds is not None:
        if refresh_acl(cfg.state_dir):
            log.info("rewrote %s for this version's topics", paths.acl)
        fields.update(allow_anonymous=False, password_file=str(paths.passwd),
                      acl_file=str(paths.acl), use_username_as_clientid=True)
    ca = None
    if cfg.tls:
        from server_hub.broker.tls import ensure_tls

        hosts = list(cfg.tls_hosts) + ([cfg.listen] if exposed and cfg.listen not in
                                       ("0.0.0.0", "::") else [])
        files = ensure_tls(cfg.state_dir, hosts)
        fields.update(tls_port=cfg.tls_port, cafile=str(files.ca_cert),
                      certfile=str(files.cert), keyfile=str(files.key))
        ca = str(files.ca_cert)
    elif exposed:
        log.warning("the broker on %s has no TLS: passwords and features cross the network "
                    "in clear; pass --tls", cfg.listen)
    if creds is None:
        log.info("no devices enrolled in %s: the broker accepts anonymous clients (local "
                 "simulation only)", Path(paths.root))
    user, password = creds if creds else (None, None)
    return BrokerAccess(fields, user, password, ca)

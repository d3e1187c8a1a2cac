"""A private CA and a server certificate for the managed broker's TLS listener.

Written under ``STATE/security/``: ``ca.pem`` (give it to devices: ``--ca-file``),
``ca.key`` (stays on the hub, 0600), ``server.pem`` and ``server.key`` (read by the
broker). The CA is made once; the server certificate is made again when a host name
devices use is missing from it, or when it nears expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server_hub.broker.enrol import SecurityPaths, give_to_broker

CA_DAYS = 3650
SERVER_DAYS = 825  # what browsers and most TLS stacks accept for a leaf certificate
RENEW_DAYS = 30


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def tls_files(state_dir: str | Path) -> TlsFiles:
    root = SecurityPaths.of(state_dir).root
    return TlsFiles(root / "ca.pem", root / "ca.key", root / "server.pem", root / "server.key")


def default_hostnames() -> list[str]:
    """Names a device on this network may use for the hub."""
    return sorted({"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()})


def ensure_tls(state_dir: str | Path, hostnames: list[str] | None = None) -> TlsFiles:
    """The CA and a server certificate valid for ``hostnames`` (plus this machine's own
    names), made or renewed as needed."""
    files = tls_files(state_dir)
    files.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(set(default_hostnames()) | set(hostnames or []))
    if not (files.ca_cert.is_file() and files.ca_key.is_file()):
        _make_ca(files)
    if _needs_server_cert(files, names):
        _make_server_cert(files, names)
    return files


def certificate_names(cert_path: Path) -> list[str]:
    """DNS names and IP addresses of a certificate's subjectAltName."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted([*san.get_values_for_type(x509.DNSName),
                   *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))])


# -- internals ----------------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _make_ca(files: TlsFiles) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gkt-hub private CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(files.ca_key, key)
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.ca_cert.chmod(0o644)


def _needs_server_cert(files: TlsFiles, names: list[str]) -> bool:
    if not (files.cert.is_file() and files.key.is_file()):
        return True
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    if cert.issuer != ca.subject:  # the CA was replaced
        return True
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_DAYS):
        return True
    return not set(names) <= set(certificate_names(files.cert))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _make_server_cert(files: TlsFiles, names: list[str]) -> None:
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gkt-hub broker")]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=SERVER_DAYS))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(files.key, key)
    give_to_broker(files.key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.cert.chmod(0o644)

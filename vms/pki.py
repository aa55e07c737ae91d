"""The installation's small PKI for control plane <-> hostd connections across hosts.

One CA (``ca.crt``/``ca.key`` under ``SANDBOX_PKI_DIR``, made on first use) signs:
- one certificate per hypervisor host (``hosts/<name>.crt``): ``serverAuth`` only, its name
  (and address, when it is an IP) in subjectAltName; hostd presents it on its TLS listener;
- the control plane's client certificate (``control.crt``): ``clientAuth`` only; web and worker
  processes present it to a remote hostd.
A host's certificate cannot act as a client, nor the control plane's as a server
(``vms.hostd.tls``). Keys are EC P-256, written 0600. See docs/scale-out.md.

A second CA (``migration-ca.crt``/``.key``) signs each host's live-migration certificate
(``hosts/<name>-migration.crt``: server and client, its tunnel address in subjectAltName), with
which QEMU encrypts and authenticates a migration's stream and disk copy between two hosts. It
is a CA of its own so that a host's migration certificate, which must act as a client, is
never accepted by another host's hostd.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.conf import settings

CA_DAYS = 3650
CERT_DAYS = 825
CONTROL_NAME = "control-plane"


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def pki_dir() -> Path:
    return Path(settings.SANDBOX_PKI_DIR)


def ca_files() -> CertFiles:
    return CertFiles(pki_dir() / "ca.crt", pki_dir() / "ca.key")


def host_files(name: str) -> CertFiles:
    return CertFiles(pki_dir() / "hosts" / f"{name}.crt", pki_dir() / "hosts" / f"{name}.key")


def control_files() -> CertFiles:
    return CertFiles(pki_dir() / "control.crt", pki_dir() / "control.key")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def migration_ca_files() -> CertFiles:
    return CertFiles(pki_dir() / "migration-ca.crt", pki_dir() / "migration-ca.key")


def migration_files(name: str) -> CertFiles:
    return CertFiles(pki_dir() / "hosts" / f"{name}-migration.crt", pki_dir() / "hosts" / f"{name}-migration.key")


def ca_ensure(files: CertFiles | None = None, *, common_name: str = "microvm-sandbox hosts CA") -> CertFiles:
    """The CA's files (default: the hosts CA), made now when missing (idempotent)."""
    files = files or ca_files()
    if files.cert.exists() and files.key.exists():
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(files.key, _key_pem(key))
    _write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def cert_issue(
    files: CertFiles, *, common_name: str, usage: str, dns: list[str], ips: list[str], ca: CertFiles | None = None
) -> CertFiles:
    """Sign a new key pair for ``usage`` ("server", "client" or "peer": both) with ``ca``
    (default: the hosts CA) and write it to ``files``."""
    ca = ca or ca_ensure()
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    eku = {
        "server": [ExtendedKeyUsageOID.SERVER_AUTH],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "peer": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    }[usage]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=True)
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    _write_private(files.key, _key_pem(key))
    _write_private(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def control_ensure() -> CertFiles:
    """The control plane's client certificate, made now when missing."""
    files = control_files()
    if files.cert.exists() and files.key.exists():
        return files
    return cert_issue(files, common_name=CONTROL_NAME, usage="client", dns=[], ips=[])


def host_cert_issue(name: str, address_host: str) -> CertFiles:
    """A (new) server certificate for host ``name`` reachable at ``address_host``."""
    try:
        ips = [str(ipaddress.ip_address(address_host))]
    except ValueError:
        ips = []
    dns = [name] + ([address_host] if not ips and address_host != name else [])
    return cert_issue(host_files(name), common_name=name, usage="server", dns=dns, ips=ips)


def host_migration_cert_issue(name: str, tunnel_address: str) -> CertFiles:
    """A (new) live-migration certificate for host ``name``, signed by the migration CA: it
    listens for migrations on ``tunnel_address`` (server) and sends them (client)."""
    ca = ca_ensure(migration_ca_files(), common_name="microvm-sandbox migration CA")
    return cert_issue(
        migration_files(name), common_name=f"{name} migration", usage="peer", dns=[name], ips=[tunnel_address], ca=ca
    )


def migration_tls_local():  # -> MigrationTls | None
    """This host's migration certificates (``SANDBOX_HOST_NAME``), or None while it has none:
    then its migrations go over plain TCP."""
    from vms.vmm.base import MigrationTls

    ca, own = migration_ca_files(), migration_files(settings.SANDBOX_HOST_NAME)
    if not (ca.cert.is_file() and own.cert.is_file() and own.key.is_file()):
        return None
    return MigrationTls(ca_cert=ca.cert, cert=own.cert, key=own.key)

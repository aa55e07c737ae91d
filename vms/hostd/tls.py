"""Mutual TLS between the control plane (web, workers) and a remote host's hostd (no Django).

hostd listens on its local Unix socket always and, on a host that serves others, on a TCP port
too, TLS only, with client certificates required: a client must present a certificate signed by
the installation's CA *for client use* (extended key usage ``clientAuth``); a host's own
certificate (``serverAuth`` only) is refused as a client, so one compromised hypervisor host
cannot drive another's hostd. The client checks hostd's certificate against the same CA and
the host's name (the certificate's subjectAltName). TLS 1.3 only.

The certificates are made by ``vms.pki`` (``manage.py host_join``); see docs/scale-out.md.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsAddress:
    """Where a remote hostd listens, and how to reach it."""

    host: str
    port: int
    context: ssl.SSLContext
    server_hostname: str

    def __str__(self) -> str:
        return f"tls://{self.host}:{self.port} ({self.server_hostname})"


def server_context(*, cert: Path | str, key: Path | str, ca: Path | str) -> ssl.SSLContext:
    """hostd's side: its certificate, and client certificates required (CA-signed, clientAuth)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    # OpenSSL's default purpose check for a server verifying its peer is "SSL client": a
    # certificate whose extended key usage lacks clientAuth fails the handshake.
    return context


def client_context(*, cert: Path | str, key: Path | str, ca: Path | str) -> ssl.SSLContext:
    """The control plane's side: its client certificate; hostd's checked against the CA and name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


def parse_listen(value: str, *, any_port: bool = False) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` -> (host, port); ValueError when malformed. Port 0
    (any free port: tests) only with ``any_port``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)

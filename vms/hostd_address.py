"""Where the control plane reaches a host's hostd: this machine's over its Unix socket, another
host's over mutual TLS at the address it joined with (``vms.pki``, ``vms.hostd.tls``)."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

from django.conf import settings

from vms import pki
from vms.hostd.tls import TlsAddress, client_context, parse_listen
from vms.models import Host


def hostd_address(host: Host | None) -> Path | TlsAddress:
    """The address for ``host`` (None: this machine)."""
    if host is None or host.name == settings.SANDBOX_HOST_NAME or not host.hostd_address:
        return settings.SANDBOX_HOSTD_SOCKET
    ip, port = parse_listen(host.hostd_address)
    return TlsAddress(ip, port, _control_context(str(settings.SANDBOX_PKI_DIR)), server_hostname=host.name)


@functools.lru_cache(maxsize=4)
def _control_context(pki_dir: str) -> ssl.SSLContext:  # one per PKI directory (tests use several)
    files = pki.control_ensure()
    return client_context(cert=files.cert, key=files.key, ca=pki.ca_files().cert)

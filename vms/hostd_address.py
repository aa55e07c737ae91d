"""Where the control plane reaches a host's hostd: this machine's over its Unix socket, another
host's over mutual TLS at the address it joined with (``vms.pki``, ``vms.hostd.tls``)."""

from __future__ import annotations

import functools
import ssl
import time
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


# host id -> (when, this machine?, the TLS address otherwise): a VM's request needs its host's
# address without a query each time. Hosts change address only when they join again (then up to
# HOST_CACHE_SECONDS late); this machine's socket path is read from the settings on each call.
HOST_CACHE_SECONDS = 30.0
_HOST_CACHE_MAX = 4096
_host_cache: dict[tuple, tuple[float, bool, TlsAddress | None]] = {}


def vm_hostd_address(vm) -> Path | TlsAddress:
    """The address of ``vm``'s host's hostd (sync: may read the host row once per
    ``HOST_CACHE_SECONDS``)."""
    if vm.host_id is None:
        return settings.SANDBOX_HOSTD_SOCKET
    key = (vm.host_id, settings.SANDBOX_HOST_NAME, str(settings.SANDBOX_PKI_DIR))
    now = time.monotonic()
    cached = _host_cache.get(key)
    if cached is None or now - cached[0] > HOST_CACHE_SECONDS:
        # The host row when the VM was read with it (select_related), else one query.
        host = vm._state.fields_cache.get("host") or Host.objects.filter(pk=vm.host_id).first()
        address = hostd_address(host)
        if len(_host_cache) >= _HOST_CACHE_MAX:
            _host_cache.clear()
        cached = (now, not isinstance(address, TlsAddress), address if isinstance(address, TlsAddress) else None)
        _host_cache[key] = cached
    return settings.SANDBOX_HOSTD_SOCKET if cached[1] else cached[2]  # type: ignore[return-value]

"""``manage.py hostd``: the per-host daemon holding every VM's agent and console connection."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.management.base import BaseCommand

from sandbox_site.gc_freeze import freeze_startup_objects
from vms import pki
from vms.hostd.daemon import HostdConfig, main_run
from vms.transfer import host_roots


class Command(BaseCommand):
    help = "Run the host daemon: guest agent and serial console connections of this host's VMs (see docs/hostd.md)."

    def handle(self, *args, **options):
        logging.getLogger("vms.hostd").setLevel(logging.INFO)
        tls = {}
        if settings.SANDBOX_HOSTD_TLS_LISTEN:  # `manage.py host_join` made its certificate
            files = pki.host_files(settings.SANDBOX_HOST_NAME)
            tls = {
                "tls_listen": settings.SANDBOX_HOSTD_TLS_LISTEN,
                "tls_cert": files.cert,
                "tls_key": files.key,
                "tls_ca": pki.ca_files().cert,
            }
        config = HostdConfig(
            runtime_dir=settings.SANDBOX_RUNTIME_DIR,
            socket_path=settings.SANDBOX_HOSTD_SOCKET,
            console_ring_bytes=settings.SANDBOX_CONSOLE_RING_BYTES,
            console_log_max_bytes=settings.SANDBOX_CONSOLE_LOG_MAX_BYTES,
            scan_seconds=settings.SANDBOX_HOSTD_SCAN_SECONDS,
            metrics_port=settings.SANDBOX_HOSTD_METRICS_PORT,
            metrics_bind=settings.SANDBOX_METRICS_BIND,
            socket_group=settings.SANDBOX_HOSTD_SOCKET_GROUP,
            # What host-to-host copies (vms.transfer) read and write besides the runtime directory.
            blob_roots={name: path for name, path in host_roots().items() if name != "runtime"},
            **tls,
        )
        freeze_startup_objects()  # one event loop for every VM: no 75 ms full collections
        main_run(config)

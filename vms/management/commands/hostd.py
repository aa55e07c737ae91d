"""``manage.py hostd``: the per-host daemon holding every VM's agent and console connection."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.management.base import BaseCommand

from vms.hostd.daemon import HostdConfig, main_run


class Command(BaseCommand):
    help = "Run the host daemon: guest agent and serial console connections of this host's VMs (see docs/hostd.md)."

    def handle(self, *args, **options):
        logging.getLogger("vms.hostd").setLevel(logging.INFO)
        config = HostdConfig(
            runtime_dir=settings.SANDBOX_RUNTIME_DIR,
            socket_path=settings.SANDBOX_HOSTD_SOCKET,
            console_ring_bytes=settings.SANDBOX_CONSOLE_RING_BYTES,
            console_log_max_bytes=settings.SANDBOX_CONSOLE_LOG_MAX_BYTES,
            scan_seconds=settings.SANDBOX_HOSTD_SCAN_SECONDS,
        )
        main_run(config)

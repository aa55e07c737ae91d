"""``manage.py host_join NAME --address HOST:PORT``: register a hypervisor host and issue the
certificate its hostd presents to web and worker processes on other hosts (docs/scale-out.md)."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sandbox_site.errors import ApplicationError
from vms import pki
from vms.hosts import host_join, host_migration_cert


class Command(BaseCommand):
    help = "Register a hypervisor host (its hostd's mutual-TLS address) and issue its certificate."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the host's SANDBOX_HOST_NAME")
        parser.add_argument("--address", required=True, help="host:port where its hostd listens (TLS)")
        parser.add_argument(
            "--tunnel-address",
            default="",
            help="its underlay IPv4 address for VXLAN tunnels of networks spanning hosts (UDP 4789)",
        )

    def handle(self, *args, name: str, address: str, tunnel_address: str = "", **options):
        try:
            host, files = host_join(name=name, address=address, tunnel_address=tunnel_address)
        except ApplicationError as exc:
            raise CommandError(f"{exc.message} {exc.details or ''}") from exc
        port = address.rpartition(":")[2]
        self.stdout.write(
            f"Host {host.name} joined; its hostd is reached at {address} over mutual TLS.\n"
            f"Copy to that host's {settings.SANDBOX_PKI_DIR} (keep the key private, mode 0600):\n"
            f"  {pki.ca_files().cert}\n  {files.cert} -> hosts/{name}.crt\n  {files.key} -> hosts/{name}.key\n"
            f"and run its hostd and worker with SANDBOX_HOST_NAME={name} "
            f"SANDBOX_HOSTD_TLS_LISTEN=<its address>:{port}. Never copy {pki.ca_files().key}."
        )
        if host.tunnel_address:
            mig = host_migration_cert(host=host)
            self.stdout.write(
                "For live migrations over TLS (to and from this host), also copy:\n"
                f"  {pki.migration_ca_files().cert}\n  {mig.cert} -> hosts/{name}-migration.crt\n"
                f"  {mig.key} -> hosts/{name}-migration.key\n"
                f"Never copy {pki.migration_ca_files().key}."
            )

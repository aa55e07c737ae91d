"""hostd's Prometheus metrics, served on its own listener (``HostdConfig.metrics_port`` on
``metrics_bind``, loopback by default; no Django). See docs/operations.md."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("vms.hostd")

# hostd's own registry: what its listener serves, whatever else the process has registered.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

AGENT_SESSIONS = Counter(
    "msbx_hostd_agent_sessions", "Agent sessions started (first connects and reconnects)", registry=REGISTRY
)
AGENT_DISCONNECTS = Counter("msbx_hostd_agent_disconnects", "Agent sessions that ended while up", registry=REGISTRY)
AGENT_FRAMES = Counter(
    "msbx_hostd_agent_frames", "Frames exchanged with guest agents", ["direction"], registry=REGISTRY
)
AGENT_BYTES = Counter("msbx_hostd_agent_bytes", "Bytes exchanged with guest agents", ["direction"], registry=REGISTRY)
HOSTILE = Counter(
    "msbx_hostd_hostile_frames",
    "Guest data refused (malformed frames, ignored flow control), by kind",
    ["kind"],
    registry=REGISTRY,
)
CONSOLE_BYTES = Counter("msbx_hostd_console_bytes", "Console bytes sent to viewers", registry=REGISTRY)
CONSOLE_VIEWERS = Gauge("msbx_hostd_console_streams", "Console streams open (viewers)", registry=REGISTRY)
CLIENT_REQUESTS = Counter(
    "msbx_hostd_requests", "Client requests by op and outcome", ["op", "outcome"], registry=REGISTRY
)


class LinkCollector(Collector):
    """VMs attached and agent links up, read from the daemon at scrape time."""

    def __init__(self, statuses: Callable[[], list[dict[str, Any]]]) -> None:
        self.statuses = statuses

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            statuses = self.statuses()
        except RuntimeError:  # the VM table changed while it was copied; next scrape
            statuses = []
        attached = GaugeMetricFamily("msbx_hostd_vms_attached", "VMs hostd is attached to")
        attached.add_metric([], len(statuses))
        links = GaugeMetricFamily("msbx_hostd_agent_links_up", "VMs whose agent link is up")
        links.add_metric([], sum(1 for s in statuses if s.get("agent", {}).get("connected")))
        yield attached
        yield links


_collector: LinkCollector | None = None


def metrics_serve(port: int, address: str, statuses: Callable[[], list[dict[str, Any]]]) -> bool:
    """Serve hostd's metrics on ``address:port`` (a thread of prometheus_client); a busy port
    is logged, not fatal. False when nothing listens."""
    global _collector
    if _collector is None:
        _collector = LinkCollector(statuses)
        REGISTRY.register(_collector)
    else:
        _collector.statuses = statuses
    if port <= 0:
        return False
    try:
        start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as exc:
        logger.warning("hostd metrics: cannot listen on %s:%d (%s)", address, port, exc)
        return False
    logger.info("hostd metrics on http://%s:%d/metrics", address, port)
    return True

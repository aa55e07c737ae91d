"""Prometheus metrics of the web process and the Celery workers (docs/operations.md).

- web (``/metrics``, daphne): request rate and latency by view, request and response bytes by
  kind (``files``, ``exec``, ``api``, ``page``), websocket connections and bytes by kind
  (``console``, ``exec``, ``events``: console viewers and console bytes), and what the database
  says at scrape time: VMs by state/driver/host, host heartbeats and capacity used, operations
  pending/running and the oldest running one, the oldest audit row not sealed yet, queue depths
  in Redis, free space of the data directory.
- workers: operations (count and duration by action and outcome, queue wait), reconcile
  results, quota denials. A worker runs its tasks in pool processes, so its metrics use
  prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a fresh directory per
  worker, see sandbox_site/celery.py) and its main process serves them on its own listener
  (``SANDBOX_WORKER_METRICS_PORT`` on ``SANDBOX_METRICS_BIND``).

``/metrics`` answers only with the bearer token ``SANDBOX_METRICS_TOKEN`` when that is set,
else only to clients in ``SANDBOX_METRICS_NETWORKS`` (loopback by default).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OPERATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

HTTP_REQUESTS = Counter("msbx_http_requests", "HTTP requests handled, by view", ["view", "method", "status"])
HTTP_LATENCY = Histogram(
    "msbx_http_request_duration_seconds", "Time to answer an HTTP request, by view", ["view"], buckets=LATENCY_BUCKETS
)
HTTP_BYTES = Counter("msbx_http_body_bytes", "HTTP body bytes by kind of endpoint and direction", ["kind", "direction"])
WEBSOCKETS = Gauge(
    "msbx_websocket_connections", "Open websocket connections by kind", ["kind"], multiprocess_mode="livesum"
)
WEBSOCKET_BYTES = Counter("msbx_websocket_bytes", "Websocket bytes by kind and direction", ["kind", "direction"])
OPERATIONS = Counter("msbx_operations", "Operations finished, by action and outcome", ["action", "outcome"])
OPERATION_DURATION = Histogram(
    "msbx_operation_duration_seconds",
    "Run time of an operation on its worker, by action and outcome",
    ["action", "outcome"],
    buckets=OPERATION_BUCKETS,
)
OPERATION_QUEUE_WAIT = Histogram(
    "msbx_operation_queue_wait_seconds",
    "Time from request to a worker claiming the operation",
    ["action"],
    buckets=OPERATION_BUCKETS,
)
RECONCILE = Counter("msbx_reconcile_results", "What reconcile passes found and did, by result", ["result"])
QUOTA_DENIALS = Counter("msbx_quota_denials", "Requests refused by a user quota, by resource", ["resource"])
ADMISSION_DENIALS = Counter(
    "msbx_admission_denials", "VM launches refused because the host was full", ["host", "resource"]
)

WEBSOCKET_KINDS = (("console", re.compile(r"/console/$")), ("exec", re.compile(r"/execs/")), ("events", re.compile("")))


def websocket_kind(path: str) -> str:
    for kind, pattern in WEBSOCKET_KINDS:
        if pattern.search(path):
            return kind
    return "other"


def http_kind(path: str) -> str:
    if "/files" in path and path.startswith("/api/"):
        return "files"
    if "/exec" in path and path.startswith("/api/"):
        return "exec"
    return "api" if path.startswith("/api/") else "page"


# --- the web process ---------------------------------------------------------------------


class ObservabilityMiddleware:
    """Times each request by its resolved view and keeps the request for log lines
    (its user, once authentication resolved it). Sits right after the request-id middleware."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from sandbox_site.logs import request_bind, request_unbind

        token = request_bind(request)
        started = time.monotonic()
        try:
            response = self.get_response(request)
        finally:
            request_unbind(token)
        match = getattr(request, "resolver_match", None)
        view = (match.view_name or match.url_name or "") if match is not None else ""
        view = view or "unresolved"
        HTTP_REQUESTS.labels(view, request.method, str(response.status_code)).inc()
        HTTP_LATENCY.labels(view).observe(time.monotonic() - started)
        return response


class AsgiMetricsMiddleware:
    """ASGI wrapper: websocket connections and bytes by kind, HTTP body bytes by kind (counted
    as they pass, so streamed uploads and downloads count too)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        kind_of = websocket_kind if scope["type"] == "websocket" else http_kind
        if scope["type"] not in ("websocket", "http"):
            return await self.app(scope, receive, send)
        kind = kind_of(scope.get("path", ""))
        counter = WEBSOCKET_BYTES if scope["type"] == "websocket" else HTTP_BYTES
        inbound = counter.labels(kind, "in")
        outbound = counter.labels(kind, "out")
        accepted = False

        async def counting_receive():
            message = await receive()
            size = (
                len(message.get("bytes") or b"")
                + len((message.get("text") or "").encode())
                + len(message.get("body") or b"")
            )
            if size:
                inbound.inc(size)
            return message

        async def counting_send(message):
            nonlocal accepted
            if message["type"] == "websocket.accept" and not accepted:
                accepted = True
                WEBSOCKETS.labels(kind).inc()
            size = (
                len(message.get("bytes") or b"")
                + len((message.get("text") or "").encode())
                + len(message.get("body") or b"")
            )
            if size:
                outbound.inc(size)
            await send(message)

        try:
            return await self.app(scope, counting_receive, counting_send)
        finally:
            if accepted:
                WEBSOCKETS.labels(kind).dec()


class StateCollector:
    """What the database, Redis and the data directory say, read at scrape time (web only)."""

    def collect(self):
        from django.conf import settings
        from django.db.models import Count, Min
        from django.utils import timezone

        from vms.models import VM, Host, Operation
        from vms.selectors import host_heartbeat_age, host_is_up, hosts_with_load

        now = timezone.now()
        vms = GaugeMetricFamily("msbx_vms", "VMs by state, driver and host", labels=["state", "driver", "host"])
        for row in VM.objects.values("state", "driver", "host__name").annotate(n=Count("pk")):
            vms.add_metric([row["state"], row["driver"] or "", row["host__name"] or ""], row["n"])
        yield vms
        up = GaugeMetricFamily("msbx_host_up", "1 when the host's heartbeat is recent", labels=["host"])
        age = GaugeMetricFamily(
            "msbx_host_heartbeat_age_seconds", "Seconds since the host's heartbeat", labels=["host"]
        )
        vcpus = GaugeMetricFamily("msbx_host_vcpus", "vCPUs: capacity and given to VMs", labels=["host", "kind"])
        memory = GaugeMetricFamily(
            "msbx_host_memory_bytes", "Memory: capacity and given to VMs", labels=["host", "kind"]
        )
        for host in hosts_with_load(Host.objects.filter(is_active=True)):
            heartbeat = host_heartbeat_age(host, now)
            up.add_metric([host.name], 1 if host_is_up(host, now) else 0)
            age.add_metric([host.name], heartbeat if heartbeat is not None else float("inf"))
            vcpus.add_metric([host.name, "capacity"], host.cpus or 0)
            vcpus.add_metric([host.name, "used"], host.vcpus_used)
            memory.add_metric([host.name, "capacity"], (host.memory_mib or 0) << 20)
            memory.add_metric([host.name, "used"], host.memory_used_mib << 20)
        yield from (up, age, vcpus, memory)
        inflight = GaugeMetricFamily("msbx_operations_in_flight", "Operations pending or running", labels=["status"])
        oldest = GaugeMetricFamily(
            "msbx_operation_oldest_running_seconds", "Age of the oldest running operation", labels=["action"]
        )
        for status in (Operation.Status.PENDING, Operation.Status.RUNNING):
            inflight.add_metric([status], Operation.objects.filter(status=status).count())
        for row in (
            Operation.objects.filter(status=Operation.Status.RUNNING).values("action").annotate(start=Min("started_at"))
        ):
            if row["start"] is not None:
                oldest.add_metric([row["action"]], (now - row["start"]).total_seconds())
        yield from (inflight, oldest)
        from accounts.selectors import audit_oldest_unsealed_at

        unsealed_at = audit_oldest_unsealed_at()
        yield GaugeMetricFamily(
            "msbx_audit_oldest_unsealed_seconds",
            "Age of the oldest audit row not sealed into the hash chain yet (0: none)",
            value=(now - unsealed_at).total_seconds() if unsealed_at else 0,
        )
        queues = GaugeMetricFamily("msbx_queue_depth", "Celery messages waiting in Redis, by queue", labels=["queue"])
        for name, depth in queue_depths().items():
            queues.add_metric([name], depth)
        yield queues
        disk = GaugeMetricFamily("msbx_data_dir_bytes", "Size and free space of the data directory", labels=["kind"])
        where = settings.DATA_DIR.absolute()
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            usage = shutil.disk_usage(where)
        except OSError:
            pass
        else:
            disk.add_metric(["total"], usage.total)
            disk.add_metric(["free"], usage.free)
        yield disk


def queue_depths() -> dict[str, int]:
    """Messages waiting in each host queue and the shared queue ({} when Redis does not answer)."""
    import redis
    from django.conf import settings

    from vms.models import Host

    names = ["shared", *(h.queue for h in Host.objects.filter(is_active=True))]
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        with client:
            return {name: int(client.llen(name)) for name in names}
    except (redis.RedisError, OSError):
        return {}


_state_collector = StateCollector()
_state_registered = False


def registry_for_web() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_state_collector)
        return registry
    global _state_registered
    if not _state_registered:
        REGISTRY.register(_state_collector)
        _state_registered = True
    return REGISTRY


def metrics_allowed(request) -> bool:
    from django.conf import settings

    token = settings.SANDBOX_METRICS_TOKEN
    if token:
        import hmac

        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in settings.SANDBOX_METRICS_NETWORKS)


def metrics_view(request):
    """``GET /metrics``: Prometheus text format (token or network restricted)."""
    from django.http import HttpResponse

    if not metrics_allowed(request):
        return HttpResponse("metrics: not allowed\n", status=403, content_type="text/plain")
    return HttpResponse(generate_latest(registry_for_web()), content_type=CONTENT_TYPE_LATEST)


# --- the Celery worker ---------------------------------------------------------------------


def worker_metrics_serve(port: int, address: str) -> None:
    """Serve the worker's metrics (all its pool processes) on ``address:port``. A busy port
    is logged and skipped: the worker itself must not fail over its metrics."""
    from prometheus_client import start_http_server

    if port <= 0:
        return
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        logger.warning("worker metrics: cannot listen on %s:%d (%s); metrics are not served", address, port, exc)
        return
    logger.info("worker metrics on http://%s:%d/metrics", address, port)


def operation_observe(op, outcome: str) -> None:
    """Count a finished operation (worker side)."""
    from django.utils import timezone

    OPERATIONS.labels(op.action, outcome).inc()
    if op.started_at is not None:
        OPERATION_DURATION.labels(op.action, outcome).observe((timezone.now() - op.started_at).total_seconds())

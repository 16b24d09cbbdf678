"""``GET /metrics``: the Prometheus text format, through ``prometheus_client``.

Each application has a registry of its own (no global state): the counters
of :class:`popek.core.metrics.Collector`, read afresh on every scrape
(:class:`UsageCollector`), and the API's own request counts and latencies,
recorded by :class:`RequestMetrics`, a plain ASGI middleware around the whole
application.  Its ``route`` label is the route's template
(``/1.0/instances/{name}``), never the path asked for, so the number of
series stays bounded; a request that matched no route is ``unmatched``.

Metric names (``_total`` marks a counter, as Prometheus expects):

==========================================  =====================================
``popek_instance_cpu_seconds_total``        CPU time of the instance's cgroup
``popek_instance_memory_bytes``             its cgroup's memory now (page cache in)
``popek_instance_disk_read_bytes_total``    VMs: the guest's block devices (QMP);
``popek_instance_disk_write_bytes_total``   containers: the cgroup's block I/O
``popek_instance_network_{rx,tx}_bytes_total``, ``..._packets_total``
                                            what the instance received and sent
``popek_network_{rx,tx}_bytes_total``       a network's bridge (host side):
``popek_network_{rx,tx}_packets_total``     traffic between the network and host
``popek_metrics_collect_seconds``           what the last scrape's reads cost
``popek_api_requests_total``                ``{method,route,status}``
``popek_api_request_seconds``               histogram, ``{method,route}``
==========================================  =====================================
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from popek.core.metrics import Snapshot

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INSTANCE_LABELS = ["project", "name", "type"]
#: (metric name without ``_total``, help, InstanceUsage field)
INSTANCE_COUNTERS = (
    ("popek_instance_cpu_seconds", "CPU time used by the instance (its cgroup), in seconds",
     "cpu_seconds"),
    ("popek_instance_disk_read_bytes", "Bytes the instance read from its disks",
     "disk_read_bytes"),
    ("popek_instance_disk_write_bytes", "Bytes the instance wrote to its disks",
     "disk_write_bytes"),
    ("popek_instance_network_rx_bytes", "Bytes the instance received on its ports",
     "network_rx_bytes"),
    ("popek_instance_network_tx_bytes", "Bytes the instance sent on its ports",
     "network_tx_bytes"),
    ("popek_instance_network_rx_packets", "Packets the instance received on its ports",
     "network_rx_packets"),
    ("popek_instance_network_tx_packets", "Packets the instance sent on its ports",
     "network_tx_packets"),
)
NETWORK_COUNTERS = (
    ("popek_network_rx_bytes", "Bytes the host received from the network (its bridge)",
     "rx_bytes"),
    ("popek_network_tx_bytes", "Bytes the host sent to the network (its bridge)", "tx_bytes"),
    ("popek_network_rx_packets", "Packets the host received from the network (its bridge)",
     "rx_packets"),
    ("popek_network_tx_packets", "Packets the host sent to the network (its bridge)",
     "tx_packets"),
)
#: the classic text format (0.0.4), which every Prometheus 2 reads (what ``render`` writes)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: request latency buckets, in seconds: reads take milliseconds, a launch seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0)


#: the gauges of each storage pool: name, help, PoolUsage field
POOL_GAUGES = (
    ("popek_storage_pool_size_bytes", "Size of the filesystem holding the pool, in bytes",
     "size"),
    ("popek_storage_pool_free_bytes", "Bytes free for the pool's volumes", "free"),
    ("popek_storage_pool_used_bytes", "Bytes the pool's volume files take", "used"),
    ("popek_storage_pool_volumes", "Volumes in the pool", "volumes"),
)


def families(snap: Snapshot) -> list[Metric]:
    """The metric families of one :class:`~popek.core.metrics.Snapshot`."""
    out: list[Metric] = []
    for name, doc, attr in INSTANCE_COUNTERS:
        fam = CounterMetricFamily(name, doc, labels=INSTANCE_LABELS)
        for u in snap.instances:
            value = getattr(u, attr)
            if value is not None:
                fam.add_metric([u.project, u.name, u.type], value)
        out.append(fam)
    mem = GaugeMetricFamily("popek_instance_memory_bytes",
                            "Memory the instance's cgroup uses now, in bytes",
                            labels=INSTANCE_LABELS)
    for u in snap.instances:
        if u.memory_bytes is not None:
            mem.add_metric([u.project, u.name, u.type], u.memory_bytes)
    out.append(mem)
    for name, doc, attr in NETWORK_COUNTERS:
        fam = CounterMetricFamily(name, doc, labels=["network"])
        for n in snap.networks:
            fam.add_metric([n.name], getattr(n, attr))
        out.append(fam)
    for name, doc, attr in POOL_GAUGES:
        gauge = GaugeMetricFamily(name, doc, labels=["pool", "driver"])
        for pool in snap.pools:
            value = getattr(pool, attr)
            if value is not None:
                gauge.add_metric([pool.name, pool.driver], value)
        out.append(gauge)
    out.append(GaugeMetricFamily("popek_metrics_collect_seconds",
                                 "Seconds this scrape spent reading the counters",
                                 value=snap.seconds))
    return out


class UsageCollector(Collector):
    """A ``prometheus_client`` collector that reads the host afresh on every scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        """``snapshot`` reads the counters (:meth:`popek.core.metrics.Collector.collect`)."""
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        """The families of one fresh snapshot."""
        return families(self.snapshot())


class RequestCounters:
    """The API's request counter and latency histogram, in a registry of their own."""

    def __init__(self) -> None:
        """Register both in a fresh registry."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("popek_api_requests", "API requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.seconds = Histogram("popek_api_request_seconds",
                                 "Seconds from a request's arrival to the end of its answer",
                                 ["method", "route"], registry=self.registry, buckets=BUCKETS)


#: the request counters of each server, keyed by what its applications share (the
#: server's Runner): the local socket's and the TCP listener's requests count together
_SERVERS: weakref.WeakKeyDictionary[Any, RequestCounters] = weakref.WeakKeyDictionary()


def counters_of(server: Any) -> RequestCounters:
    """The request counters of ``server`` (made on first use, gone with it)."""
    counters = _SERVERS.get(server)
    if counters is None:
        counters = _SERVERS[server] = RequestCounters()
    return counters


class RequestMetrics:
    """ASGI middleware: counts every HTTP request and times it, by method, route and status."""

    def __init__(self, app: ASGIApp, counters: RequestCounters) -> None:
        """Wrap ``app``; record into ``counters``."""
        self.app = app
        self.requests = counters.requests
        self.seconds = counters.seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; record it once answered (500 when the app raised)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.requests.labels(method, route, str(status)).inc()
            self.seconds.labels(method, route).observe(time.perf_counter() - started)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)


def store_snapshot(project: str | None = None) -> Snapshot:
    """Read this home's counters (``project``'s only, if given) with a store of this call's own."""
    from popek.core.metrics import Collector as UsageReader
    from popek.state import open_store

    store = open_store()
    try:
        return UsageReader(store).collect(project)
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()


def scope_of(identity: Any) -> str | None:
    """The project whose instances ``identity`` may see in /metrics; ``None``: every one.

    The host admin (root on the local socket) sees the whole host; a token sees
    its own project's instances and no network (tenancy: issue 14.3).
    """
    if identity is None or getattr(identity, "host_admin", False):
        return None
    return str(identity.project)


def install(app: Any, snapshot: Callable[[str | None], Snapshot] = store_snapshot,
            server: Any = None) -> RequestCounters:
    """Serve ``GET /metrics`` on ``app`` (FastAPI) and record its requests.

    The request counters are ``server``'s (:func:`counters_of`: shared by the
    applications of one server), or the application's own without one; they
    are kept on ``app.state.metrics``.  The usage counters are read afresh
    for each scrape, in the asker's scope (:func:`scope_of`).
    """
    counters = RequestCounters() if server is None else counters_of(server)
    registry = counters.registry
    app.add_middleware(RequestMetrics, counters=counters)
    app.state.metrics = counters
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE: {}},
                                 "description": "The Prometheus text format"}})
    def metrics(request: Request) -> Response:
        """Usage counters of the active instances and networks, and the API's own."""
        project = scope_of(getattr(request.state, "identity", None))
        usage = CollectorRegistry(auto_describe=False)
        usage.register(UsageCollector(lambda: snapshot(project)))
        return Response(render(usage) + render(registry), media_type=CONTENT_TYPE)

    app.include_router(router)
    return counters

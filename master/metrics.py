"""Prometheus metrics of one master: counters bumped by the event loop, task gauges read from the store."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from master.store import Store


class _TaskCollector(Collector):
    """`ticketfarm_tasks{sweep,state}` read at scrape time through a read-only store connection."""

    def __init__(self, db_path: Path):
        self.db_path = db_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("ticketfarm_tasks", "Tasks by sweep and state.", labels=["sweep", "state"])
        if self.db_path.exists():
            store = Store(self.db_path, readonly=True)
            try:
                for sweep, state, count in store.task_counts_all():
                    family.add_metric([sweep, state], count)
            finally:
                store.close()
        yield family


class Metrics:
    """One registry per master (tests run several masters in one process). Every update is thread-safe."""

    def __init__(self, db_path: Path):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tickets_dispatched = Counter("ticketfarm_tickets_dispatched", "Tickets sent to slaves.", registry=r)
        self.tickets_finished = Counter("ticketfarm_tickets_finished", "Tickets settled, by outcome.",
                                        ["outcome"], registry=r)
        self.reassignments = Counter("ticketfarm_reassignments",
                                     "Tasks put back in the queue after a failed, timed-out or lost ticket.", registry=r)
        self.slaves = Gauge("ticketfarm_slaves", "Slaves connected now.", registry=r)
        self.dispatch_latency = Histogram(
            "ticketfarm_dispatch_latency_seconds",
            "From the event-loop pass that received a slave's REQUEST to the TICKET sent for it.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r)
        self.http_requests = Counter("ticketfarm_http_requests", "HTTP API requests, by status code.",
                                     ["code"], registry=r)
        r.register(_TaskCollector(db_path))

    def render(self) -> bytes:
        return generate_latest(self.registry)

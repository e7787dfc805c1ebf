"""Prometheus metrics of the master process: counters bumped by the event loop, and its process_* metrics.

The HTTP process serves them on /metrics (asking the master over CONTROL, op `metrics`) with its own.
"""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)


class Metrics:
    """One registry per master (tests run several masters in one process). Every update is thread-safe."""

    def __init__(self) -> None:
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
        ProcessCollector(registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

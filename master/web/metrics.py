"""The HTTP process's Prometheus metrics: request durations by route, task gauges of live sweeps, its process.

The master's own counters (dispatch, results, reassignments, its process_*) are asked of the master over CONTROL
at each scrape and served before these, so one scrape of /metrics sees both processes.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from master.web.context import WebContext

#: Request-duration buckets (s): answers from the cache take well under a millisecond.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class TaskGauges(Collector):
    """`ticketfarm_tasks{sweep,state}` for sweeps that are active, paused or ended less than http_metrics_keep
    seconds ago (finished sweeps' series go: the number of series stays bounded), and
    `ticketfarm_tasks_all{state}` over every sweep the store holds."""

    def __init__(self, ctx: "WebContext"):
        self.ctx = ctx

    def collect(self) -> Iterator[GaugeMetricFamily]:
        per_sweep = GaugeMetricFamily("ticketfarm_tasks", "Tasks of live (and just ended) sweeps, by state.",
                                      labels=["sweep", "state"])
        total = GaugeMetricFamily("ticketfarm_tasks_all", "Tasks of every stored sweep, by state.", labels=["state"])
        if self.ctx.db_path.exists():
            store = self.ctx.store()
            cutoff = time.time() - self.ctx.config.http_metrics_keep
            shown = {r.name for r in store.sweeps() if r.finished is None or r.finished >= cutoff}
            sums: dict[str, int] = {}
            for sweep, state, count in store.task_counts_all():
                sums[state] = sums.get(state, 0) + count
                if sweep in shown:
                    per_sweep.add_metric([sweep, state], count)
            for state, count in sorted(sums.items()):
                total.add_metric([state], count)
        yield per_sweep
        yield total


class WebMetrics:
    """One registry per HTTP process; updates are thread-safe."""

    def __init__(self, ctx: "WebContext"):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ticketfarm_http_requests", "HTTP API requests, by status code.", ["code"],
                                registry=r)
        self.duration = Histogram("ticketfarm_http_request_duration_seconds",
                                  "From a request's arrival to the end of its answer, by route and method.",
                                  ["route", "method"], buckets=BUCKETS, registry=r)
        ProcessCollector(namespace="ticketfarm_http", registry=r)
        r.register(TaskGauges(ctx))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(str(status)).inc()
        self.duration.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

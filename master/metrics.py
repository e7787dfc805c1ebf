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


LOST_CAUSES = {
    "deadline": "no answer before the ticket's deadline (its slave connected): the master cancelled it",
    "slave_gone": "its slave went away and did not come back before the deadline",
    "slave_silent": "its slave fell silent past the liveness window",
    "slave_restarted": "its slave came back without it (restarted, e.g. after a crash or SIGKILL)",
    "disconnected": "its slave ended the session (not a shutdown in order)",
    "key_revoked": "its slave's key was revoked",
    "interrupted": "its slave stopped in order (SIGTERM, Ctrl-C): no attempt charged",
    "returned": "handed back unstarted at the end of a batch allocation: no attempt charged",
    "timeout": "the worker ran past the task's timeout and its slave killed it",
    "worker_failed": "the worker failed: non-zero exit, killed by a signal, result missing, could not start",
    "refused": "a result no attempt can mend (an unsafe path): not retried",
    "rejected": "the sweep's validator refused the result",
}
"""The `cause` label of ticketfarm_tickets_lost_total and ticketfarm_reassignments_total (docs/HTTP.md)."""


class Metrics:
    """One registry per master (tests run several masters in one process). Every update is thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tickets_dispatched = Counter("ticketfarm_tickets_dispatched", "Tickets sent to slaves.", registry=r)
        self.tickets_finished = Counter("ticketfarm_tickets_finished", "Tickets settled, by outcome.",
                                        ["outcome"], registry=r)
        # The promise, as an operator watches it kept: what went wrong, and what the master did about it.
        self.reassignments = Counter("ticketfarm_reassignments",
                                     "Tasks put back in the queue after a ticket ended without a result, by cause.",
                                     ["cause"], registry=r)
        self.tickets_lost = Counter("ticketfarm_tickets_lost",
                                    "Tickets that ended without a result (retried or not), by cause.", ["cause"],
                                    registry=r)
        self.duplicates_suppressed = Counter(
            "ticketfarm_duplicate_results_suppressed",
            "Results for a task already done (a late or re-sent copy): acknowledged and dropped, never stored.",
            registry=r)
        self.slaves = Gauge("ticketfarm_slaves", "Slaves connected now.", registry=r)
        self.dispatch_latency = Histogram(
            "ticketfarm_dispatch_latency_seconds",
            "From the event-loop pass that received a slave's REQUEST to the TICKET sent for it.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r)
        ProcessCollector(registry=r)

    def ticket_lost(self, cause: str, requeued: bool) -> None:
        """A ticket ended without a result for `cause` (see LOST_CAUSES); `requeued`: its task runs again."""
        self.tickets_lost.labels(cause).inc()
        if requeued:
            self.reassignments.labels(cause).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

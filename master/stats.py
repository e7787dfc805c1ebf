"""Statistics from the store: per sweep (counts, throughput, ETA), per slave, failed parameter sets."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from master.store import Store


@dataclass
class SweepStats:
    """A sweep's tasks by state: total = queued + prefetched + running + paused + done + failed + cancelled."""

    name: str
    state: str
    priority: int
    total: int
    done: int
    running: int
    """Tasks a slave has started."""
    queued: int
    """Tasks waiting in the master's queue (of a paused sweep too: they go out when it resumes)."""
    failed: int
    cancelled: int
    elapsed: float
    throughput: float
    eta: float | None
    prefetched: int = 0
    """Tasks dispatched to a slave that holds them ready but has not started them."""
    paused: int = 0
    """Tasks paused one by one (`pause --task`)."""
    rejected: int = 0
    """Attempts whose result the sweep's validator refused (each one is retried, or fails its task)."""
    unrunnable: str | None = None
    """Why no connected slave can run the sweep (None: some can)."""

    @property
    def settled(self) -> int:
        return self.done + self.failed + self.cancelled


@dataclass
class SlaveStats:
    name: str
    platform: str
    slots: int
    state: str
    done: int
    failed: int
    timed_out: int
    lost: int
    cancelled: int
    busy: float
    load: float | None
    memory: float | None
    rejected: int = 0
    """Its results that a validator refused."""
    running: int = 0
    """Tickets it has started and not yet answered."""
    prefetched: int = 0
    """Tickets it holds ready but has not started."""


def sweep_stats(store: Store, name: str) -> SweepStats | None:
    row = store.sweep(name)
    if row is None:
        return None
    counts = store.task_counts(name)
    done = counts.get("done", 0)
    end = row.finished or time.time()
    elapsed = max(end - row.created, 1e-9)
    throughput = done / elapsed
    remaining = counts.get("queued", 0) + counts.get("running", 0) + counts.get("paused", 0)
    eta = remaining / throughput if throughput > 0 and remaining else (0.0 if not remaining else None)
    out = counts.get("running", 0)  # dispatched: started, or held ready by a slave
    running = store.started_tasks(name) if out else 0
    return SweepStats(name, row.state, row.priority, row.ntasks, done, running, counts.get("queued", 0),
                      counts.get("failed", 0), counts.get("cancelled", 0), elapsed, throughput, eta,
                      prefetched=out - running, paused=counts.get("paused", 0),
                      rejected=store.rejected_tickets(name), unrunnable=row.unrunnable)


def all_sweep_stats(store: Store) -> list[SweepStats]:
    return [s for row in store.sweeps() if (s := sweep_stats(store, row.name)) is not None]


def slave_stats(store: Store) -> list[SlaveStats]:
    counts = store.slave_ticket_counts()
    out_now = store.running_by_slave()
    out = []
    for s in store.slaves():
        c = counts.get(s["name"], {})
        running, prefetched = out_now.get(s["name"], (0, 0)) if s["state"] != "gone" else (0, 0)
        out.append(SlaveStats(s["name"], s["platform"] or "", s["slots"] or 0, s["state"] or "",
                              c.get("done", 0), c.get("failed", 0), c.get("timeout", 0), c.get("lost", 0),
                              c.get("cancelled", 0), c.get("busy", 0.0),
                              s["info"].get("load"), s["info"].get("memory"), c.get("rejected", 0),
                              running, prefetched))
    return out


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "?"
    if eta >= 3600:
        return f"{eta / 3600:.1f}h"
    return f"{eta / 60:.1f}m" if eta >= 60 else f"{eta:.0f}s"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned numbers."""
    cells = [[str(c) for c in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return "" if value is None else str(value)


#: The task columns of `status` (they add up to `tasks`), with the SweepStats field each one shows.
STATUS_COLUMNS = (("tasks", "total"), ("done", "done"), ("running", "running"), ("prefetched", "prefetched"),
                  ("queued", "queued"), ("paused", "paused"), ("failed", "failed"), ("cancelled", "cancelled"))


def status_table(sweeps: list[dict[str, Any]]) -> str:
    """`ticketfarm status`: one row per sweep (SweepStats fields, or the HTTP API's sweep objects), then why each
    sweep that no connected slave can run is stuck."""
    text = table(["sweep", "state", *(c for c, _ in STATUS_COLUMNS), "tasks/s"],
                 [[s["name"], "unrunnable" if s.get("unrunnable") else s["state"],
                   *(s.get(f, 0) for _, f in STATUS_COLUMNS), s["throughput"]] for s in sweeps])
    stuck = [f"{s['name']}: unrunnable: {s['unrunnable']}" for s in sweeps if s.get("unrunnable")]
    return "\n".join([text, *([""] + stuck if stuck else [])])


def format_report(store: Store, sweeps: list[str] | None = None, failures: int = 20) -> str:
    """The statistics table printed at the end of `run` and by `ticketfarm stats`."""
    stats = [s for s in all_sweep_stats(store) if sweeps is None or s.name in sweeps]
    parts = ["Sweeps", table(
        ["sweep", "state", "tasks", "done", "running", "prefetched", "queued", "paused", "failed", "cancelled",
         "rejected", "tasks/s", "elapsed s", "eta"],
        [[s.name, "unrunnable" if s.unrunnable else s.state, s.total, s.done, s.running, s.prefetched, s.queued,
          s.paused, s.failed, s.cancelled, s.rejected, s.throughput, s.elapsed, _fmt_eta(s.eta)] for s in stats])]
    stuck = [f"{s.name}: unrunnable: {s.unrunnable}" for s in stats if s.unrunnable]
    parts += ["", *stuck] if stuck else []
    slaves = slave_stats(store)
    if slaves:
        parts += ["", "Slaves", table(
            ["slave", "platform", "slots", "state", "running", "prefetched", "done", "failed", "rejected",
             "timed out", "lost", "busy s", "load", "mem %"],
            [[s.name, s.platform, s.slots, s.state, s.running, s.prefetched, s.done, s.failed, s.rejected,
              s.timed_out, s.lost, s.busy, s.load, s.memory] for s in slaves])]
    for s in stats:
        failed = store.failed_tasks(s.name)
        if failed:
            parts += ["", f"Failed tasks of {s.name} ({len(failed)})"]
            parts += [f"  task {idx} {params}: {reason}" for idx, params, reason in failed[:failures]]
            if len(failed) > failures:
                parts.append(f"  ... and {len(failed) - failures} more")
        warned = store.warnings(s.name)
        if warned:
            parts += ["", f"Warning: {len(warned)} done task(s) of {s.name} exited 0 with every result empty "
                          "but wrote to stderr (a failure the exit status hid?)"]
            parts += [f"  task {idx}: {reason}" for idx, reason in warned[:failures]]
            if len(warned) > failures:
                parts.append(f"  ... and {len(warned) - failures} more")
    return "\n".join(parts)

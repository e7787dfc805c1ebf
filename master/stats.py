"""Statistics from the store: per sweep (counts, throughput, ETA), per slave, failed parameter sets."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from master.store import Store


@dataclass
class SweepStats:
    name: str
    state: str
    priority: int
    total: int
    done: int
    running: int
    queued: int
    failed: int
    cancelled: int
    elapsed: float
    throughput: float
    eta: float | None

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
    return SweepStats(name, row.state, row.priority, row.ntasks, done, counts.get("running", 0),
                      counts.get("queued", 0) + counts.get("paused", 0), counts.get("failed", 0), counts.get("cancelled", 0),
                      elapsed, throughput, eta)


def all_sweep_stats(store: Store) -> list[SweepStats]:
    return [s for row in store.sweeps() if (s := sweep_stats(store, row.name)) is not None]


def slave_stats(store: Store) -> list[SlaveStats]:
    counts = store.slave_ticket_counts()
    out = []
    for s in store.slaves():
        c = counts.get(s["name"], {})
        out.append(SlaveStats(s["name"], s["platform"] or "", s["slots"] or 0, s["state"] or "",
                              c.get("done", 0), c.get("failed", 0), c.get("timeout", 0), c.get("lost", 0),
                              c.get("cancelled", 0), c.get("busy", 0.0),
                              s["info"].get("load"), s["info"].get("memory")))
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


def format_report(store: Store, sweeps: list[str] | None = None, failures: int = 20) -> str:
    """The statistics table printed at the end of `run` and by `ticketfarm stats`."""
    stats = [s for s in all_sweep_stats(store) if sweeps is None or s.name in sweeps]
    parts = ["Sweeps", table(
        ["sweep", "state", "tasks", "done", "running", "queued", "failed", "tasks/s", "elapsed s", "eta"],
        [[s.name, s.state, s.total, s.done, s.running, s.queued, s.failed, s.throughput, s.elapsed, _fmt_eta(s.eta)]
         for s in stats])]
    slaves = slave_stats(store)
    if slaves:
        parts += ["", "Slaves", table(
            ["slave", "platform", "slots", "state", "done", "failed", "timed out", "lost", "busy s", "load", "mem %"],
            [[s.name, s.platform, s.slots, s.state, s.done, s.failed, s.timed_out, s.lost, s.busy, s.load, s.memory]
             for s in slaves])]
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

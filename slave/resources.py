"""What a slave offers (CPUs, memory) and the memory watchdog that kills a worker over its task's limit."""
from __future__ import annotations

import os
import time
from typing import Any

import psutil
import structlog

log = structlog.get_logger("ticketfarm.resources")

MIB = 1024 * 1024


def capacity(cpus: int, memory_mb: int) -> tuple[int, int]:
    """(CPUs, MiB) this slave offers to tasks that claim resources: the configured values, or the machine's."""
    return (cpus or os.cpu_count() or 1, memory_mb or psutil.virtual_memory().total // MIB)


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def fits_now(memory_mb: int, running: int) -> bool:
    """A task claiming memory starts only while the machine has that much available (or when nothing else runs)."""
    return not memory_mb or not running or psutil.virtual_memory().available >= memory_mb * MIB


class MemoryWatch:
    """Checks running workers with a memory limit every `every` seconds; kills the ones over it (reason `memory`)."""

    def __init__(self, every: float):
        self.every = every
        self.next_check = 0.0

    def check(self, workers: dict[int, Any]) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.every
        for worker in workers.values():
            limit = getattr(worker.spec, "memory", 0)
            proc = getattr(worker, "proc", None)
            if not limit or proc is None or worker.killed_for:
                continue
            used = tree_rss(proc.pid)
            if used > limit * MIB:
                reason = f"memory: the worker used {used // MIB} MiB, over the task's limit of {limit} MiB"
                log.info("ticket_memory_exceeded", ticket=worker.spec.ticket, used_mb=used // MIB, limit_mb=limit)
                worker.kill(reason)

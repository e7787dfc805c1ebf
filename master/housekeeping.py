"""Housekeeping on the master's loop: pruning expired results and events, store checkpoints, telling idle slaves."""
from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Any

import structlog

from ticketfarm import messages

if TYPE_CHECKING:
    from master.server import Master

log = structlog.get_logger("ticketfarm.housekeeping")

#: Rows deleted per transaction while pruning, so the loop is never held up for long.
PRUNE_BATCH = 2000


class Housekeeping:
    """Periodic chores; `tick()` runs about four times per heartbeat interval."""

    def __init__(self, master: "Master"):
        self.master = master
        self.next_prune = time.time() + 5.0  # not in the middle of a restart's reconnection storm
        self.told_no_work: set[bytes] = set()
        self._had_sweeps = False

    def tick(self, now: float) -> None:
        master = self.master
        if master.hungry:
            if master.scheduler.has_queued():
                master._dispatch_hungry()  # a per-sweep limit or a resource may have freed up
            self._tell_no_work()
        if now >= self.next_prune:
            self.next_prune = now + max(master.config.prune_every_hours, 0.001) * 3600
            self.prune(now)

    def slave_policy(self) -> messages.SlavePolicy:
        """Settings the master imposes on slaves at WELCOME (seed 004's DeleteWorker; none by default)."""
        config = self.master.config
        return messages.SlavePolicy(
            on_no_work=config.slave_on_no_work if config.slave_on_no_work in ("stay", "exit") else "",
            delete_workers=config.slave_delete_workers == "yes" if config.slave_delete_workers in ("yes", "no")
            else None,
            on_master_shutdown="exit" if config.slave_exit_when_done else "")

    # -- end of work -----------------------------------------------------------------------------
    def _tell_no_work(self) -> None:
        """Every sweep is over: say so once to each idle slave (it stays or exits per its own config)."""
        master = self.master
        if master.scheduler.active:
            self.told_no_work.clear()
            return
        if not self._had_sweeps:
            self._had_sweeps = master.store.has_sweeps()
            if not self._had_sweeps:
                return
        for identity, session in list(master.hungry.items()):
            if identity not in self.told_no_work and not master.transfers and not master.validator.pending:
                self.told_no_work.add(identity)
                master._send(identity, messages.NoWork("every sweep is over"))
                log.info("told_no_work", slave=session.name)

    # -- pruning -----------------------------------------------------------------------------------
    def prune(self, now: float, keep_days: float | None = None) -> dict[str, Any]:
        """Delete results of tasks settled more than keep_days ago (uncollected: collected ones are gone) and old events."""
        master = self.master
        keep = master.config.keep_days if keep_days is None else keep_days
        cutoff = now - keep * 86400
        store = master.store
        master._commit_and_ack()
        pruned: dict[str, int] = {}
        while True:
            rows = store.expired_results(cutoff, PRUNE_BATCH)
            if not rows:
                break
            store.delete_results([(s, t, n) for s, t, n, _ in rows])
            for sweep, task, _name, path in rows:
                pruned[sweep] = pruned.get(sweep, 0) + 1
                if path:
                    (master.state_dir / path).unlink(missing_ok=True)
            store.commit()
        for sweep, count in pruned.items():
            if not store.has_result_files(sweep):
                shutil.rmtree(master.results_dir / sweep, ignore_errors=True)
            store.event("results_pruned", sweep=sweep, detail={"results": count, "keep_days": keep})
            log.info("results_pruned", sweep=sweep, results=count, keep_days=keep)
        events = store.prune_events(cutoff)
        store.commit()
        if pruned or events:
            store.reclaim_space()
        return {"results": sum(pruned.values()), "sweeps": sorted(pruned), "events": events}

"""Housekeeping on the master's loop: pruning expired results and events, store checkpoints, telling idle slaves."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from master.config import MasterConfig
from master.dispatch import Dispatch
from master.intake import Intake
from master.link import Link
from master.scheduler import Scheduler
from master.store import Store
from ticketfarm import messages

log = structlog.get_logger("ticketfarm.housekeeping")

#: Rows deleted per transaction while pruning, so the loop is never held up for long.
PRUNE_BATCH = 2000


class Housekeeping:
    """Periodic chores; `tick()` runs about four times per heartbeat interval."""

    def __init__(self, config: MasterConfig, store: Store, state_dir: Path, link: Link, scheduler: Scheduler,
                 dispatch: Dispatch, intake: Intake, commit: Callable[[], None]):
        self.config = config
        self.store = store
        self.scheduler = scheduler  # read only: is any work queued, is any sweep active
        self.state_dir = state_dir
        self.results_dir = state_dir / "results"
        self.link = link
        self.dispatch = dispatch
        self.intake = intake
        self.commit = commit
        self.next_prune = time.time() + 5.0  # not in the middle of a restart's reconnection storm
        self.told_no_work: set[bytes] = set()
        self._had_sweeps = False

    def tick(self, now: float) -> None:
        if self.dispatch.hungry:
            if self.scheduler.has_queued():
                self.dispatch.serve_hungry()  # a per-sweep limit or a resource may have freed up
            self._tell_no_work()
        if now >= self.next_prune:
            self.next_prune = now + max(self.config.prune_every_hours, 0.001) * 3600
            self.prune(now)

    def slave_policy(self) -> messages.SlavePolicy:
        """Settings the master imposes on slaves at WELCOME (seed 004's DeleteWorker; none by default)."""
        config = self.config
        return messages.SlavePolicy(
            on_no_work=config.slave_on_no_work if config.slave_on_no_work in ("stay", "exit") else "",
            delete_workers=config.slave_delete_workers == "yes" if config.slave_delete_workers in ("yes", "no")
            else None,
            on_master_shutdown="exit" if config.slave_exit_when_done else "")

    # -- end of work -----------------------------------------------------------------------------
    def _tell_no_work(self) -> None:
        """Every sweep is over: say so once to each idle slave (it stays or exits per its own config)."""
        if self.scheduler.active:
            self.told_no_work.clear()
            return
        if not self._had_sweeps:
            self._had_sweeps = self.store.has_sweeps()
            if not self._had_sweeps:
                return
        for identity, session in list(self.dispatch.hungry.items()):
            if identity not in self.told_no_work and not self.intake.busy:
                self.told_no_work.add(identity)
                self.link.send(identity, messages.NoWork("every sweep is over"))
                log.info("told_no_work", slave=session.name)

    # -- pruning -----------------------------------------------------------------------------------
    def prune(self, now: float, keep_days: float | None = None) -> dict[str, Any]:
        """Delete results of tasks settled more than keep_days ago (uncollected: collected ones are gone) and old events."""
        keep = self.config.keep_days if keep_days is None else keep_days
        cutoff = now - keep * 86400
        store = self.store
        self.commit()
        pruned: dict[str, int] = {}
        while True:
            rows = store.expired_results(cutoff, PRUNE_BATCH)
            if not rows:
                break
            store.delete_results([(s, t, n) for s, t, n, _ in rows])
            for sweep, task, _name, path in rows:
                pruned[sweep] = pruned.get(sweep, 0) + 1
                if path:
                    (self.state_dir / path).unlink(missing_ok=True)
            store.commit()
        for sweep, count in pruned.items():
            if not store.has_result_files(sweep):
                shutil.rmtree(self.results_dir / sweep, ignore_errors=True)
            store.event("results_pruned", sweep=sweep, detail={"results": count, "keep_days": keep})
            log.info("results_pruned", sweep=sweep, results=count, keep_days=keep)
        events = store.prune_events(cutoff)
        store.commit()
        if pruned or events:
            store.reclaim_space()
        return {"results": sum(pruned.values()), "sweeps": sorted(pruned), "events": events}

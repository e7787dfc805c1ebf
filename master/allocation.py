"""Allocation queues: batch jobs that run slaves, submitted while queued work outgrows the slaves there are.

Policy, checked on every tick of the master's loop:
- a queue submits one job at a time while queued tasks exceed the idle connected slots plus the slots of jobs
  not yet connected, up to its max_pending / max_running;
- a refused submission is shown with the scheduler's text and retried after a back-off that doubles; so is a
  job that ended before any of its slaves connected, and a queue whose walltime fits no queued task submits none;
- when nothing is queued, jobs still pending are cancelled (running ones end when their idle slaves leave);
- queues and jobs live in the store: a restarted master watches its jobs again by scheduler job id, and
  a job that ended (scancel, walltime, node failure) takes its slaves with it: their tickets are re-queued
  by the master's liveness rules like any lost slave's.
"""
from __future__ import annotations

import re
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from master.alloc_files import QueueFiles
from master.batch import LIVE_STATES, BatchSystem, JobChange, JobRequest, QueueSpec, SubmitFailed
from master.store import Store
from ticketfarm.errors import ConfigError

if TYPE_CHECKING:
    from master.config import MasterConfig

log = structlog.get_logger("ticketfarm.allocation")

#: A slave started by an allocation job: QUEUE-jJOB-RANK.
SLAVE_NAME = re.compile(r"(\w+)-j(\d+)-.+")
#: How the error of a queue whose jobs could run no queued task starts.
TOO_SHORT = "walltime too short"
#: Longest back-off (s) between two refused submissions of one queue.
BACKOFF_MAX = 600.0

Reply = dict[str, Any]


@dataclass
class Demand:
    """What the allocator is told about the work: queued tasks (by their timeout), tickets out, connected slaves
    and their slots."""

    queued: dict[float, int]
    running: int
    slaves: dict[str, int]


@dataclass
class Queue:
    spec: QueueSpec
    paused: bool = False
    error: str | None = None
    errors: int = 0
    retry_at: float = 0.0


@dataclass
class LiveJob:
    """A job that may still run slaves; `seen` are its slaves that connected at least once."""

    id: int
    queue: str
    native_id: str | None
    state: str
    slaves: int
    seen: set[str] = field(default_factory=set)
    reattached: bool = False
    """Found again after a master restart: its slaves may have come and gone before this master saw them."""


def _fail(code: str, message: str) -> Reply:
    return {"ok": False, "code": code, "error": message}


class Allocator:
    """Owns the allocation queues and jobs: `tick()` runs on the master's loop, `control()` serves CLI and HTTP."""

    def __init__(self, store: Store, files: QueueFiles, batch: BatchSystem, configured: dict[str, QueueSpec],
                 backoff: float):
        self.store = store
        self.files = files
        self.batch = batch
        self.backoff = backoff
        self.queues: dict[str, Queue] = {}
        self.jobs: dict[int, LiveJob] = {}
        self.submitting: dict[int, Future] = {}
        for row in store.alloc_queues():
            self.queues[row["name"]] = Queue(QueueSpec(**row["spec"]), row["paused"], row["error"], row["errors"],
                                             row["retry_at"] or 0.0)
        for spec in configured.values():  # master.toml wins over what was stored for the same name
            self._add(spec, self.queues.get(spec.name, Queue(spec)))
        self._reattach()

    def _reattach(self) -> None:
        """Watch again the jobs a previous master left; one without a scheduler id was never submitted for sure."""
        for row in self.store.alloc_jobs():
            if row["state"] not in LIVE_STATES:
                continue
            queue = self.queues.get(row["queue"])
            if row["native_id"] is None or queue is None:
                self.store.set_alloc_job(row["id"], state="lost", ended=time.time(),
                                         reason="the master stopped while submitting it")
                continue
            try:
                self.batch.attach(row["id"], queue.spec.kind, row["native_id"])
            except SubmitFailed as exc:
                self.store.set_alloc_job(row["id"], state="lost", ended=time.time(), reason=f"cannot watch it: {exc}")
                continue
            self.jobs[row["id"]] = LiveJob(row["id"], row["queue"], row["native_id"], row["state"], row["slaves"],
                                           reattached=True)
            log.info("alloc_job_reattached", queue=row["queue"], job=row["id"], native_id=row["native_id"])

    @classmethod
    def for_master(cls, config: "MasterConfig", state_dir: Path, store: Store, endpoint: str) -> "Allocator":
        files = QueueFiles(state_dir, endpoint, config.insecure, config.heartbeat_interval, config.liveness)
        batch = BatchSystem(Path(state_dir).resolve() / "alloc" / "psij", config.alloc_poll_interval)
        return cls(store, files, batch, config.alloc, config.alloc_backoff)

    @property
    def active(self) -> bool:
        return bool(self.queues)

    # -- the loop -------------------------------------------------------------------------------
    def tick(self, now: float, demand: Demand) -> None:
        self._collect_submissions(now)
        self._note_slaves(demand.slaves)  # first: a slave that came and went within one tick still counts
        for change in self.batch.changes():
            self._apply(change, now)
        queued = sum(demand.queued.values())
        if queued == 0:
            self._cancel_pending()
            return
        idle = max(0, sum(demand.slaves.values()) - demand.running)
        shortfall = queued - idle - sum(self._coming_slots(job) for job in self.jobs.values())
        for name, queue in self.queues.items():
            if shortfall > 0 and not self._can_run(name, queue, demand.queued):
                continue
            while shortfall > 0 and self._may_submit(name, queue, now):
                self._submit(name, queue, now)
                shortfall -= queue.spec.slots_per_job

    def _can_run(self, name: str, queue: Queue, queued: dict[float, int]) -> bool:
        """Whether a slave of this queue could take any queued task: else its jobs would start only to hand back."""
        spec = queue.spec
        if any(timeout + spec.handback < spec.walltime for timeout in queued):
            if queue.error and queue.error.startswith(TOO_SHORT):
                self._set_error(name, queue, None, 0, 0.0)
            return True
        error = (f"{TOO_SHORT}: walltime {spec.walltime:g}s less handback {spec.handback:g}s leaves no time for a "
                 f"task of any queued sweep (shortest timeout {min(queued):g}s); no job submitted")
        if queue.error != error:
            self._set_error(name, queue, error, 0, 0.0)
            log.warning("alloc_walltime_too_short", queue=name, error=error)
        return False

    def _set_error(self, name: str, queue: Queue, error: str | None, errors: int, retry_at: float) -> None:
        queue.error, queue.errors, queue.retry_at = error, errors, retry_at
        self.store.set_alloc_queue(name, error=error, errors=errors, retry_at=retry_at or None)

    def _coming_slots(self, job: LiveJob) -> int:
        """Slots of a job's slaves that have not connected yet (all of them while it is pending)."""
        queue = self.queues.get(job.queue)
        if queue is None or job.state == "cancelling":
            return 0
        return max(0, job.slaves - len(job.seen)) * queue.spec.slots_per_slave

    def _may_submit(self, name: str, queue: Queue, now: float) -> bool:
        if queue.paused or now < queue.retry_at:
            return False
        jobs = [j for j in self.jobs.values() if j.queue == name]
        if any(j.state == "submitting" for j in jobs):
            return False  # one submission in flight per queue: a refusal is seen before the next try
        pending = sum(1 for j in jobs if j.state == "pending")
        return pending < queue.spec.max_pending and len(jobs) < queue.spec.max_running

    def _submit(self, name: str, queue: Queue, now: float) -> None:
        spec = queue.spec
        job_id = self.store.add_alloc_job(name, spec.slaves_per_job)
        self.jobs[job_id] = LiveJob(job_id, name, None, "submitting", spec.slaves_per_job)
        try:
            paths = self.files.prepare(spec)
        except OSError as exc:
            self._refused(self.jobs[job_id], queue, f"cannot write the queue's files: {exc}", now)
            return
        request = JobRequest(spec, f"ticketfarm-{name}-j{job_id}",
                             ["--config", str(paths.slave_config), "--name", f"{name}-j{job_id}-{spec.rank()}"],
                             paths.setup, paths.directory)
        self.submitting[job_id] = self.batch.submit(job_id, request)
        log.info("alloc_job_submitting", queue=name, job=job_id, slaves=spec.slaves_per_job)

    def _collect_submissions(self, now: float) -> None:
        for job_id, future in [(k, f) for k, f in self.submitting.items() if f.done()]:
            del self.submitting[job_id]
            job = self.jobs.get(job_id)
            if job is None:
                continue  # its queue was removed meanwhile
            queue = self.queues[job.queue]
            try:
                job.native_id = future.result()
            except (SubmitFailed, OSError, ConfigError) as exc:
                self._refused(job, queue, str(exc), now)
                continue
            except Exception as exc:  # noqa: BLE001 - a failing submission must never take the master down
                log.exception("alloc_submit_crashed", queue=job.queue, job=job_id)
                self._refused(job, queue, f"submission failed: {type(exc).__name__}: {exc}", now)
                continue
            if job.state == "submitting":  # PSI/J may have reported QUEUED already
                job.state = "pending"
            self.store.set_alloc_job(job_id, native_id=job.native_id, state=job.state)
            if queue.error:
                self._set_error(job.queue, queue, None, 0, 0.0)
            log.info("alloc_job_submitted", queue=job.queue, job=job_id, native_id=job.native_id)

    def _refused(self, job: LiveJob, queue: Queue, error: str, now: float) -> None:
        del self.jobs[job.id]
        self.store.delete_alloc_job(job.id)
        errors = queue.errors + 1
        self._set_error(job.queue, queue, error, errors, now + min(BACKOFF_MAX, self.backoff * 2 ** (errors - 1)))
        log.warning("alloc_submit_refused", queue=job.queue, error=error, retry_in=round(queue.retry_at - now, 1))

    def _apply(self, change: JobChange, now: float) -> None:
        job = self.jobs.get(change.key)
        if job is None or change.state == job.state or change.state == "submitting":
            return
        if job.state == "cancelling" and change.state in LIVE_STATES:
            return  # a poll from before the cancellation
        job.state = change.state
        if change.state == "running":
            self.store.set_alloc_job(job.id, state="running", started=now)
        elif change.state == "pending":
            self.store.set_alloc_job(job.id, state="pending")
        else:
            del self.jobs[job.id]
            self.store.set_alloc_job(job.id, state=change.state, ended=now, exit_code=change.exit_code,
                                     reason=change.reason)
        log.info("alloc_job_state", queue=job.queue, job=job.id, native_id=job.native_id, state=change.state,
                 exit_code=change.exit_code, reason=change.reason)
        if change.state in ("completed", "failed") and not job.seen and not job.reattached:
            self._ended_without_slaves(job, change, now)

    def _ended_without_slaves(self, job: LiveJob, change: JobChange, now: float) -> None:
        """A job whose slaves never reached the master (wrong address, setup failing): back off, as for a refusal,
        rather than submit the same failure again and again."""
        queue = self.queues.get(job.queue)
        if queue is None:
            return
        detail = change.reason or (f"exit code {change.exit_code}" if change.exit_code is not None else "no reason")
        error = (f"job {job.id} ({job.native_id}) ended {change.state} before any of its slaves connected: "
                 f"{detail.strip()}; the slaves' output is in {self.files.directory(job.queue) / 'jobs'}")
        errors = queue.errors + 1
        self._set_error(job.queue, queue, error, errors, now + min(BACKOFF_MAX, self.backoff * 2 ** (errors - 1)))
        log.warning("alloc_job_without_slaves", queue=job.queue, error=error)

    def _note_slaves(self, slaves: dict[str, int]) -> None:
        for name in slaves:
            match = SLAVE_NAME.fullmatch(name)
            job = self.jobs.get(int(match.group(2))) if match else None
            if job is not None and match.group(1) == job.queue:  # type: ignore[union-attr]
                job.seen.add(name)

    def _cancel_pending(self) -> None:
        for job in self.jobs.values():
            if job.state == "pending":
                self._cancel(job)

    def _cancel(self, job: LiveJob) -> None:
        job.state = "cancelling"  # once: the scheduler's answer comes as a state change
        self.store.set_alloc_job(job.id, state="cancelling")
        self.batch.cancel(job.id)
        log.info("alloc_job_cancel", queue=job.queue, job=job.id, native_id=job.native_id)

    # -- control (CLI verbs, HTTP) ------------------------------------------------------------------
    def control(self, header: dict[str, Any]) -> Reply:
        action = header.get("action")
        if action == "list":
            return {"ok": True, "queues": self.listing(), "scheduler_calls": dict(self.batch.calls)}
        if action == "add":
            data = header.get("queue")
            if not isinstance(data, dict):
                raise ValueError("field 'queue' missing or not a table")
            spec = QueueSpec.parse(data, "alloc add")
            if spec.name in self.queues:
                return _fail("conflict", f"allocation queue {spec.name!r} exists; remove it first")
            self._add(spec, Queue(spec))
            return {"ok": True, "queue": spec.name}
        name = header.get("queue")
        queue = self.queues.get(name) if isinstance(name, str) else None
        if queue is None:
            return _fail("not_found", f"no allocation queue {name!r}")
        if action in ("pause", "resume"):
            queue.paused = action == "pause"
            self.store.set_alloc_queue(name, paused=int(queue.paused))
            return {"ok": True, "paused": queue.paused}
        if action == "remove":
            self._remove(name)
            return {"ok": True}
        raise ValueError(f"unknown alloc action {action!r} (add, list, pause, resume, remove)")

    def _add(self, spec: QueueSpec, queue: Queue) -> None:
        queue.spec = spec
        self.files.prepare(spec)
        self.store.save_alloc_queue(spec.name, spec.to_dict())
        self.queues[spec.name] = queue

    def _remove(self, name: str) -> None:
        """Cancel every job of the queue (running ones too), forget it and revoke its slaves' key."""
        for job in [j for j in self.jobs.values() if j.queue == name]:
            if job.native_id is not None:
                self.batch.cancel(job.id)
            del self.jobs[job.id]
        del self.queues[name]
        self.store.remove_alloc_queue(name)
        self.files.remove(name)
        log.info("alloc_queue_removed", queue=name)

    def listing(self) -> list[dict[str, Any]]:
        """Each queue with its settings, state, last refusal and its jobs (live ones and the last ended)."""
        jobs: dict[str, list[dict[str, Any]]] = {}
        for row in self.store.alloc_jobs():
            live = self.jobs.get(row["id"])
            row["slaves_seen"] = sorted(live.seen) if live else []
            jobs.setdefault(row["queue"], []).append(row)
        return [{"name": name, "spec": q.spec.to_dict(), "paused": q.paused, "error": q.error, "errors": q.errors,
                 "retry_at": q.retry_at or None, "jobs": jobs.get(name, [])} for name, q in self.queues.items()]

    def close(self) -> None:
        self.batch.close()

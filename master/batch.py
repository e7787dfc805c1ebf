"""Batch-scheduler jobs through PSI/J: an allocation queue's settings, submit/cancel off the loop, job states as events.

PSI/J (psij-python, ExaWorks) writes the batch script, runs sbatch/squeue/scancel (or qsub, bsub, flux) and
polls the scheduler in a thread of its own: one status command per poll for all jobs of an executor. Nothing
here blocks the master's loop: submissions and cancellations run on one worker thread, and every state change
PSI/J reports is queued for `BatchSystem.changes()`, which the loop drains.
"""
from __future__ import annotations

import datetime
import queue
import re
import shlex
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ticketfarm.errors import ConfigError, TicketfarmError

#: The environment variable that numbers the slaves of one job, per scheduler (for slaves_per_job > 1).
RANK_VARIABLES = {"slurm": "SLURM_PROCID", "flux": "FLUX_TASK_RANK", "pbs": "PMI_RANK", "lsf": "PMIX_RANK"}
#: PSI/J job states as the master names them.
STATES = {"NEW": "submitting", "QUEUED": "pending", "ACTIVE": "running", "COMPLETED": "completed",
          "FAILED": "failed", "CANCELED": "cancelled"}
#: States of a job that may still start or run slaves.
LIVE_STATES = ("submitting", "pending", "running", "cancelling")
QUEUE_NAME = re.compile(r"[A-Za-z0-9_]{1,40}")


class SubmitFailed(TicketfarmError):
    """The scheduler refused a job; the message is the scheduler's own error text."""


@dataclass
class QueueSpec:
    """One allocation queue ([alloc.NAME] in master.toml, or `ticketfarm alloc add`)."""

    name: str = ""
    """Queue name (letters, digits, underscore); its slaves are named NAME-jJOB-RANK."""
    kind: str = "slurm"
    """Scheduler, as a PSI/J executor name: "slurm" (tested here), "pbs", "lsf", "flux", "cobalt"."""
    partition: str = ""
    """Partition (Slurm) or queue (PBS, LSF) the jobs go to ("" = the scheduler's default)."""
    account: str = ""
    """Account / project charged for the jobs ("" = the user's default)."""
    walltime: float = 3600.0
    """Time limit of each job (s); its slaves hand their tickets back `handback` seconds before it."""
    slaves_per_job: int = 1
    """Slaves started by one job (one task each, launched with srun on Slurm)."""
    slots_per_slave: int = 1
    """Worker slots of each slave; the job asks for this many CPUs per slave."""
    max_pending: int = 2
    """Jobs of this queue waiting in the scheduler at most."""
    max_running: int = 4
    """Jobs of this queue submitted and not ended (pending + running) at most."""
    extra_args: list = field(default_factory=list)
    """More scheduler options, each "--key=value" (e.g. "--qos=debug"), written as directives of the job."""
    setup: str = ""
    """Shell lines run before the slave starts (module load, venv activation)."""
    idle_timeout: float = 60.0
    """Seconds a slave of this queue waits with nothing to do before it leaves (and its job ends)."""
    handback: float = 60.0
    """Seconds before the walltime at which a slave hands back what it holds; it takes no ticket that would
    run past this point."""
    slave_command: str = "ticketfarm-slave"
    """The slave's command (split like a shell would) as the job finds it after `setup`."""
    master_address: str = ""
    """The master's endpoint as compute nodes reach it ("" = the master's bind address)."""

    @classmethod
    def parse(cls, data: dict[str, Any], source: str) -> "QueueSpec":
        """A queue from a TOML table or a control request, refusing unknown keys and wrong types by name."""
        defaults = cls()
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown field {key!r} (known: {', '.join(sorted(known))})", key)
            expected = type(getattr(defaults, key))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                data = {**data, key: float(value)}
            elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"{source}: field {key!r} must be {expected.__name__}, got {value!r}", key)
        spec = cls(**data)
        spec.check(source)
        return spec

    def check(self, source: str) -> None:
        if not QUEUE_NAME.fullmatch(self.name):
            raise ConfigError(f"{source}: queue name {self.name!r} must be 1-40 letters, digits or underscores",
                              "name")
        for key in ("slaves_per_job", "slots_per_slave", "max_pending", "max_running"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{source}: field {key!r} must be >= 1", key)
        if self.walltime <= self.handback or self.handback < 0:
            raise ConfigError(f"{source}: field 'walltime' must be longer than 'handback' (>= 0)", "walltime")
        if self.slaves_per_job > 1 and self.kind not in RANK_VARIABLES:
            raise ConfigError(f"{source}: slaves_per_job > 1 needs one of {sorted(RANK_VARIABLES)}", "slaves_per_job")
        try:
            if not shlex.split(self.slave_command):
                raise ValueError("empty")
        except ValueError as exc:
            raise ConfigError(f"{source}: field 'slave_command' is no command: {exc}", "slave_command") from None
        for arg in self.extra_args:
            if not isinstance(arg, str) or not re.fullmatch(r"--[A-Za-z][\w-]*=[^\n\"]*", arg):
                raise ConfigError(f"{source}: extra_args entry {arg!r} must look like \"--key=value\"", "extra_args")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def slots_per_job(self) -> int:
        return self.slaves_per_job * self.slots_per_slave

    def rank(self) -> str:
        """What tells one slave of a job from the others, expanded by the slave from its environment."""
        return f"${RANK_VARIABLES[self.kind]}" if self.slaves_per_job > 1 else "0"


@dataclass
class JobRequest:
    """Everything one submission needs: the queue, the slave's command line, its setup script and directory."""

    queue: QueueSpec
    name: str
    argv: list[str]
    setup: Path
    directory: Path


@dataclass
class JobChange:
    """A state PSI/J reported for one job (key: the master's job id)."""

    key: int
    state: str
    exit_code: int | None = None
    reason: str | None = None


class BatchSystem:
    """PSI/J executors (one per scheduler kind), a submission thread and the queue of job state changes."""

    def __init__(self, work_dir: Path, poll_interval: float):
        self.work_dir = Path(work_dir)
        self.poll_interval = poll_interval
        self._executors: dict[str, Any] = {}
        self._jobs: dict[int, Any] = {}
        self._changes: queue.SimpleQueue[JobChange] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ticketfarm-batch")
        self._lock = threading.Lock()
        self.calls = {"submit": 0, "cancel": 0}
        """Scheduler commands this master ran (status polls are PSI/J's: one per poll interval)."""

    def submit(self, key: int, request: JobRequest) -> Future:
        """Submit off the loop; the future gives the scheduler's job id or raises SubmitFailed with its text."""
        self.calls["submit"] += 1
        return self._pool.submit(self._submit, key, request)

    def attach(self, key: int, kind: str, native_id: str) -> None:
        """Watch a job submitted before a master restart (found again by its scheduler job id)."""
        executor = self._executor(kind)
        executor.attach(self._new_job(key, None), native_id)

    def cancel(self, key: int) -> Future | None:
        job = self._jobs.get(key)
        if job is None:
            return None
        self.calls["cancel"] += 1
        return self._pool.submit(job.cancel)

    def changes(self) -> list[JobChange]:
        out = []
        while True:
            try:
                out.append(self._changes.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- PSI/J ------------------------------------------------------------------------------
    def _executor(self, kind: str) -> Any:
        with self._lock:
            if kind not in self._executors:
                try:  # the `slurm` extra: only a master with allocation queues needs it
                    import psij
                    from psij.executors.batch.batch_scheduler_executor import BatchSchedulerExecutorConfig
                except ImportError:
                    raise SubmitFailed("psij-python is not installed: pip install 'ticketfarm[slurm]'") from None
                # PSI/J fails every job after this many status queries in a row failed: ride out ~5 minutes of a
                # scheduler that does not answer rather than take its jobs for dead and submit new ones.
                config = BatchSchedulerExecutorConfig(
                    work_directory=self.work_dir, queue_polling_interval=self.poll_interval,  # type: ignore[arg-type]
                    initial_queue_polling_delay=0, queue_polling_error_threshold=max(3, int(300 / self.poll_interval)))
                try:
                    self._executors[kind] = psij.JobExecutor.get_instance(kind, config=config)
                except ValueError as exc:
                    raise SubmitFailed(f"no PSI/J executor {kind!r}: {exc}") from None
            return self._executors[kind]

    def _new_job(self, key: int, spec: Any) -> Any:
        from psij import Job
        job = Job(spec)
        job.set_job_status_callback(lambda _job, status: self._changes.put(_change(key, status)))
        self._jobs[key] = job
        return job

    def _submit(self, key: int, request: JobRequest) -> str:
        executor = self._executor(request.queue.kind)  # first: it says so when PSI/J is missing
        from psij import SubmitException
        job = self._new_job(key, job_spec(request))
        try:
            executor.submit(job)
        except SubmitException as exc:
            self._jobs.pop(key, None)
            raise SubmitFailed(str(exc).strip() or "the scheduler refused the job") from None
        return str(job.native_id)


def job_spec(request: JobRequest) -> Any:
    """The PSI/J job: N slave processes of S CPUs each for the walltime, in the queue's partition and account."""
    import psij
    q = request.queue
    attributes = psij.JobAttributes(duration=datetime.timedelta(seconds=q.walltime),
                                    queue_name=q.partition or None, account=q.account or None)
    for arg in q.extra_args:
        key, _, value = arg[2:].partition("=")
        attributes.set_custom_attribute(f"{q.kind}.{key}", value)
    command = shlex.split(q.slave_command)
    return psij.JobSpec(
        executable=command[0], arguments=command[1:] + request.argv, name=request.name, directory=request.directory,
        stdout_path=request.directory / f"{request.name}.out", stderr_path=request.directory / f"{request.name}.err",
        resources=psij.ResourceSpecV1(process_count=q.slaves_per_job, cpu_cores_per_process=q.slots_per_slave),
        attributes=attributes, pre_launch=request.setup, launcher="srun" if q.slaves_per_job > 1 else "single")


def _change(key: int, status: Any) -> JobChange:
    exit_code = status.exit_code if isinstance(status.exit_code, int) else None
    return JobChange(key, STATES.get(status.state.name, status.state.name.lower()), exit_code, status.message)

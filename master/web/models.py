"""The API's bodies as typed models: the OpenAPI document is generated from them (and tests check answers against it)."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, Field, create_model

from master.stats import SlaveStats, SweepStats

#: Every event kind the events table (and so the event stream and callbacks) can hold.
EVENT_KINDS = ("sweep_submitted", "sweep_active", "sweep_paused", "sweep_finished", "sweep_cancelled",
               "tickets_dispatched", "tasks_done", "task_failed", "task_cancelled", "task_paused", "task_resumed",
               "ticket_duplicated", "result_rejected", "results_removed", "results_pruned", "slave_dead",
               "slave_draining", "slave_undrained", "slave_refused", "worker_fetched", "pin_unknown",
               "sweep_unrunnable", "sweep_runnable")
TaskState = Literal["queued", "paused", "running", "done", "failed", "cancelled"]


class ErrorDetail(BaseModel):
    code: str = Field(description="stable: bad_request, unauthorized, forbidden, not_found, method_not_allowed, "
                                  "conflict, gone, too_large, unsupported_media_type, internal, unavailable")
    message: str
    field: str | None = Field(None, description="the request field (body, path or query) to blame")
    id: str | None = Field(None, description="500 only: the id of the logged traceback")


class ErrorBody(BaseModel):
    error: ErrorDetail


def stats_model(cls: type, name: str) -> type[BaseModel]:
    """A model with a statistics dataclass's fields (master/stats.py): one definition for store and HTTP body."""
    hints = get_type_hints(cls)
    return create_model(name, **{f.name: (hints[f.name], ...) for f in dataclasses.fields(cls)})


class SweepSummary(stats_model(SweepStats, "SweepCounts")):  # type: ignore[misc]
    state: Literal["active", "paused", "finished", "cancelled"]
    running: int = Field(description="tasks whose ticket a slave has started (prefetched ones not counted)")
    prefetched: int = Field(description="tasks whose ticket a slave holds ready but has not started (prefetch)")
    queued: int = Field(description="tasks waiting in the master's queue (a paused sweep's too)")
    paused: int = Field(description="tasks paused one by one; total = queued + prefetched + running + paused + done "
                                    "+ failed + cancelled")
    rejected: int = Field(description="attempts whose result the sweep's validator refused")
    unrunnable: str | None = Field(description="why no connected slave can run the sweep (a platform or resources "
                                               "none offers, no slave at all); null when some can")
    throughput: float = Field(description="done tasks per second since submission")
    eta: float | None = Field(description="seconds to go at this throughput; null when unknown")
    progress: float = Field(description="settled (done, failed, cancelled) / total")
    url: str
    created: float | None = None
    finished: float | None = None


class SlaveCounts(BaseModel):
    alive: int
    draining: int
    gone: int
    slots: int = Field(description="slots of alive and draining slaves")
    busy: int = Field(description="tickets running on them (prefetched ones not counted)")
    prefetched: int


class Status(BaseModel):
    time: float
    uptime: float | None = Field(description="seconds since the master started (null if this process was started "
                                             "on its own)")
    sweeps: list[SweepSummary]
    slaves: SlaveCounts
    last_event: int


class SlaveRow(stats_model(SlaveStats, "SlaveTotals")):  # type: ignore[misc]
    busy: float = Field(description="seconds its tickets ran")
    rejected: int = Field(description="its results that a validator refused")
    running: int = Field(description="tickets it has started")
    prefetched: int = Field(description="tickets it holds ready but has not started")
    disk: float | None
    version: str | None
    first_seen: float | None
    last_seen: float | None
    connected: bool
    draining: bool
    last_heard: float | None = None
    seconds_since_heard: float | None = None


class SlaveList(BaseModel):
    slaves: list[SlaveRow]
    time: float = Field(description="when this answer was made (seconds since the epoch)")


class Failure(BaseModel):
    task: int
    params: dict[str, Any]
    reason: str | None


class Stats(Status):
    """/status, with every slave's row (the same rows as /slaves), failures by sweep and the text report."""

    slaves: list[SlaveRow]  # type: ignore[assignment]
    slave_counts: SlaveCounts
    failures: dict[str, list[Failure]]
    report: str


class Info(BaseModel):
    name: Literal["ticketfarm"]
    version: str
    protocol: int
    epoch: int
    started: float | None
    uptime: float | None
    endpoint: str
    http: str
    auth: dict[str, Any]


class SweepList(BaseModel):
    sweeps: list[SweepSummary]


class Pin(BaseModel):
    slaves: list[str] = Field(description="the slaves its tickets may go to (spec field `slaves`)")
    connected: list[str] = Field(description="those connected now")
    waiting: str | None = Field(description="why its queued tasks do not start: none of its slaves is connected "
                                            "and undrained (each named: never seen, gone, draining)")


class SweepDetail(SweepSummary):
    spec: dict[str, Any]
    pin: Pin | None = Field(description="null when the sweep may run on any slave")
    callback: bool
    results_removed: float | None = Field(description="when its results were removed after collection")


class Task(BaseModel):
    task: int
    params: dict[str, Any]
    state: TaskState
    attempts: int
    reason: str | None
    ticket: int | None
    finished: float | None
    slave: str | None = Field(None, description="the slave of the task's accepted (or running) ticket, else of "
                                                "its latest attempt (null before one was dispatched)")
    started: float | None = Field(None, description="when that attempt started (dispatched, if not started yet)")
    elapsed: float | None = Field(None, description="that attempt's run time in seconds (so far, while it runs)")
    exit_code: int | None = Field(None, description="that attempt's exit code (null until it finished, or when it "
                                                    "was killed)")


class TaskPage(BaseModel):
    sweep: str
    state: TaskState | None
    offset: int
    limit: int
    total: int
    next: int | None
    tasks: list[Task]


class Attempt(BaseModel):
    ticket: int
    slave: str
    attempt: int
    dispatched: float
    finished: float | None
    state: str
    exit_code: int | None
    reason: str | None
    elapsed: float | None


class ResultRef(BaseModel):
    name: str
    size: int
    url: str


class TaskDetail(Task):
    attempts_list: list[Attempt]
    results: list[ResultRef]


class Throughput(BaseModel):
    sweep: str | None
    start: float = Field(description="the first interval's start (Unix time); the last interval is the current one")
    step: float = Field(description="seconds per interval")
    done: list[int] = Field(description="tasks done in each interval, oldest first")
    failed: list[int] = Field(description="tasks failed (for good) in each interval")


class FailureList(BaseModel):
    sweep: str
    failures: list[Failure]


class Progress(BaseModel):
    ticket: int
    sweep: str
    task: int
    slave: str
    state: str
    output: str = Field(description="the running ticket's recent output (empty once it ended)")


class Submitted(BaseModel):
    sweep: str
    state: Literal["submitted", "running", "finished"]
    tasks: int
    url: str


class StateReply(BaseModel):
    state: str


class Draining(BaseModel):
    draining: bool


class Removed(BaseModel):
    pass


JobState = Literal["QUEUED", "RUNNING", "DONE", "FAILED", "KILLED"]


class JobTask(BaseModel):
    task: int
    state: JobState
    exit_code: int | None = Field(description="of the latest finished attempt; null before one finished")
    attempts: int
    reason: str | None


class JobStatus(BaseModel):
    sweep: str
    state: JobState
    exit_code: int | None = Field(description="a one-task job's exit code; null for a sweep of several tasks")
    counts: dict[str, int]
    offset: int
    limit: int
    total: int
    next: int | None
    tasks: list[JobTask]


class Deleted(BaseModel):
    sweep: str
    state: str
    cancelled: bool = Field(description="the DELETE cancelled it (it had not ended)")
    results_removed: bool


class SandboxPut(BaseModel):
    sweep: str
    task: int
    path: str
    size: int
    placed: Literal["staged", "work dir"] = Field(description="staged: kept on the master for the task's next "
                                                              "ticket; work dir: written into the running one's too")


class SandboxEntry(BaseModel):
    path: str
    size: int
    mtime: float | None
    url: str


class SandboxList(BaseModel):
    sweep: str
    task: int
    state: TaskState
    where: Literal["work dir", "uploads", "results"] = Field(
        description="work dir: the running ticket's, from its slave; uploads: the files uploaded before it started; "
                    "results: after the end, the files its `file:` results kept")
    files: list[SandboxEntry]


class Event(BaseModel):
    """One `data:` of the event stream (its `event:` is the kind, its `id:` the id)."""

    id: int
    ts: float
    kind: Literal[EVENT_KINDS]  # type: ignore[valid-type]
    sweep: str | None
    task: int | None
    ticket: int | None
    detail: dict[str, Any] = Field(description="tickets_dispatched: {tickets: [[ticket, task, slave]]}; tasks_done: "
                                               "{tasks}; sweep_*: {counts}; task_failed: {reason}; worker_fetched: "
                                               "{slave, platform, name, sha256} (a slave began fetching a shipped worker); "
                                               "pin_unknown: {slaves, reason} (a pin names slaves never seen)")


class SubmitBody(BaseModel):
    """A sweep spec (as in a TOML file) as an object or as TOML text, with every file it names."""

    spec: dict[str, Any] | None = None
    toml: str | None = None
    files: dict[str, str | dict[str, str]] = Field(default_factory=dict,
                                                   description='name: text, or {"base64": ...}')
    status_callback_url: str | None = None
    status_callback_secret: str | None = None


class CollectBody(BaseModel):
    format: Literal["concat", "blockwise", "csv", "jsonl", "folders", "failed"] = "csv"
    result: str | None = None
    remove: bool = Field(False, description="remove the results once the whole download was sent")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries: each status answered as an ErrorBody."""
    return {s: {"model": ErrorBody, "description": _REASONS.get(s, "error")} for s in statuses}


_REASONS = {400: "bad request (`field` names what)", 401: "no token, or a wrong one", 403: "the token lacks the scope",
            404: "no such sweep, task, ticket, result or slave", 409: "not in a state that allows it",
            410: "the sweep's results were removed", 413: "request body over http_max_body",
            415: "not JSON or TOML", 502: "the task's slave or server could not be reached (the reason says which)",
            503: "the master did not answer", 504: "the task's slave or server did not answer in time"}

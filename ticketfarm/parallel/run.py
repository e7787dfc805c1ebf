"""Running a parsed `ticketfarm parallel` line: the jobs --resume does not skip, as one sweep; reports as parallel's.

The sweep runs on an embedded master with one local slave (a slot per job slot), or on a running master; each job
is reported as GNU parallel reports it: output grouped per job, in input order with -k, the joblog, --results.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, TextIO

from ticketfarm.parallel import joblog
from ticketfarm.parallel.inputs import Job, read_jobs
from ticketfarm.parallel.joblog import Finished
from ticketfarm.parallel.options import Options
from ticketfarm.parallel.replace import CommandTemplate

#: GNU parallel's exit code counts failed jobs up to this (101: more than 100 failed).
MAX_EXIT = 101
#: Seconds between two looks at a running master's store.
REMOTE_POLL = 0.1
#: Job slots at most for -j 0 ("as many as possible"): about what GNU parallel's file handles allow.
MAX_SLOTS = 256


@dataclass
class Streams:
    """Where a run reads its arguments and writes the jobs' outputs (the process's own, or a test's)."""

    stdin: BinaryIO
    stdout: BinaryIO
    stderr: BinaryIO


class Report:
    """Prints finished jobs as parallel does (grouped; with -k in input order) and keeps the joblog and results."""

    def __init__(self, opts: Options, jobs: list[Job], template: CommandTemplate, streams: Streams,
                 log: TextIO | None):
        self.opts = opts
        self.order = [job.seq for job in jobs]
        self.args = {job.seq: job.args for job in jobs}
        self.tags = ({job.seq: template_tag(opts.tagstring, job) for job in jobs} if opts.tagstring is not None
                     else {})
        self.streams = streams
        self.log = log
        self.waiting: dict[int, Finished] = {}
        self.next = 0
        self.reported = 0
        self.failed = 0

    @property
    def complete(self) -> bool:
        return self.reported == len(self.order)

    def take(self, finished: list[Finished]) -> None:
        for job in finished:
            if not self.opts.keep_order:
                self._emit(job)
                continue
            self.waiting[job.seq] = job
            while self.next < len(self.order) and self.order[self.next] in self.waiting:
                self._emit(self.waiting.pop(self.order[self.next]))
                self.next += 1

    def _emit(self, job: Finished) -> None:
        self.reported += 1
        self.failed += job.failed
        err = self.streams.stderr
        if job.reason:
            err.write(f"ticketfarm parallel: job {job.seq} was given up: {job.reason}\n".encode(errors="replace"))
        elif job.exitval == -1 and job.signal == 15:
            err.write(f"ticketfarm parallel: warning: job {job.seq} was killed because it timed out: "
                      f"{job.command}\n".encode(errors="surrogateescape"))
        if self.opts.results:
            joblog.write_results(self.opts.results, self.args[job.seq], job)
        else:
            self._print(job)
        if self.log is not None:
            self.log.write(job.joblog_line())
            self.log.flush()

    def _print(self, job: Finished) -> None:
        out, err = self.streams.stdout, self.streams.stderr
        if self.opts.verbose:
            out.write(job.command.encode(errors="surrogateescape") + b"\n")
        tag = self.tags.get(job.seq)
        for stream, blob in ((out, job.stdout), (err, job.stderr)):
            if tag is None:
                for chunk in blob.chunks():
                    stream.write(chunk)
            else:
                stream.write(b"".join(tag + line for line in blob.read().splitlines(keepends=True)))
            stream.flush()


def template_tag(tagstring: str | None, job: Job) -> bytes:
    """--tag / --tagstring: the prefix of each output line (replacement strings unquoted), and a tab."""
    text = CommandTemplate([tagstring or ""]).render(job.args, job.seq, quoted=False)
    return text.encode(errors="surrogateescape") + b"\t"


def run(opts: Options, streams: Streams, cwd: Path, remote: Callable[..., None] | None, log_level: str) -> int:
    """The exit code as GNU parallel's: the number of failed jobs, at most 101."""
    template = CommandTemplate(opts.command)
    jobs = read_jobs(opts, streams.stdin)
    if opts.dry_run:
        for job in jobs:
            streams.stdout.write(template.render(job.args, job.seq).encode(errors="surrogateescape") + b"\n")
        return 0
    resuming = opts.resume or opts.resume_failed
    todo = [job for job in jobs if job.seq not in already_run(opts, jobs)] if resuming else jobs
    log = joblog.open_joblog(opts.joblog, resuming) if opts.joblog else None
    try:
        if todo:
            report = Report(opts, todo, template, streams, log)
            run_jobs = remote or run_local
            run_jobs(opts, todo, template, cwd, report, streams, log_level)
            return min(report.failed, MAX_EXIT)
        return 0
    finally:
        if log is not None:
            log.close()


def already_run(opts: Options, jobs: list[Job]) -> set[int]:
    """--resume skips jobs in the joblog (or with --results, those with a stdout file); --resume-failed only those
    that succeeded."""
    seqs = joblog.already_run(opts.joblog, opts.resume_failed) if opts.joblog else set()
    if opts.results and opts.resume:
        seqs |= {job.seq for job in jobs if joblog.has_results(opts.results, job.args)}
    return seqs


def job_slots(opts: Options, njobs: int) -> int:
    """-j: N, +N / -N (more or fewer than the cores), N% of the cores, 0 (all at once); default one per core."""
    cores = os.cpu_count() or 1
    spec = opts.jobs or "100%"
    if spec.endswith("%"):
        return max(1, cores * int(spec[:-1]) // 100)
    if spec[0] in "+-":
        return max(1, cores + int(spec))
    return int(spec) or max(1, min(njobs, MAX_SLOTS))


def run_local(opts: Options, jobs: list[Job], template: CommandTemplate, cwd: Path, report: Report,
              streams: Streams, log_level: str) -> None:
    """An embedded master and one local slave with a slot per job slot, in a state dir of their own that goes
    away with the run (the joblog is what --resume reads)."""
    from master.config import MasterConfig
    from ticketfarm.client.local import LocalCluster  # imports the master: only local runs pay for it
    from ticketfarm.parallel.follow import Follower
    from ticketfarm.parallel.sweep import build_sweep

    sweep = build_sweep(jobs, template, cwd, opts.retries, opts.timeout)
    state = Path(tempfile.mkdtemp(prefix="ticketfarm-parallel-"))
    cluster = None
    try:
        # The state is thrown away at the end, so a commit need not reach the disk before its ACK.
        cluster = LocalCluster(state, 1, slots=min(job_slots(opts, len(jobs)), len(jobs)),
                               config=MasterConfig(durability="normal"), log_level=log_level, fork=True)
        master = cluster.master
        master.submit(sweep)
        follower = Follower(master.store, state, sweep, after=0, local=True)
        show_bar = bar(opts, streams, master.store, sweep.name)
        cluster.run_until(lambda: master.sweep_done(sweep.name), lambda: (report.take(follower.poll()), show_bar()))
        master.commit_and_ack()
        report.take(follower.poll())
        show_bar(True)
    finally:
        if cluster is not None:
            cluster.close(interrupted=not report.complete)
        shutil.rmtree(state, ignore_errors=True)


def bar(opts: Options, streams: Streams, store: object, name: str) -> Callable[..., None]:
    """--bar: the sweep's progress on stderr."""
    if not opts.bar:
        return lambda force=False: None
    from master.stats import sweep_stats
    from ticketfarm.client.progress import ProgressBar

    progress = ProgressBar(_TextOut(streams.stderr))

    def show(force: bool = False) -> None:
        stats = sweep_stats(store, name)  # type: ignore[arg-type]
        if stats:
            progress.show(stats, force)
        if force:
            progress.finish()

    return show


def poll_until_complete(report: Report, poll: Callable[[], list[Finished]], tick: Callable[[], None]) -> None:
    """A running master's jobs, as they settle."""
    while not report.complete:
        report.take(poll())
        tick()
        if not report.complete:
            time.sleep(REMOTE_POLL)


class _TextOut:
    """A text view of a binary stream for the progress bar (a TextIOWrapper would close the stream it wraps)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream

    def write(self, text: str) -> None:
        self.stream.write(text.encode())

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

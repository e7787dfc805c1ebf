"""Jobs on a running master: a sweep submitted over the control protocol, its outputs read in the master's state dir.

The sweep is forgotten on the master once every job is reported (or cancelled first, when the run is interrupted).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from master.config import load_master_config, master_config_path
from master.store import Store
from ticketfarm import keys
from ticketfarm.client.control import client_endpoint, control
from ticketfarm.errors import ConfigError, KeyFileError, ParallelUsage
from ticketfarm.parallel.follow import Follower
from ticketfarm.parallel.inputs import Job
from ticketfarm.parallel.options import Options
from ticketfarm.parallel.replace import CommandTemplate
from ticketfarm.parallel.run import Report, Streams, bar, poll_until_complete
from ticketfarm.parallel.sweep import build_sweep

#: Seconds between two checks that the master still answers.
PING_EVERY = 2.0


@dataclass
class RemoteMaster:
    """Where a running master listens, how to talk to it, and its state dir (where job outputs are read)."""

    endpoint: str
    keys: keys.ClientKeys | None
    state: Path

    @classmethod
    def find(cls, state: Path, master: str | None, keys_dir: Path | None) -> "RemoteMaster":
        if not (state / "state.db").exists():
            raise ParallelUsage(f"{state}: no master state here (no state.db): on a running master, ticketfarm "
                                "parallel reads job outputs from its state dir; pass --state DIR (the master's), or "
                                "leave out --master/--state to run here")
        insecure = master_config_path(state).exists() and load_master_config(state).insecure
        try:
            client_keys = None if insecure and not keys_dir else keys.client_keys_for(state, keys_dir)
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from None
        return cls(master or client_endpoint(load_master_config(state).bind), client_keys, state)

    def run(self, opts: Options, jobs: list[Job], template: CommandTemplate, cwd: Path, report: Report,
            streams: Streams, log_level: str) -> None:
        """-j N limits the sweep to N tasks at once; the master's slaves give the slots."""
        limit = int(opts.jobs) if opts.jobs and opts.jobs.isdigit() else 0
        sweep = build_sweep(jobs, template, cwd, opts.retries, opts.timeout, max_concurrent=limit)
        store = Store(self.state / "state.db", readonly=True)
        try:
            follower = Follower(store, self.state, sweep, after=store.last_event_id(), local=False)
            reply = self._control("submit", **sweep.submit_fields())
            if not reply.get("ok"):
                raise ConfigError(f"the master at {self.endpoint} refused the jobs: {reply.get('error')}")
            show_bar, alive = bar(opts, streams, store, sweep.name), self.liveness()
            try:
                poll_until_complete(report, follower.poll, lambda: (show_bar(), alive()))
            finally:
                if not report.complete:
                    self._control("cancel", sweep=sweep.name)
                self._control("forget", sweep=sweep.name)
        finally:
            store.close()

    def liveness(self) -> Callable[[], None]:
        """A check, every PING_EVERY seconds at most, that the master still answers (MasterUnreachable if not):
        a run never waits for ever on a master that is gone."""
        next_ping = time.monotonic() + PING_EVERY

        def check() -> None:
            nonlocal next_ping
            if time.monotonic() >= next_ping:
                self._control("ping")
                next_ping = time.monotonic() + PING_EVERY

        return check

    def _control(self, op: str, **fields: object) -> dict[str, object]:
        return control(self.endpoint, op, keys=self.keys, **fields)

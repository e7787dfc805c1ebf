"""Jobs as they finish, read from the master's store: its committed events say which tasks settled, and when."""
from __future__ import annotations

import json
import time
from pathlib import Path

from master.collect import output_chunks
from master.store import Store, StoredOutput
from ticketfarm.parallel.joblog import Blob, Finished
from ticketfarm.parallel.sweep import exit_status
from ticketfarm.spec import Sweep

#: Events read per query.
EVENT_BATCH = 1000


class Follower:
    """Turns the settled tasks of one sweep into finished jobs, each exactly once, in the order they settled."""

    def __init__(self, store: Store, state_dir: Path, sweep: Sweep, after: int, local: bool):
        self.store = store
        self.state_dir = state_dir
        self.sweep = sweep
        self.after = after
        """The id of the last event read: a running master's older events are none of this run's."""
        self.local = local

    def poll(self) -> list[Finished]:
        finished: list[Finished] = []
        while True:
            events = self.store.events(self.after, EVENT_BATCH)
            for event in events:
                self.after = event["id"]
                if event["sweep"] != self.sweep.name:
                    continue
                if event["kind"] == "tasks_done":
                    finished += [self._done(idx) for idx in json.loads(event["detail"])["tasks"]]
                elif event["kind"] == "task_failed":
                    finished.append(self._given_up(event["task"], json.loads(event["detail"])["reason"]))
                elif event["kind"] == "task_cancelled":
                    finished.append(self._given_up(event["task"], "cancelled"))
            if len(events) < EVENT_BATCH:
                return finished

    def _done(self, idx: int) -> Finished:
        outputs = self.store.outputs(self.sweep.name, idx)
        exitval, sig = exit_status(self._blob(outputs["exitval"]).read())
        slave, elapsed, ended = self.store.result_ticket(self.sweep.name, idx) or ("", 0.0, time.time())
        elapsed = elapsed or 0.0
        params = self.sweep.params[idx]
        return Finished(params["seq"], params["cmd"], self._blob(outputs["stdout"]), self._blob(outputs["stderr"]),
                        exitval, sig, ":" if self.local else slave, (ended or time.time()) - elapsed, elapsed)

    def _given_up(self, idx: int, reason: str) -> Finished:
        """A task ticketfarm gave up on (its directory missing on the slave, a slave lost on every attempt)."""
        params = self.sweep.params[idx]
        return Finished(params["seq"], params["cmd"], Blob.of(b""), Blob.of(b""), -1, 0, ":", time.time(), 0.0,
                        reason=reason)

    def _blob(self, output: StoredOutput) -> Blob:
        return Blob(output.size, lambda: output_chunks(self.state_dir, output))

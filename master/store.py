"""The master's durable state in SQLite (WAL): sweeps, tasks, tickets, results, slaves, events."""
from __future__ import annotations

import json
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ticketfarm.spec import ParamLines, Sweep

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL, spec TEXT NOT NULL, priority INTEGER NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, finished REAL, ntasks INTEGER NOT NULL, unrunnable TEXT);
CREATE TABLE IF NOT EXISTS tasks (
    sweep TEXT NOT NULL, idx INTEGER NOT NULL, params TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, ticket INTEGER, finished REAL,
    PRIMARY KEY (sweep, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (sweep, state);
CREATE TABLE IF NOT EXISTS tickets (
    id INTEGER PRIMARY KEY, sweep TEXT NOT NULL, task INTEGER NOT NULL, slave TEXT NOT NULL,
    attempt INTEGER NOT NULL, dispatched REAL NOT NULL, finished REAL, state TEXT NOT NULL,
    exit_code INTEGER, reason TEXT, elapsed REAL, started REAL);
CREATE INDEX IF NOT EXISTS tickets_running ON tickets (state) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tickets_rejected ON tickets (sweep) WHERE state = 'rejected';
CREATE TABLE IF NOT EXISTS results (
    sweep TEXT NOT NULL, task INTEGER NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
    data BLOB, path TEXT, PRIMARY KEY (sweep, task, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slaves (
    name TEXT PRIMARY KEY, platform TEXT, slots INTEGER, version TEXT,
    first_seen REAL, last_seen REAL, state TEXT, info TEXT);
CREATE TABLE IF NOT EXISTS functions (hash TEXT PRIMARY KEY, body BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, sweep TEXT, task INTEGER,
    ticket INTEGER, detail TEXT);
CREATE TABLE IF NOT EXISTS callbacks (sweep TEXT PRIMARY KEY, url TEXT NOT NULL, secret TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alloc_queues (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, paused INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    error TEXT, errors INTEGER NOT NULL DEFAULT 0, retry_at REAL);
CREATE TABLE IF NOT EXISTS alloc_jobs (
    id INTEGER PRIMARY KEY, queue TEXT NOT NULL, native_id TEXT, state TEXT NOT NULL, slaves INTEGER NOT NULL,
    submitted REAL NOT NULL, started REAL, ended REAL, exit_code INTEGER, reason TEXT);
"""

#: Columns added since a table was first made: (table, column, type), added to an older state.db when it opens.
ADDED_COLUMNS = (("sweeps", "unrunnable", "TEXT"), ("tickets", "started", "REAL"))

#: Terminal task states: nothing more happens to such a task.
FINAL_TASK_STATES = ("done", "failed", "cancelled")


@dataclass
class SweepRow:
    name: str
    digest: str
    priority: int
    state: str
    created: float
    finished: float | None
    ntasks: int
    spec_json: str
    unrunnable: str | None = None
    """Why no connected slave can run it (None: some can, or it is not yet known)."""

    def sweep(self) -> Sweep:
        return Sweep.from_json(self.spec_json)


@dataclass
class TicketRow:
    id: int
    sweep: str
    task: int
    slave: str
    attempt: int
    dispatched: float
    state: str
    started: float | None = None
    """When its slave began running it (None: dispatched, not started yet)."""


@dataclass
class StoredOutput:
    """One named result of a task: small ones inline, large ones as a file under results/."""

    name: str
    size: int
    data: bytes | None
    path: str | None


class Store:
    """All SQL lives here. Writes join an open transaction that `commit()` ends (group commit)."""

    def __init__(self, path: Path, durability: str = "full", readonly: bool = False):
        self.path = Path(path)
        if readonly:
            # A reader may move between threads (an HTTP stream's chunks are made in pool threads), one at a time.
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA query_only = ON")
            self._batched = {}
            self._committer, self._committing = None, None
            return
        # The connection is used by one thread at a time: the loop's, or the commit thread while the loop waits
        # for it or has handed it a COMMIT (see commit_in_background).
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect in a new database (see housekeeping)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
        self._add_columns()
        self._conn.executescript(SCHEMA)
        self._in_txn = False
        self.txn_started = 0.0
        self._batched: dict[str, list[tuple[Any, ...]]] = {}
        #: Per sweep: (attempts, params) of tasks read ahead of their dispatch (see `_read_ahead`).
        self._ahead: dict[str, dict[int, tuple[int, str]]] = {}
        self._committer: ThreadPoolExecutor | None = None
        self._committing: Future | None = None

    def _add_columns(self) -> None:
        """A state.db made by an earlier version gets the columns added since (its rows keep their values)."""
        for table, column, kind in ADDED_COLUMNS:
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if have and column not in have:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, with every batched row written first: whoever reads or writes sees them (after the
        commit in flight, if one is)."""
        if self._committing is not None:
            self._committing.result()
        if self._batched:
            self._write_batched()
        return self._conn

    def close(self) -> None:
        if self._committing is not None:
            self._committing.exception()  # waits; a failed commit was raised to the loop already
        if self._committer is not None:
            self._committer.shutdown()
        self._conn.close()  # rows still batched were never committed: they go, like the open transaction

    # -- transactions -------------------------------------------------------
    def _begin(self) -> None:
        if not self._in_txn:
            self._conn.execute("BEGIN")
            self._in_txn = True
            if not self._batched:  # else the transaction began with the first batched row
                self.txn_started = time.monotonic()

    def _write(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        db = self.db
        self._begin()
        return db.execute(sql, args)

    def _write_many(self, sql: str, rows: Any) -> None:
        db = self.db
        self._begin()
        db.executemany(sql, rows)

    def _batch(self, sql: str, row: tuple[Any, ...]) -> None:
        """Queue a row for `sql`, written with one executemany per statement at the next use of the connection.

        The hot path (a result per ticket) costs one executemany row instead of one execute
        per statement; ordering is kept because any other read or write flushes first.
        """
        rows = self._batched.get(sql)
        if rows is None:
            rows = self._batched[sql] = []
            if not self._in_txn and len(self._batched) == 1:
                self.txn_started = time.monotonic()
        rows.append(row)

    def _write_batched(self) -> None:
        self._begin()
        batched, self._batched = self._batched, {}
        for sql in _BATCH_ORDER:
            rows = batched.get(sql)
            if rows:
                self._conn.executemany(sql, rows)

    @property
    def dirty(self) -> bool:
        return self._in_txn or bool(self._batched)

    def commit(self) -> None:
        db = self.db  # the batch written, after the commit in flight
        if self._in_txn:
            db.execute("COMMIT")
            self._in_txn = False

    def commit_in_background(self) -> None:
        """Write the batch and hand the COMMIT to the store's commit thread; returns at once. The loop reads on
        while SQLite syncs (it lets go of the GIL): rows batched meanwhile join the next transaction, and any
        other use of the connection waits for this commit. Nothing of it is durable before `finish_commit`."""
        db = self.db
        if not self._in_txn:
            return
        self._in_txn = False
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="ticketfarm-commit")
        self._committing = self._committer.submit(db.execute, "COMMIT")

    @property
    def committing(self) -> bool:
        """A commit handed to the commit thread has not been finished (`finish_commit`)."""
        return self._committing is not None

    def finish_commit(self, wait: bool) -> bool:
        """True once for each background commit, when it has ended (waiting for it if `wait`). A commit that
        failed raises its error here, and at every later use of the store: nothing after it is ever committed,
        so nothing after it is acknowledged."""
        future = self._committing
        if future is None or not (wait or future.done()):
            return False
        future.result()
        self._committing = None
        return True

    # -- master epochs: ticket ids are never reused across restarts ---------
    def next_epoch(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        epoch = int(row[0]) + 1 if row else 1
        self._write("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (str(epoch),))
        self.commit()
        return epoch

    # -- sweeps -------------------------------------------------------------
    def add_sweep(self, sweep: Sweep, rows: ParamLines | None = None) -> None:
        """A new sweep and its tasks: `rows` as received (then `sweep.params` is empty), else `sweep.params`."""
        rows = rows if rows is not None else ParamLines.of(sweep.params)
        self._write(
            "INSERT INTO sweeps (name, digest, spec, priority, state, created, ntasks) VALUES (?, ?, ?, ?, 'active', ?, ?)",
            (sweep.name, sweep.digest(rows), sweep.spec_json(), sweep.priority, time.time(), rows.count),
        )
        self._write_many(
            "INSERT INTO tasks (sweep, idx, params, state) VALUES (?, ?, ?, 'queued')",
            ((sweep.name, i, row) for i, row in enumerate(rows.rows())),
        )
        self.event("sweep_submitted", sweep=sweep.name,
                   detail={"tasks": rows.count, "counts": {"queued": rows.count}})

    def sweep(self, name: str) -> SweepRow | None:
        row = self.db.execute(
            "SELECT name, digest, priority, state, created, finished, ntasks, spec, unrunnable FROM sweeps WHERE name = ?", (name,)
        ).fetchone()
        return SweepRow(*row) if row else None

    def sweeps(self) -> list[SweepRow]:
        rows = self.db.execute(
            "SELECT name, digest, priority, state, created, finished, ntasks, spec, unrunnable FROM sweeps ORDER BY created"
        ).fetchall()
        return [SweepRow(*r) for r in rows]

    def replace_spec(self, sweep: Sweep) -> None:
        """Store a changed spec of an existing sweep (same tasks: only what a retry may change differs)."""
        self._write("UPDATE sweeps SET digest = ?, spec = ?, priority = ? WHERE name = ?",
                    (sweep.digest(), sweep.spec_json(), sweep.priority, sweep.name))

    def delete_sweep(self, name: str) -> list[str]:
        """Remove a sweep and everything of it; returns the paths (state-relative) of its result files."""
        self._forget_ahead(name)
        paths = self.remove_results(name)
        for table in ("tasks", "tickets"):
            self._write(f"DELETE FROM {table} WHERE sweep = ?", (name,))
        self._write("DELETE FROM callbacks WHERE sweep = ?", (name,))
        self._write("DELETE FROM sweeps WHERE name = ?", (name,))
        self.event("sweep_forgotten", sweep=name)
        return paths

    def set_unrunnable(self, name: str, reason: str | None, event: bool = True) -> None:
        """Say why no connected slave can run a sweep (None: clear it); the change is an event too, unless not
        `event` (the sweep has ended: whether slaves could run it no longer matters)."""
        self._write("UPDATE sweeps SET unrunnable = ? WHERE name = ?", (reason, name))
        if event:
            self.event("sweep_unrunnable" if reason else "sweep_runnable", sweep=name,
                       detail={"reason": reason} if reason else None)

    def clear_unrunnable(self) -> None:
        """At a master's start: what it said about slaves it no longer has does not hold."""
        self._write("UPDATE sweeps SET unrunnable = NULL WHERE unrunnable IS NOT NULL")

    def set_sweep_state(self, name: str, state: str) -> None:
        self._forget_ahead(name)  # paused, or ended: nothing is read ahead of it until it dispatches again
        finished = time.time() if state in ("finished", "cancelled") else None
        self._write("UPDATE sweeps SET state = ?, finished = ? WHERE name = ?", (state, finished, name))
        # The counts at this moment travel with the event (a status callback sent later reports these).
        self.event(f"sweep_{state}", sweep=name, detail={"counts": self.task_counts(name)})

    # -- tasks ---------------------------------------------------------------
    def tasks_in_state(self, sweep: str, state: str) -> list[int]:
        rows = self.db.execute(
            "SELECT idx FROM tasks WHERE sweep = ? AND state = ? ORDER BY idx", (sweep, state)
        ).fetchall()
        return [r[0] for r in rows]

    def task_counts(self, sweep: str) -> dict[str, int]:
        rows = self.db.execute("SELECT state, count(*) FROM tasks WHERE sweep = ? GROUP BY state", (sweep,))
        return dict(rows.fetchall())

    def task_attempts(self, sweep: str, idx: int) -> int:
        return self.db.execute("SELECT attempts FROM tasks WHERE sweep = ? AND idx = ?", (sweep, idx)).fetchone()[0]

    def params(self, sweep: str, idx: int) -> dict[str, Any]:
        row = self.db.execute("SELECT params FROM tasks WHERE sweep = ? AND idx = ?", (sweep, idx)).fetchone()
        return json.loads(row[0])

    def param_names(self, sweep: str) -> list[str]:
        """The parameter names, in order, of a sweep's first task (the spec in `sweeps` holds no rows)."""
        row = self.db.execute("SELECT params FROM tasks WHERE sweep = ? ORDER BY idx LIMIT 1", (sweep,)).fetchone()
        return [] if row is None else list(json.loads(row[0]))

    def failed_tasks(self, sweep: str) -> list[tuple[int, dict[str, Any], str]]:
        rows = self.db.execute(
            "SELECT idx, params, reason FROM tasks WHERE sweep = ? AND state = 'failed' ORDER BY idx", (sweep,)
        )
        return [(i, json.loads(p), r) for i, p, r in rows]

    def retry_tasks(self, sweep: str, idxs: list[int]) -> None:
        """Queue settled tasks again with no attempts counted."""
        self._forget_ahead(sweep)
        self._write_many("UPDATE tasks SET state = 'queued', attempts = 0, reason = NULL, ticket = NULL, "
                         "finished = NULL WHERE sweep = ? AND idx = ?", ((sweep, i) for i in idxs))
        self.event("tasks_retried", sweep=sweep, detail={"tasks": len(idxs)})

    def requeue_task(self, sweep: str, idx: int) -> None:
        self._write("UPDATE tasks SET state = 'queued' WHERE sweep = ? AND idx = ?", (sweep, idx))

    def fail_task(self, sweep: str, idx: int, reason: str) -> None:
        self._write(
            "UPDATE tasks SET state = 'failed', reason = ?, finished = ? WHERE sweep = ? AND idx = ?",
            (reason, time.time(), sweep, idx),
        )
        self.event("task_failed", sweep=sweep, task=idx, detail={"reason": reason})

    def cancel_tasks(self, sweep: str) -> None:
        self._write(
            "UPDATE tasks SET state = 'cancelled', reason = 'cancelled' WHERE sweep = ? AND state IN ('queued', 'running', 'paused')",
            (sweep,),
        )

    def cancel_task(self, sweep: str, idx: int) -> bool:
        """Cancel one queued or running task; False when it had already settled."""
        cur = self._write(
            "UPDATE tasks SET state = 'cancelled', reason = 'cancelled', finished = ? "
            "WHERE sweep = ? AND idx = ? AND state IN ('queued', 'running', 'paused')", (time.time(), sweep, idx))
        if cur.rowcount:
            self.event("task_cancelled", sweep=sweep, task=idx)
        return cur.rowcount > 0

    def hold_task(self, sweep: str, idx: int, refund: bool) -> None:
        """Pause a task (state 'paused'); a killed running attempt is not counted against max_attempts."""
        self._forget_ahead(sweep)
        self._write(f"UPDATE tasks SET state = 'paused'{', attempts = max(attempts - 1, 0)' if refund else ''} "
                    "WHERE sweep = ? AND idx = ?", (sweep, idx))
        self.event("task_paused", sweep=sweep, task=idx)

    def refund_attempt(self, sweep: str, idx: int) -> None:
        """An attempt given back (an interruption, or a hand-back at an allocation's end): not counted against max_attempts."""
        self._forget_ahead(sweep)
        self._write("UPDATE tasks SET attempts = max(attempts - 1, 0) WHERE sweep = ? AND idx = ?", (sweep, idx))

    def complete_task(self, sweep: str, idx: int, ticket: int, outputs: list[StoredOutput]) -> None:
        self._batch(_COMPLETE_TASK, (ticket, time.time(), sweep, idx))
        for o in outputs:
            self._batch(_STORE_RESULT, (sweep, idx, o.name, o.size, o.data, o.path))

    # -- python sweeps: tasks appended after submission, function bodies ----------
    def add_tasks(self, sweep: str, first: int, rows: list[str]) -> list[int]:
        """Append tasks first.. to a sweep, each row its params as JSON text; indices it already has are skipped (a
        resent batch). Returns the new ones."""
        ntasks = self.db.execute("SELECT ntasks FROM sweeps WHERE name = ?", (sweep,)).fetchone()[0]
        new = [(sweep, first + i, row) for i, row in enumerate(rows) if first + i >= ntasks]
        if not new:
            return []
        if new[0][1] != ntasks:
            raise ValueError(f"sweep {sweep!r} has {ntasks} tasks; a batch starting at {new[0][1]} would leave a gap")
        self._write_many("INSERT INTO tasks (sweep, idx, params, state) VALUES (?, ?, ?, 'queued')", new)
        self._write("UPDATE sweeps SET ntasks = ? WHERE name = ?", (new[-1][1] + 1, sweep))
        return [r[1] for r in new]

    def reopen_sweep(self, name: str) -> None:
        self._write("UPDATE sweeps SET state = 'active', finished = NULL WHERE name = ?", (name,))

    def settled_tasks(self, sweep: str) -> Iterator[tuple[int, str, str | None, list[StoredOutput]]]:
        """Settled tasks in order: (idx, state, reason, outputs); done ones with their stored outputs."""
        cur = self.db.execute(
            "SELECT t.idx, t.state, t.reason, r.name, r.size, r.data, r.path FROM tasks t "
            "LEFT JOIN results r ON r.sweep = t.sweep AND r.task = t.idx "
            "WHERE t.sweep = ? AND t.state IN ('done', 'failed', 'cancelled') ORDER BY t.idx", (sweep,))
        current: tuple[int, str, str | None, list[StoredOutput]] | None = None
        for idx, state, reason, name, size, data, path in cur:
            if current is None or current[0] != idx:
                if current is not None:
                    yield current
                current = (idx, state, reason, [])
            if name is not None:
                current[3].append(StoredOutput(name, size, data, path))
        if current is not None:
            yield current

    def task_reason(self, sweep: str, idx: int) -> str | None:
        row = self.db.execute("SELECT reason FROM tasks WHERE sweep = ? AND idx = ?", (sweep, idx)).fetchone()
        return row[0] if row else None

    def add_function(self, digest: str, body: bytes) -> None:
        self._write("INSERT OR IGNORE INTO functions VALUES (?, ?, ?)", (digest, body, time.time()))

    def function(self, digest: str) -> bytes | None:
        row = self.db.execute("SELECT body FROM functions WHERE hash = ?", (digest,)).fetchone()
        return row[0] if row else None

    # -- tickets -------------------------------------------------------------
    def start_tickets(self, sweep: str, tickets: list[tuple[int, int]], slave: str,
                      now: float) -> list[tuple[int, dict[str, Any]]]:
        """Record dispatched tickets `(ticket id, task)` of one sweep; returns each task's attempt number and params.

        No SQL per dispatch: the rows join the batch, and each task's attempts and parameters come from a read
        of the next READ_AHEAD tasks (one SELECT per that many tickets; see `_read_ahead`)."""
        ahead = self._ahead.get(sweep, {})
        out = []
        for tid, task in tickets:
            row = ahead.pop(task, None)
            if row is None:
                ahead = self._read_ahead(sweep, task)
                row = ahead.pop(task)
            attempt = row[0] + 1
            self._batch(_START_TASK, (sweep, task))
            self._batch(_START_TICKET, (tid, sweep, task, slave, attempt, now))
            out.append((attempt, json.loads(row[1])))
        return out

    def _read_ahead(self, sweep: str, first: int) -> dict[int, tuple[int, str]]:
        """(attempts, params) of tasks first.. of a sweep, kept until each is dispatched. They stay true: a task's
        params never change, its attempts only here (a dispatch pops its entry; `_forget_ahead` at any other change),
        and the read flushes the batch first, so it sees every start not yet written."""
        rows = self.db.execute("SELECT idx, attempts, params FROM tasks WHERE sweep = ? AND idx >= ? AND idx < ?",
                               (sweep, first, first + READ_AHEAD))
        ahead = self._ahead[sweep] = {idx: (attempts, params) for idx, attempts, params in rows}
        return ahead

    def _forget_ahead(self, sweep: str) -> None:
        self._ahead.pop(sweep, None)

    def mark_started(self, tickets: list[int], now: float) -> None:
        """These dispatched tickets began running on their slave (before: prefetched, held ready)."""
        for ticket in tickets:
            self._batch(_MARK_STARTED, (now, ticket))

    def finish_ticket(self, ticket: int, state: str, exit_code: int | None = None,
                      reason: str | None = None, elapsed: float | None = None) -> None:
        self._batch(_FINISH_TICKET, (state, exit_code, reason, elapsed, time.time(), ticket))

    def warnings(self, sweep: str) -> list[tuple[int, str]]:
        """(task, warning) of the done tasks whose result ticket carried a warning, in task order."""
        rows = self.db.execute(
            "SELECT t.idx, k.reason FROM tasks t JOIN tickets k ON k.id = t.ticket "
            "WHERE t.sweep = ? AND t.state = 'done' AND k.reason IS NOT NULL ORDER BY t.idx", (sweep,))
        return [(idx, reason) for idx, reason in rows]

    def ticket(self, ticket: int) -> TicketRow | None:
        row = self.db.execute(
            "SELECT id, sweep, task, slave, attempt, dispatched, state, started FROM tickets WHERE id = ?", (ticket,)
        ).fetchone()
        return TicketRow(*row) if row else None

    def result_ticket(self, sweep: str, idx: int) -> tuple[str, float | None, float | None] | None:
        """(slave, run time, finish time) of the ticket whose result a done task kept; None for other tasks."""
        return self.db.execute(
            "SELECT k.slave, k.elapsed, k.finished FROM tasks t JOIN tickets k ON k.id = t.ticket "
            "WHERE t.sweep = ? AND t.idx = ? AND t.state = 'done'", (sweep, idx)).fetchone()

    def running_tickets(self) -> list[TicketRow]:
        rows = self.db.execute(
            "SELECT id, sweep, task, slave, attempt, dispatched, state, started FROM tickets WHERE state = 'running'"
        ).fetchall()
        return [TicketRow(*r) for r in rows]

    def attempts_of(self, sweep: str, idx: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, slave, attempt, dispatched, finished, state, exit_code, reason, elapsed FROM tickets "
            "WHERE sweep = ? AND task = ? ORDER BY id", (sweep, idx))
        cols = ("ticket", "slave", "attempt", "dispatched", "finished", "state", "exit_code", "reason", "elapsed")
        return [dict(zip(cols, r)) for r in rows]

    # -- results ---------------------------------------------------------------
    def done_tasks(self, sweep: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """Done tasks in task order with their parameters (one row at a time, never all in memory)."""
        cur = self.db.execute("SELECT idx, params FROM tasks WHERE sweep = ? AND state = 'done' ORDER BY idx", (sweep,))
        for idx, params in cur:
            yield idx, json.loads(params)

    def outputs(self, sweep: str, idx: int) -> dict[str, StoredOutput]:
        rows = self.db.execute(
            "SELECT name, size, data, path FROM results WHERE sweep = ? AND task = ?", (sweep, idx)
        ).fetchall()
        return {r[0]: StoredOutput(*r) for r in rows}

    def remove_results(self, sweep: str) -> list[str]:
        """Delete a sweep's stored results; returns the result files that should be removed."""
        paths = [r[0] for r in self.db.execute("SELECT path FROM results WHERE sweep = ? AND path IS NOT NULL", (sweep,))]
        self._write("DELETE FROM results WHERE sweep = ?", (sweep,))
        return paths

    # -- housekeeping (master/housekeeping.py, master/stragglers.py) ------------------
    def expired_results(self, cutoff: float, limit: int) -> list[tuple[str, int, str, str | None]]:
        """(sweep, task, name, path) of results whose task settled before `cutoff`, at most `limit`."""
        return self.db.execute(
            "SELECT r.sweep, r.task, r.name, r.path FROM results r JOIN tasks t ON t.sweep = r.sweep AND t.idx = r.task "
            "WHERE t.finished < ? LIMIT ?", (cutoff, limit)).fetchall()

    def delete_results(self, keys: list[tuple[str, int, str]]) -> None:
        self._write_many("DELETE FROM results WHERE sweep = ? AND task = ? AND name = ?", keys)

    def has_result_files(self, sweep: str) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE sweep = ? AND path IS NOT NULL LIMIT 1",
                               (sweep,)).fetchone() is not None

    def prune_events(self, cutoff: float) -> int:
        """Delete events older than `cutoff` (a sweep's submission and result removal stay); returns how many."""
        return self._write("DELETE FROM events WHERE ts < ? AND kind NOT IN ('sweep_submitted', 'results_removed')",
                           (cutoff,)).rowcount

    def results_removed(self, sweep: str) -> float | None:
        """When the sweep's results were removed after collection (None: they were not)."""
        row = self.db.execute("SELECT max(ts) FROM events WHERE sweep = ? AND kind = 'results_removed'",
                              (sweep,)).fetchone()
        return row[0]

    def reclaim_space(self) -> None:
        """After a prune: checkpoint the WAL and hand free pages back (databases with incremental auto_vacuum)."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.db.execute("PRAGMA incremental_vacuum(2000)").fetchall()

    def has_sweeps(self) -> bool:
        return self.db.execute("SELECT 1 FROM sweeps LIMIT 1").fetchone() is not None

    def median_elapsed(self, sweep: str) -> float | None:
        """Median run time of a sweep's successful tickets (None before the first)."""
        count = self.db.execute("SELECT count(*) FROM tickets WHERE sweep = ? AND state = 'done' "
                                "AND elapsed IS NOT NULL", (sweep,)).fetchone()[0]
        if not count:
            return None
        return self.db.execute("SELECT elapsed FROM tickets WHERE sweep = ? AND state = 'done' AND elapsed IS NOT NULL "
                               "ORDER BY elapsed LIMIT 1 OFFSET ?", (sweep, count // 2)).fetchone()[0]

    # -- slaves ---------------------------------------------------------------
    def slave_seen(self, name: str, platform: str, slots: int, version: str, state: str) -> None:
        now = time.time()
        self._write(
            "INSERT INTO slaves (name, platform, slots, version, first_seen, last_seen, state) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET platform = excluded.platform, slots = excluded.slots, "
            "version = excluded.version, last_seen = excluded.last_seen, state = excluded.state",
            (name, platform, slots, version, now, now, state),
        )

    def slave_state(self, name: str, state: str) -> None:
        self._write("UPDATE slaves SET state = ?, last_seen = ? WHERE name = ?", (state, time.time(), name))

    def slave_info(self, name: str, state: str, info: dict[str, Any]) -> None:
        """A connected slave's state and load, from its heartbeat (written with the next batch: a heartbeat never
        costs a statement of its own)."""
        self._batch(_SLAVE_INFO, (state, time.time(), json.dumps(info), name))

    def slaves(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT name, platform, slots, version, first_seen, last_seen, state, info FROM slaves")
        cols = ("name", "platform", "slots", "version", "first_seen", "last_seen", "state", "info")
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            d["info"] = json.loads(d["info"]) if d["info"] else {}
            out.append(d)
        return out

    def slave_ticket_counts(self) -> dict[str, dict[str, Any]]:
        """Per slave: tickets by final state and busy seconds."""
        out: dict[str, dict[str, Any]] = {}
        rows = self.db.execute("SELECT slave, state, count(*), coalesce(sum(elapsed), 0) FROM tickets GROUP BY slave, state")
        for slave, state, count, busy in rows:
            entry = out.setdefault(slave, {"busy": 0.0})
            entry[state] = count
            entry["busy"] += busy
        return out

    # -- events ---------------------------------------------------------------
    def event(self, kind: str, sweep: str | None = None, task: int | None = None,
              ticket: int | None = None, detail: dict[str, Any] | None = None) -> None:
        self._write(
            "INSERT INTO events (ts, kind, sweep, task, ticket, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), kind, sweep, task, ticket, json.dumps(detail) if detail else None),
        )

    def events(self, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, ts, kind, sweep, task, ticket, detail FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        cols = ("id", "ts", "kind", "sweep", "task", "ticket", "detail")
        return [dict(zip(cols, r)) for r in rows]

    def last_event_id(self) -> int:
        return self.db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]

    # -- status callbacks -----------------------------------------------------------
    def set_callback(self, sweep: str, url: str, secret: str) -> None:
        self._write("INSERT OR REPLACE INTO callbacks VALUES (?, ?, ?)", (sweep, url, secret))

    def has_callbacks(self) -> bool:
        return self.db.execute("SELECT 1 FROM callbacks LIMIT 1").fetchone() is not None

    def callback(self, sweep: str) -> tuple[str, str] | None:
        """(url, secret) of a sweep's status callback, if it has one."""
        row = self.db.execute("SELECT url, secret FROM callbacks WHERE sweep = ?", (sweep,)).fetchone()
        return (row[0], row[1]) if row else None

    # -- allocation queues and their batch jobs (master/allocation.py) -------------------------
    def save_alloc_queue(self, name: str, spec: dict[str, Any]) -> None:
        self._write("INSERT INTO alloc_queues (name, spec, created) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec", (name, json.dumps(spec), time.time()))

    def set_alloc_queue(self, name: str, **values: Any) -> None:
        """Update columns of a queue: paused, error, errors, retry_at."""
        assert set(values) <= {"paused", "error", "errors", "retry_at"}
        self._write(f"UPDATE alloc_queues SET {', '.join(f'{k} = ?' for k in values)} WHERE name = ?",
                    (*values.values(), name))

    def remove_alloc_queue(self, name: str) -> None:
        self._write("DELETE FROM alloc_queues WHERE name = ?", (name,))
        self._write("DELETE FROM alloc_jobs WHERE queue = ?", (name,))

    def alloc_queues(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT name, spec, paused, created, error, errors, retry_at FROM alloc_queues "
                               "ORDER BY created, name")
        cols = ("name", "spec", "paused", "created", "error", "errors", "retry_at")
        return [dict(zip(cols, r), spec=json.loads(r[1]), paused=bool(r[2])) for r in rows]

    def add_alloc_job(self, queue: str, slaves: int) -> int:
        return self._write("INSERT INTO alloc_jobs (queue, state, slaves, submitted) VALUES (?, 'submitting', ?, ?)",
                           (queue, slaves, time.time())).lastrowid

    def set_alloc_job(self, job: int, **values: Any) -> None:
        """Update columns of a job: native_id, state, started, ended, exit_code, reason."""
        assert set(values) <= {"native_id", "state", "started", "ended", "exit_code", "reason"}
        self._write(f"UPDATE alloc_jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                    (*values.values(), job))

    def delete_alloc_job(self, job: int) -> None:
        self._write("DELETE FROM alloc_jobs WHERE id = ?", (job,))

    def alloc_jobs(self, queue: str | None = None, ended_limit: int = 20) -> list[dict[str, Any]]:
        """Jobs not ended, and the last `ended_limit` ended ones, per queue (or of one queue)."""
        where, args = ("", ()) if queue is None else ("AND queue = ?", (queue,))
        cols = ("id", "queue", "native_id", "state", "slaves", "submitted", "started", "ended", "exit_code", "reason")
        rows = self.db.execute(
            f"SELECT {', '.join(cols)} FROM (SELECT *, row_number() OVER (PARTITION BY queue, ended IS NULL "
            f"ORDER BY id DESC) AS n FROM alloc_jobs) WHERE (ended IS NULL OR n <= ?) {where} ORDER BY id",
            (ended_limit, *args))
        return [dict(zip(cols, r)) for r in rows]

    # -- reads for the HTTP API ------------------------------------------------------
    def tasks_page(self, sweep: str, state: str | None, offset: int, limit: int) -> list[dict[str, Any]]:
        """Tasks of a sweep in index order (optionally of one state), one page."""
        where, args = ("sweep = ?", [sweep]) if state is None else ("sweep = ? AND state = ?", [sweep, state])
        rows = self.db.execute(
            f"SELECT idx, params, state, attempts, reason, {_TASK_TICKET}, finished FROM tasks WHERE {where} "
            "ORDER BY idx LIMIT ? OFFSET ?", (*args, limit, offset))
        tasks = [_task_dict(r) for r in rows]
        self._add_attempt_fields(sweep, tasks)
        return tasks

    def _add_attempt_fields(self, sweep: str, tasks: list[dict[str, Any]]) -> None:
        """Each task's `slave`, `started`, `elapsed` (so far, while it runs) and `exit_code`: of its accepted (or
        running) ticket, else of its latest."""
        if not tasks:
            return
        latest = dict(self.db.execute("SELECT task, max(id) FROM tickets WHERE sweep = ? AND task BETWEEN ? AND ? "
                                      "GROUP BY task", (sweep, tasks[0]["task"], tasks[-1]["task"])).fetchall())
        chosen = {t["task"]: t["ticket"] or latest.get(t["task"]) for t in tasks}
        ids = [i for i in chosen.values() if i is not None]
        found = {r[0]: r[1:] for r in self.db.execute(
            "SELECT id, slave, coalesce(started, dispatched), finished, elapsed, exit_code FROM tickets "
            f"WHERE id IN ({','.join('?' * len(ids))})", ids)}
        now = time.time()
        for t in tasks:
            slave, started, finished, elapsed, exit_code = found.get(chosen[t["task"]], (None,) * 5)
            if elapsed is None and started is not None:
                elapsed = round((finished or now) - started, 3)
            t.update(slave=slave, started=started, elapsed=elapsed, exit_code=exit_code)

    def finished_per_interval(self, since: float, step: float, sweep: str | None) -> list[tuple[int, str, int]]:
        """(interval, state, tasks) of the tasks done or failed since `since`, interval n covering
        [since + n * step, since + (n + 1) * step)."""
        where, args = ("", ()) if sweep is None else (" AND sweep = ?", (sweep,))
        return self.db.execute(
            "SELECT CAST((finished - ?) / ? AS INTEGER), state, count(*) FROM tasks WHERE finished >= ? "
            f"AND state IN ('done', 'failed'){where} GROUP BY 1, 2", (since, step, since, *args)).fetchall()

    def exit_codes(self, sweep: str, first: int, last: int) -> dict[int, int | None]:
        """The exit code of each task's latest finished attempt, for tasks first..last."""
        rows = self.db.execute(
            "SELECT task, exit_code FROM tickets WHERE id IN (SELECT max(id) FROM tickets WHERE sweep = ? "
            "AND task BETWEEN ? AND ? AND finished IS NOT NULL GROUP BY task)", (sweep, first, last))
        return dict(rows.fetchall())

    def task(self, sweep: str, idx: int) -> dict[str, Any] | None:
        row = self.db.execute(
            f"SELECT idx, params, state, attempts, reason, {_TASK_TICKET}, finished FROM tasks "
            "WHERE sweep = ? AND idx = ?", (sweep, idx)).fetchone()
        if row is None:
            return None
        task = _task_dict(row)
        self._add_attempt_fields(sweep, [task])
        return task

    def running_by_slave(self) -> dict[str, tuple[int, int]]:
        """Per slave: (tickets it has started, tickets it holds ready but has not started: prefetched)."""
        rows = self.db.execute("SELECT slave, count(started), count(*) - count(started) FROM tickets "
                               "WHERE state = 'running' GROUP BY slave")
        return {slave: (started, prefetched) for slave, started, prefetched in rows}

    def started_tasks(self, sweep: str) -> int:
        """Running tasks of a sweep that a slave has begun (the others in state running are only prefetched)."""
        return self.db.execute("SELECT count(DISTINCT task) FROM tickets WHERE state = 'running' "
                               "AND started IS NOT NULL AND sweep = ?", (sweep,)).fetchone()[0]

    def rejected_tickets(self, sweep: str) -> int:
        """Attempts of a sweep whose result its validator refused."""
        return self.db.execute("SELECT count(*) FROM tickets WHERE state = 'rejected' AND sweep = ?",
                               (sweep,)).fetchone()[0]

    def task_counts_all(self) -> list[tuple[str, str, int]]:
        """(sweep, state, count) for every sweep: the tasks-by-state metric."""
        return self.db.execute("SELECT sweep, state, count(*) FROM tasks GROUP BY sweep, state").fetchall()

    def events_of(self, after: int, sweep: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Events after an id, optionally of one sweep, with their detail decoded."""
        if sweep is None:
            out = self.events(after, limit)
        else:
            rows = self.db.execute(
                "SELECT id, ts, kind, sweep, task, ticket, detail FROM events WHERE id > ? AND sweep = ? "
                "ORDER BY id LIMIT ?", (after, sweep, limit))
            out = [dict(zip(("id", "ts", "kind", "sweep", "task", "ticket", "detail"), r)) for r in rows]
        for e in out:
            e["detail"] = json.loads(e["detail"]) if e["detail"] else {}
        return out


#: Hot-path statements written in batches (see Store._batch). Rows of different statements are written statement by
#: statement in _BATCH_ORDER, not in the order they came: a ticket's row is made before it is marked started or
#: finished, and a task is started before it is done (a task done is not dispatched again before a write outside
#: the batch, such as a retry, has flushed it).
_START_TASK = "UPDATE tasks SET state = 'running', attempts = attempts + 1 WHERE sweep = ? AND idx = ?"
_COMPLETE_TASK = "UPDATE tasks SET state = 'done', ticket = ?, reason = NULL, finished = ? WHERE sweep = ? AND idx = ?"
_STORE_RESULT = "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)"
_START_TICKET = ("INSERT INTO tickets (id, sweep, task, slave, attempt, dispatched, state) "
                 "VALUES (?, ?, ?, ?, ?, ?, 'running')")
_FINISH_TICKET = "UPDATE tickets SET state = ?, exit_code = ?, reason = ?, elapsed = ?, finished = ? WHERE id = ?"
_MARK_STARTED = "UPDATE tickets SET started = ? WHERE id = ?"
_SLAVE_INFO = "UPDATE slaves SET state = ?, last_seen = ?, info = ? WHERE name = ?"
_BATCH_ORDER = (_START_TASK, _START_TICKET, _MARK_STARTED, _FINISH_TICKET, _COMPLETE_TASK, _STORE_RESULT, _SLAVE_INFO)
#: Tasks whose attempts and params one read fetches ahead of their dispatch.
READ_AHEAD = 256

#: A task's winning ticket, or while it runs the ticket out for it (found through the running-tickets index).
_TASK_TICKET = ("coalesce(ticket, (SELECT max(id) FROM tickets WHERE state = 'running' "
                "AND tickets.sweep = tasks.sweep AND tickets.task = tasks.idx))")


def _task_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    idx, params, state, attempts, reason, ticket, finished = row
    return {"task": idx, "params": json.loads(params), "state": state, "attempts": attempts,
            "reason": reason, "ticket": ticket, "finished": finished}

"""Result validation on the master, off its event loop: a command or a Python callable says accept or reject(reason).

A finished result of a sweep with `validate` is not stored at once: its outputs
are laid out as files in `incoming/<ticket>/` (one per result name) and a pool
thread runs the validator. The verdict goes back to the loop through a queue and
a wake-up pipe the loop polls; only there is the result accepted (stored,
collected later) or rejected (the ticket settles as `rejected`, the task is
retried on another slave up to `max_attempts`, the result is never stored).

A validation command is a shell template with the task's parameters plus
`{task}`, `{ticket}`, `{sweep}`, `{attempt}`, `{workdir}` and `{results}` (the folder holding one file per
result; a glob result is a sub-folder). Exit 0 accepts; anything else rejects,
with the command's stdout (or stderr) as the reason.

A Python validator is `validate(params, results) -> bool | str`, where
`results` maps each result name to the `pathlib.Path` of its file (folder for a
glob result): True (or None) accepts, False rejects, a non-empty string rejects
with that reason; an exception rejects with its text.
"""
from __future__ import annotations

import importlib
import os
import queue
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import structlog

from ticketfarm import template
from ticketfarm.spec import Validation

if TYPE_CHECKING:
    from master.server import Master, Transfer

log = structlog.get_logger("ticketfarm.validate")

#: Longest reason kept from a validator's output.
REASON_LIMIT = 2000

Verdict = tuple[bool, str]


class Validator:
    """Runs validators in a thread pool; `pump()` (on the loop) applies the verdicts."""

    def __init__(self, master: "Master", workers: int):
        self.master = master
        self.pool: ThreadPoolExecutor | None = None
        self.workers = max(1, workers)
        self.pending: dict[int, "Transfer"] = {}
        self.approved: set[int] = set()
        self.verdicts: queue.SimpleQueue[tuple[int, Verdict]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self._callables: dict[str, Callable[..., Any]] = {}

    # -- called by Master._accept ----------------------------------------------------------
    def intercept(self, transfer: "Transfer") -> bool:
        """True when the result goes to validation first (then `_accept` returns and waits for the verdict)."""
        tid = transfer.ticket_id
        if tid in self.approved:
            self.approved.discard(tid)
            return False
        active = self.master.scheduler.active.get(transfer.sweep)
        if active is None or active.sweep.validate is None:
            return False
        if tid in self.pending:
            return True  # the slave sent it again while its verdict is pending
        self.pending[tid] = transfer
        folder = self.master.incoming_dir / str(tid)
        results = self._lay_out(transfer, folder, list(active.sweep.results))
        params = self.master.store.params(transfer.sweep, transfer.task)
        values = {**params, "task": transfer.task, "ticket": tid, "sweep": transfer.sweep,
                  "attempt": self._attempt(tid), "workdir": str(folder), "results": str(folder)}
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tf-validate")
        self.pool.submit(self._run, tid, active.sweep.validate, params, results, values, folder)
        return True

    def _attempt(self, tid: int) -> int:
        ticket = self.master.scheduler.tickets.get(tid)
        return ticket.attempt if ticket is not None else 0

    @staticmethod
    def _lay_out(transfer: "Transfer", folder: Path, names: list[str]) -> dict[str, Path]:
        """One file per result in `folder` (large ones are already there, written chunk by chunk)."""
        folder.mkdir(parents=True, exist_ok=True)
        for out in transfer.outputs:
            if out.data is not None:
                path = folder / out.name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(out.data)
        return {name: folder / name for name in names}

    # -- in a pool thread ------------------------------------------------------------------------
    def _run(self, tid: int, rule: Validation, params: dict[str, Any], results: dict[str, Path],
             values: dict[str, Any], folder: Path) -> None:
        try:
            verdict = self._command(rule, values, folder) if rule.command else self._python(rule, params, results)
        except Exception as exc:  # noqa: BLE001 - a broken validator rejects, it never takes the master down
            verdict = (False, f"validator error: {type(exc).__name__}: {exc}")
        self.verdicts.put((tid, verdict))
        try:
            os.write(self.wake_w, b"v")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    @staticmethod
    def _command(rule: Validation, values: dict[str, Any], folder: Path) -> Verdict:
        assert rule.command is not None
        line = template.render_shell(rule.command, values)
        env = {**os.environ, "TICKETFARM_RESULTS": str(folder), "TICKETFARM_TASK": str(values["task"]),
               "TICKETFARM_SWEEP": str(values["sweep"])}
        try:
            proc = subprocess.run(["/bin/sh", "-c", line], cwd=folder, env=env, capture_output=True,
                                  timeout=rule.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"validator timed out after {rule.timeout:g}s"
        if proc.returncode == 0:
            return True, ""
        said = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        return False, said[:REASON_LIMIT] or f"validator exited with {proc.returncode}"

    def _python(self, rule: Validation, params: dict[str, Any], results: dict[str, Path]) -> Verdict:
        answer = self._callable(rule)(dict(params), dict(results))
        if answer is True or answer is None:
            return True, ""
        if answer is False:
            return False, "rejected by validator"
        if isinstance(answer, str):
            return (False, answer[:REASON_LIMIT]) if answer else (True, "")
        return bool(answer), "" if answer else "rejected by validator"

    def _callable(self, rule: Validation) -> Callable[..., Any]:
        assert rule.python is not None
        key = f"{rule.python}\0{rule.source or ''}"
        fn = self._callables.get(key)
        if fn is None:
            module, name = rule.python.split(":")
            if rule.source is not None:
                namespace: dict[str, Any] = {"__name__": f"ticketfarm_validator_{len(self._callables)}"}
                exec(compile(rule.source, module, "exec"), namespace)  # noqa: S102 - the submitter's own code
                fn = namespace[name]
            else:
                fn = getattr(importlib.import_module(module), name)
            self._callables[key] = fn
        return fn

    # -- back on the loop ---------------------------------------------------------------------------
    def pump(self) -> None:
        """Apply every verdict that has arrived."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                tid, (ok, reason) = self.verdicts.get_nowait()
            except queue.Empty:
                return
            transfer = self.pending.pop(tid, None)
            if transfer is None:
                continue
            if ok:
                self.approved.add(tid)
                self.master._accept(transfer)
            else:
                self._reject(transfer, reason)

    def _reject(self, transfer: "Transfer", reason: str) -> None:
        master, tid = self.master, transfer.ticket_id
        shutil.rmtree(master.incoming_dir / str(tid), ignore_errors=True)
        reason = f"rejected: {reason}"
        master.store.event("result_rejected", sweep=transfer.sweep, task=transfer.task, ticket=tid,
                           detail={"reason": reason})
        log.info("result_rejected", sweep=transfer.sweep, task=transfer.task, ticket=tid, reason=reason)
        ticket = master.scheduler.tickets.get(tid)
        if ticket is not None:
            master.scheduler.avoid.setdefault((ticket.sweep, ticket.task), set()).add(ticket.slave)
            master._fail_ticket(ticket, "rejected", reason, transfer.exit_code, transfer.elapsed)
        elif (row := master.store.ticket(tid)) is not None and row.state == "running":
            master.store.finish_ticket(tid, "rejected", exit_code=transfer.exit_code, reason=reason,
                                       elapsed=transfer.elapsed)
        master.pending_acks.setdefault(transfer.identity, []).append(tid)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        os.close(self.wake_r)
        os.close(self.wake_w)

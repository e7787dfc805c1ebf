"""Result validation on the master, off its event loop: a command or a Python callable says accept or reject(reason).

A finished result of a sweep with `validate` is not stored at once: result intake
(master/intake.py) lays its outputs out as files in `incoming/<ticket>/` (one per
result name) and a pool thread runs the validator. The verdict goes back to the
loop through a queue and a wake-up pipe the loop polls; only there is the result
accepted (stored, collected later) or rejected (the ticket settles as `rejected`,
the task is retried on another slave up to `max_attempts`, the result is never stored).

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
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from ticketfarm import template
from ticketfarm.spec import Validation

#: Longest reason kept from a validator's output.
REASON_LIMIT = 2000

Verdict = tuple[bool, str]
Item = TypeVar("Item")


class Validator(Generic[Item]):
    """Runs validators in a thread pool; `verdicts()` (on the loop) hands back each item with its verdict."""

    def __init__(self, workers: int):
        self.pool: ThreadPoolExecutor | None = None
        self.workers = max(1, workers)
        self.pending: dict[int, Item] = {}
        self.queue: queue.SimpleQueue[tuple[int, Verdict]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self._callables: dict[str, Callable[..., Any]] = {}

    def check(self, ticket: int, item: Item, rule: Validation, params: dict[str, Any], results: dict[str, Path],
              values: dict[str, Any], folder: Path) -> None:
        """Validate one ticket's result (laid out in `folder`); `item` comes back with the verdict."""
        self.pending[ticket] = item
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tf-validate")
        self.pool.submit(self._run, ticket, rule, params, results, values, folder)

    # -- in a pool thread ------------------------------------------------------------------------
    def _run(self, tid: int, rule: Validation, params: dict[str, Any], results: dict[str, Path],
             values: dict[str, Any], folder: Path) -> None:
        try:
            verdict = self._command(rule, values, folder) if rule.command else self._python(rule, params, results)
        except Exception as exc:  # noqa: BLE001 - a broken validator rejects, it never takes the master down
            verdict = (False, f"validator error: {type(exc).__name__}: {exc}")
        self.queue.put((tid, verdict))
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
            proc = subprocess.run(template.shell_argv(line), cwd=folder, env=env, capture_output=True,
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
    def verdicts(self) -> list[tuple[Item, Verdict]]:
        """Every verdict that has arrived, with its item."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while True:
            try:
                ticket, verdict = self.queue.get_nowait()
            except queue.Empty:
                return out
            item = self.pending.pop(ticket, None)
            if item is not None:
                out.append((item, verdict))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        os.close(self.wake_r)
        os.close(self.wake_w)

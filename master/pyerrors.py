"""Failure kinds of python tasks, shared by the API client (master/api.py) and the warm workers (slave/pyworker.py)."""
from __future__ import annotations


class TaskFailed(RuntimeError):
    """A task that produced no result: its worker died, timed out or was lost, on every allowed attempt.

    `reason` is the master's readable account, e.g. "python worker died: exit code 3 (after 2 attempts)".
    """

    def __init__(self, reason: str, sweep: str = "", task: int = -1):
        super().__init__(reason)
        self.reason, self.sweep, self.task = reason, sweep, task

    def __reduce__(self):  # keep the fields through pickling
        return (type(self), (self.reason, self.sweep, self.task))


class TaskCancelled(RuntimeError):
    """The task was cancelled (by its client or with its sweep) before it produced a result."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a worker; set as the exception's __cause__."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteError(Exception):
    """Stands for a worker's exception that could not be pickled or unpickled (its type name and message)."""

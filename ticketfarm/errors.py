"""Every error ticketfarm raises on purpose: one base class, one subclass per failure kind.

Errors about something the user wrote (a config file, a sweep spec) name the file (or file:line)
and the field in their message, and carry the field's path as `field`, so callers such as the
HTTP API report it without reading it back out of the message text.

A field path is written as in the TOML it came from: table keys joined by dots, array entries
by their index in brackets, e.g. "timeout", "parameters", "parameters.csv",
"parameters.grid.x.range", "inputs[2]", "inputs[2].template", "results.size",
"collect[0].path", "workers.linux-x86_64", "validate.timeout". An unknown key is itself the
field ("colour", "inputs[0].colour"). A row of a parameter file is blamed on the key naming
the file ("parameters.csv"), with the file and line in the message.
"""
from __future__ import annotations


class TicketfarmError(Exception):
    """Base of every ticketfarm error."""


class ConfigError(TicketfarmError, ValueError):
    """A config file, spec or argument that cannot be used; the message names file and field.

    `field` is the offending field's path (syntax above) when one is to blame, "" otherwise.
    """

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # keep the field through pickling
        return (type(self), (str(self), self.field))


class SweepExists(ConfigError):
    """A sweep of that name exists with a different spec."""


class CollectionCollision(ConfigError):
    """A sweep would write a collection path another sweep's collection already holds."""


class RetryRefused(ConfigError):
    """A retry that cannot apply: unknown sweep or task, nothing to retry, or a spec changed beyond what may change."""


class KeyFileError(TicketfarmError, ValueError):
    """A CURVE key file that is missing, unreadable, too open or not a key."""


class DeployError(TicketfarmError):
    """The wheelhouse could not be built or the checkout is not usable for deploying."""


class RolloutError(TicketfarmError):
    """A check of the rollout failed (keys, registration, drain); the message says what differs and what to do."""


class ProtocolError(TicketfarmError, ValueError):
    """A message that does not follow the wire protocol; it is logged and dropped."""


class MasterUnreachable(TicketfarmError, ConnectionError):
    """No master answered at the given address in time (or a local master did not start)."""


class NotEnoughSlaves(TicketfarmError, TimeoutError):
    """Fewer slaves than asked for connected to the master within the wait."""


class MasterRefused(TicketfarmError, RuntimeError):
    """The master answered a control request with an error; the message is the master's reason."""


class ClusterClosed(TicketfarmError, RuntimeError):
    """Work was submitted to a Cluster after close()."""


class ApiRefused(ConfigError):
    """The HTTP API answered with an error object; the message is its code and message, `field` its field."""

    def __init__(self, status: int, code: str, message: str, field: str = ""):
        super().__init__(f"{message} ({status} {code})", field)
        self.status = status
        self.code = code

    def __reduce__(self):
        return (type(self), (self.status, self.code, str(self).rsplit(" (", 1)[0], self.field))


class TaskFailed(TicketfarmError, RuntimeError):
    """A task that produced no result: its worker died, timed out or was lost, on every allowed attempt.

    `reason` is the master's readable account, e.g. "python worker died: exit code 3 (after 2 attempts)".
    """

    def __init__(self, reason: str, sweep: str = "", task: int = -1):
        super().__init__(reason)
        self.reason, self.sweep, self.task = reason, sweep, task

    def __reduce__(self):  # keep the fields through pickling
        return (type(self), (self.reason, self.sweep, self.task))


class ArgumentTooLarge(TicketfarmError, ValueError):
    """A task's pickled arguments (with its function) do not fit in one message to the master."""


class TaskCancelled(TicketfarmError, RuntimeError):
    """The task was cancelled (by its client or with its sweep) before it produced a result."""


class RemoteTraceback(TicketfarmError):
    """Carries the traceback text of an exception raised in a worker; set as the exception's __cause__."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteError(TicketfarmError):
    """Stands for a worker's exception that could not be pickled or unpickled (its type name and message)."""


class ResultMissing(TicketfarmError):
    """A declared output file that the worker did not write."""


class UnsafePath(TicketfarmError, ValueError):
    """A path in a ticket that would leave its work dir (absolute, `..`, or through a symlink)."""


class StateDirInUse(TicketfarmError):
    """Another live master holds the state dir's lock; the message names the dir, its pid and what to do."""


class BindFailed(ConfigError):
    """The master cannot listen on a configured address (in use, not on this host); `field` names the setting."""


class TaskUnreachable(TicketfarmError):
    """A running task's files or server could not be reached for a client; `code` is the HTTP API's error code
    (conflict: not running; bad_gateway: no port announced, connection refused; too_large; ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return (type(self), (self.code, str(self)))


class ParallelUsage(ConfigError):
    """A `ticketfarm parallel` command line that cannot run: an unsupported GNU parallel option or replacement
    string (named), a bad value, or a missing input file; `ticketfarm parallel` exits 255 on it, as parallel does."""

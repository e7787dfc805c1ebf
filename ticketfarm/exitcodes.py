"""The exit codes of the `ticketfarm` command: one table, and the one code each kind of error ends it with."""
from __future__ import annotations

from dataclasses import dataclass

from ticketfarm import errors


@dataclass(frozen=True)
class ExitCode:
    """One exit status and what it tells a script."""

    code: int
    name: str
    meaning: str


OK = ExitCode(0, "ok", "done: the sweep finished with every task done, or the command did what it was asked")
FAILED = ExitCode(1, "failed", "the sweep finished with failed tasks, or there was nothing to do (no failed task "
                               "to retry, nothing confirmed)")
USAGE = ExitCode(2, "usage", "the command line, a spec, a config or a key file cannot be used; nothing ran")
UNREACHABLE = ExitCode(3, "unreachable", "no master answered (or a local one did not start, or too few slaves "
                                         "came)")
STATE_IN_USE = ExitCode(4, "state_in_use", "another live master holds the state dir")
UNRUNNABLE = ExitCode(5, "unrunnable", "no connected slave can run the sweep (the reason is printed; its state is "
                                       "kept: start such slaves, or run with --wait-for-slaves)")
REFUSED = ExitCode(6, "refused", "the master or its HTTP API refused the request (no such sweep or task, a state "
                                 "that does not allow it, no permission)")
DEPLOY = ExitCode(7, "deploy", "building the wheelhouse or a check of the rollout failed")
INTERRUPTED = ExitCode(130, "interrupted", "stopped by Ctrl-C (SIGINT); a run's state is kept, the same command "
                                           "resumes it")

#: Every exit code, in the order the docs list them.
ALL = (OK, FAILED, USAGE, UNREACHABLE, STATE_IN_USE, UNRUNNABLE, REFUSED, DEPLOY, INTERRUPTED)

#: The exit code of each error the command may end with; an error's own class, else its nearest listed base, decides.
BY_ERROR: dict[type[BaseException], ExitCode] = {
    errors.TicketfarmError: FAILED,
    errors.ConfigError: USAGE,
    errors.KeyFileError: USAGE,
    errors.ProtocolError: FAILED,
    errors.MasterUnreachable: UNREACHABLE,
    errors.NotEnoughSlaves: UNREACHABLE,
    errors.StateDirInUse: STATE_IN_USE,
    errors.MasterRefused: REFUSED,
    errors.ApiRefused: REFUSED,
    errors.SweepExists: REFUSED,
    errors.RetryRefused: REFUSED,
    errors.CollectionCollision: USAGE,
    errors.BindFailed: USAGE,
    errors.UnsafePath: USAGE,
    errors.ArgumentTooLarge: USAGE,
    errors.ClusterClosed: USAGE,
    errors.TaskFailed: FAILED,
    errors.TaskCancelled: FAILED,
    errors.RemoteError: FAILED,
    errors.RemoteTraceback: FAILED,
    errors.ResultMissing: FAILED,
    errors.TaskUnreachable: REFUSED,
    errors.ParallelUsage: USAGE,
    errors.DeployError: DEPLOY,
    errors.RolloutError: DEPLOY,
    KeyboardInterrupt: INTERRUPTED,
}


def for_error(exc: BaseException) -> ExitCode:
    """The exit code an error ends the command with."""
    for cls in type(exc).__mro__:
        if cls in BY_ERROR:
            return BY_ERROR[cls]
    raise KeyError(f"no exit code for {type(exc).__name__}")

"""Jobs as a ticketfarm sweep: one task per job, run by a small sh wrapper in the user's directory and shell.

The wrapper is what makes a job behave as under GNU parallel:
- it enters the directory `ticketfarm parallel` was started in (relative paths work; a slave that cannot see that
  directory fails the job with the reason, it never runs it elsewhere);
- it runs the command line in the user's shell (parallel's choice: $PARALLEL_SHELL, the shell that started us,
  $SHELL, /bin/sh), with PARALLEL_SEQ set;
- a failing job is retried by ticketfarm (the wrapper fails the attempt) until its --retries attempts are used; the
  last attempt's output is kept whatever its exit code, which goes to the result file `exitval`;
- --timeout is coreutils' timeout(1) around the command, so the output a job wrote before it was killed is kept,
  and the job reports Exitval -1, Signal 15 as under parallel.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import psutil

from ticketfarm.parallel.inputs import Job
from ticketfarm.parallel.replace import CommandTemplate
from ticketfarm.spec import Sweep

#: $1 = attempt, $2 = the command line, $3 = the job's seq; the rest comes from the environment. No braces: the
#: ticketfarm template renders argv words.
WRAPPER = """cd "$TICKETFARM_PARALLEL_DIR" || exit 125
PARALLEL_SEQ=$3
export PARALLEL_SEQ
if [ "$TICKETFARM_PARALLEL_TIMEOUT" = 0 ]; then
  "$TICKETFARM_PARALLEL_SHELL" -c "$2"
else
  timeout -k 1 "$TICKETFARM_PARALLEL_TIMEOUT" "$TICKETFARM_PARALLEL_SHELL" -c "$2"
fi
status=$?
if [ "$status" -ne 0 ] && [ "$1" -lt "$TICKETFARM_PARALLEL_TRIES" ]; then exit "$status"; fi
if [ "$TICKETFARM_PARALLEL_TIMEOUT" != 0 ] && [ "$status" -eq 124 ]; then status="-1 15"; else status="$status 0"; fi
echo "$status" > "$TICKETFARM_WORKDIR/exitval"
"""
#: Results of every task: what the job printed, and "EXITVAL SIGNAL" from the wrapper.
RESULTS = {"stdout": "stdout", "stderr": "stderr", "exitval": "file:exitval"}
#: Attempts beyond the job's own --retries, for what is not the job's fault (a slave lost on the way).
SPARE_ATTEMPTS = 2
#: A job without --timeout may run this long (the master still notices a lost slave by its heartbeats).
NO_TIMEOUT = 365 * 86400.0
#: How long a timed-out job gets to die before the master gives up on its ticket.
TIMEOUT_GRACE = 30.0
#: Shells GNU parallel recognises among its ancestors.
SHELLS = {"ash", "bash", "bsd-csh", "csh", "dash", "fdsh", "fish", "fizsh", "ksh", "ksh93", "lksh", "mksh", "pdksh",
          "posh", "rbash", "rc", "rush", "rzsh", "sash", "sh", "static-sh", "tcsh", "yash", "zsh"}


def user_shell() -> str:
    """The shell parallel would run commands in: $PARALLEL_SHELL, the nearest ancestor shell, $SHELL, /bin/sh."""
    if os.environ.get("PARALLEL_SHELL"):
        return os.environ["PARALLEL_SHELL"]
    try:
        for proc in psutil.Process().parents():
            cmdline = proc.cmdline()
            name = os.path.basename(cmdline[0]).lstrip("-") if cmdline else ""
            if name in SHELLS:
                return shutil.which(name) or cmdline[0]
    except psutil.Error:
        pass
    return os.environ.get("SHELL") or "/bin/sh"


def sweep_name() -> str:
    """A name of its own for each run (a master may run several at once)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:20] or "host"
    return f"parallel-{host}-{os.getpid()}-{int(time.time() * 1000)}"


def build_sweep(jobs: list[Job], template: CommandTemplate, cwd: Path, retries: int, timeout: float | None,
                max_concurrent: int = 0) -> Sweep:
    """Task i runs jobs[i]."""
    params = [{"cmd": template.render(job.args, job.seq), "seq": job.seq} for job in jobs]
    env = {"TICKETFARM_PARALLEL_DIR": str(cwd), "TICKETFARM_PARALLEL_SHELL": user_shell(),
           "TICKETFARM_PARALLEL_TIMEOUT": f"{timeout:g}" if timeout else "0",
           "TICKETFARM_PARALLEL_TRIES": str(retries)}
    return Sweep(name=sweep_name(), params=params, argv=["/bin/sh", "-c", WRAPPER, "sh", "{attempt}", "{cmd}", "{seq}"],
                 env=env, results=dict(RESULTS), collect=[], max_attempts=retries + SPARE_ATTEMPTS,
                 timeout=timeout + TIMEOUT_GRACE if timeout else NO_TIMEOUT, max_concurrent=max_concurrent)


def exit_status(text: bytes) -> tuple[int, int]:
    """(Exitval, Signal) from the wrapper's `exitval` file."""
    code, sig = text.split()
    return int(code), int(sig)

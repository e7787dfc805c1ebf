"""Running one ticket: its work dir, inputs, the worker process tree, timeout, and its outputs."""
from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from ticketfarm import messages, template
from ticketfarm.errors import ResultMissing, UnsafePath

STDOUT = ".tf-stdout"
STDERR = ".tf-stderr"
STDIN = ".tf-stdin"
MANIFEST = ".tf-result.json"
log = structlog.get_logger("ticketfarm.slave")
#: Where a task that serves HTTP or websockets writes its port (relayed by the master: slave/relay.py).
HTTP_PORT_FILE = ".ticketfarm/http-port"
#: How much of stderr (its last bytes) a failure report carries, so the user sees why a worker failed.
STDERR_TAIL = 4096


@dataclass
class TicketSpec:
    """One ticket of a TICKET message as the slave uses it (fields shared by a batch are shared objects: read only)."""

    ticket: int
    sweep: str
    task: int
    attempt: int
    timeout: float
    params: dict[str, Any]
    command: str | None
    argv: list[str] | None
    env: dict[str, str]
    inputs: list[messages.InputFile]
    results: dict[str, str]
    payload: list[bytes] = field(default_factory=list)
    kind: str = "command"
    fn: str = ""
    worker: str = ""
    """Local path of the shipped worker executable (the `{worker}` placeholder), set by the slave's cache."""
    memory: int = 0
    """The task's memory limit in MiB (0 = none): the slave kills a worker tree using more."""
    workers: dict[str, messages.WorkerFile] | None = None
    """The TICKET's worker executables by platform."""
    files: list[messages.InputFile] = field(default_factory=list)
    """Files uploaded into the task's sandbox (frames of `payload`), written before the worker starts."""
    cwd: str = ""
    """The worker's working directory; "" = its work dir."""

    @classmethod
    def batch(cls, msg: messages.Ticket) -> list["TicketSpec"]:
        """The tickets of one TICKET message: a command ticket's literal inputs are the message's payload frames,
        a python ticket's payload is its own pickled arguments."""
        s = msg.sweep
        shared = dict(sweep=s.sweep, timeout=float(s.timeout), command=s.command, argv=s.argv, env=s.env,
                      inputs=s.inputs, results=s.results, kind=s.kind, memory=s.memory, workers=s.workers or None,
                      cwd=s.cwd)
        if s.kind == "python":
            return [cls(ticket=t.ticket, task=t.task, attempt=t.attempt, params={}, payload=[t.args], fn=t.fn,
                        **shared) for t in msg.tickets]
        return [cls(ticket=t.ticket, task=t.task, attempt=t.attempt, params=t.params, payload=s.frames, files=t.files,
                    **shared) for t in msg.tickets]


@dataclass
class Output:
    name: str
    path: str
    size: int
    data: bytes | None = None  # held in memory: small python results (no file at all), exit codes (not read back)


@dataclass
class Outcome:
    """What a finished ticket left behind; written to disk as its manifest until acknowledged."""

    ticket: int
    sweep: str
    task: int
    ok: bool
    exit_code: int | None
    elapsed: float
    reason: str = ""
    outputs: list[Output] = field(default_factory=list)
    slave: str = ""
    in_memory: bool = False
    """Nothing of it is on disk (a small python result): no work dir to remove after the ACK."""
    final: bool = False
    """A failure no other attempt can mend (a result refused for an unsafe path): the master does not retry it."""

    def save(self, workdir: Path) -> None:
        """The manifest, written atomically; an output with no file (an exit code) carries its bytes in it.

        A disk that refuses it (full: ENOSPC, or gone) leaves the outcome in memory only: it is reported all the
        same, and if the slave dies before the master's ACK it is lost unacknowledged, so its task runs again."""
        data = {**self.__dict__, "outputs": [
            {**o.__dict__, "data": base64.b64encode(o.data).decode() if not o.path and o.data is not None else None}
            for o in self.outputs]}
        # Plain descriptor calls, not Path.write_text's text file object: a tiny task feels every µs of this.
        tmp, final = f"{workdir}/{MANIFEST}.tmp", f"{workdir}/{MANIFEST}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                rest = memoryview(json.dumps(data).encode())
                while rest:  # a nearly full disk may take part of it: the rest, or ENOSPC
                    rest = rest[os.write(fd, rest):]
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            log.warning("manifest_not_saved", ticket=self.ticket, workdir=str(workdir), error=str(exc))

    @classmethod
    def load(cls, path: Path) -> "Outcome":
        data = json.loads(path.read_text())
        data["outputs"] = [Output(**{**o, "data": None if o["data"] is None else base64.b64decode(o["data"])})
                           for o in data["outputs"]]
        return cls(**data)


class Worker:
    """A ticket's worker process tree, started in its own process group so it can be killed whole.

    Made in two steps: the work dir, inputs and output files first (while the slots are still busy), so that a
    slot that frees up only has to spawn the process (`start`).
    """

    def __init__(self, spec: TicketSpec, workdir: Path, slave: str, base_env: dict[str, str]):
        self.spec = spec
        self.slave = slave
        self.workdir = workdir
        self.started = 0.0
        self.deadline = 0.0
        self.killed_for: str | None = None
        self.progress_sent: dict[str, int] = {}
        self.values = {**spec.params, "ticket": spec.ticket, "task": spec.task, "sweep": spec.sweep,
                       "workdir": str(workdir), "attempt": spec.attempt}
        if spec.worker:
            self.values["worker"] = spec.worker
        if spec.cwd and not os.path.isdir(spec.cwd):
            raise NotADirectoryError(f"cwd {spec.cwd} is not a directory on slave {slave} (a cwd other than "
                                     "\"ticket\" needs a filesystem the slaves share with the submitter)")
        values = self.values
        stdin = self._write_inputs(values)
        if spec.command is not None:
            self.args = template.shell_argv(template.render_shell(spec.command, values))
        else:
            self.args = [template.render(a, values) for a in spec.argv or []]
        self.base_env = base_env
        self.added_env = {**spec.env, "TICKETFARM_TICKET": str(spec.ticket), "TICKETFARM_TASK": str(spec.task),
                          "TICKETFARM_SWEEP": spec.sweep, WORKDIR_MARK: str(workdir),
                          "TICKETFARM_HTTP_PORT_FILE": str(workdir / HTTP_PORT_FILE)}
        """The worker's environment beyond the slave's `base_env`."""
        self.stdin_path = stdin
        self.ended: float | None = None
        """When the process ended (monotonic), if it was seen then; else its end is when it was reaped."""
        self.files = self._open_streams()
        """The parent's copies of the worker's stdin/stdout/stderr, closed once the worker has its own."""

    def _open_streams(self) -> ExitStack:
        # Plain descriptors, not file objects: the worker only needs the fds, and a tiny task feels every µs.
        with ExitStack() as stack:
            self.stdout = _open_fd(stack, self.workdir / STDOUT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            self.stderr = _open_fd(stack, self.workdir / STDERR, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            self.stdin = _open_fd(stack, self.stdin_path, os.O_RDONLY) if self.stdin_path else subprocess.DEVNULL
            return stack.pop_all()

    def start(self) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + self.spec.timeout
        try:
            # A session, not just a process group (process_group=0 spawns a little faster): a worker of a slave
            # started from a shell must not reach that terminal, e.g. ssh prompting on /dev/tty.
            self.proc = subprocess.Popen(self.args, cwd=self.spec.cwd or self.workdir,
                                         env={**self.base_env, **self.added_env}, stdin=self.stdin,
                                         stdout=self.stdout, stderr=self.stderr, start_new_session=True)
        finally:
            self.files.close()

    def _write_inputs(self, values: dict[str, Any]) -> Path | None:
        stdin = None
        for item in self.spec.inputs:
            if item.frame is not None:
                data = self.spec.payload[item.frame]
            else:
                data = template.render(item.template or "", values).encode()
            target = self.workdir / STDIN if item.name == "stdin" else safe_join(self.workdir, item.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if item.name == "stdin":
                stdin = target
        for upload in self.spec.files:  # no name is special here: "stdin" is a file like any other
            target = safe_join(self.workdir, upload.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.spec.payload[upload.frame])  # type: ignore[index]
        return stdin

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self, reason: str) -> None:
        """Kill the whole tree: the session's process group, and any child that left it."""
        self.killed_for = self.killed_for or reason
        kill_tree(self.proc.pid, str(self.workdir))
        self.proc.wait()

    def finish(self) -> Outcome:
        """Gather outputs after the process ended and write the manifest."""
        code = self.proc.returncode
        elapsed = (self.ended or time.monotonic()) - self.started
        spec = self.spec
        if self.killed_for:
            outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, code, elapsed, self.killed_for)
        elif code != 0:
            outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, code, elapsed,
                              f"exit code {code}{self._stderr_tail()}")
        else:
            try:
                outputs = self._collect_outputs(code)
                outcome = Outcome(spec.ticket, spec.sweep, spec.task, True, code, elapsed,
                                  self._empty_result_warning(outputs), outputs)
            except ResultMissing as exc:
                outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, code, elapsed, str(exc))
            except UnsafePath as exc:  # a symlink or a name leading out of the work dir: never sent
                outcome = Outcome(spec.ticket, spec.sweep, spec.task, False, code, elapsed, f"result refused: {exc}",
                                  final=True)
        outcome.slave = self.slave
        outcome.save(self.workdir)
        return outcome

    def _empty_result_warning(self, outputs: list[Output]) -> str:
        """A success whose every result is empty but which wrote to stderr is likely a silent failure: say so."""
        written = [o for o in outputs if self.spec.results.get(o.name.partition("/")[0]) != "exit_code"]
        if not self.spec.results or any(o.size for o in written):
            return ""
        tail = self._stderr_tail()
        return f"exit code 0, every result empty, stderr{tail}" if tail else ""

    def _stderr_tail(self) -> str:
        path = self.workdir / STDERR
        size = path.stat().st_size
        if not size:
            return ""
        with open(path, "rb") as fh:
            fh.seek(max(0, size - STDERR_TAIL))
            return ": " + fh.read().decode(errors="replace").strip()

    def _collect_outputs(self, code: int) -> list[Output]:
        outputs = []
        for name, source in self.spec.results.items():
            if source == "stdout":
                outputs.append(self._file_output(name, self.workdir / STDOUT))
            elif source == "stderr":
                outputs.append(self._file_output(name, self.workdir / STDERR))
            elif source == "exit_code":
                data = f"{code}\n".encode()
                outputs.append(Output(name, "", len(data), data))  # no file: the manifest carries it
            else:
                outputs.extend(self._glob_outputs(name, template.render(source[5:], self.values)))
        return outputs

    def _file_output(self, name: str, path: Path) -> Output:
        return Output(name, str(path), path.stat().st_size)

    def _glob_outputs(self, name: str, pattern: str) -> list[Output]:
        if not glob.has_magic(pattern):
            path = safe_join(self.workdir, pattern)
            if not path.is_file():
                raise ResultMissing(f"result {name}: file {pattern!r} was not written")
            return [self._file_output(name, path)]
        outputs = []
        for match in sorted(glob.glob(pattern, root_dir=self.workdir, recursive=True)):
            path = safe_join(self.workdir, match)
            if path.is_file():
                rel = path.relative_to(self.workdir.resolve()).as_posix()
                outputs.append(self._file_output(f"{name}/{rel}", path))
        return outputs




def _open_fd(stack: ExitStack, path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    stack.callback(os.close, fd)
    return fd


def safe_join(root: Path, name: str) -> Path:
    """root/name, refusing absolute names, `..` and symlinks that lead outside root."""
    if os.path.isabs(name):
        raise UnsafePath(f"absolute path {name!r} not allowed")
    path = (root / name).resolve()
    base = root.resolve()
    if path != base and base not in path.parents:
        raise UnsafePath(f"{name!r} leaves the work dir")
    return path


def kill_tree(pid: int, workdir: str = "") -> None:
    """SIGKILL a worker's process group, its descendants that left the group (setsid) and, given its work dir,
    those that also left the tree (a double fork, reparented to init): every process marked with that work dir."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    if workdir:
        kill_marked(WORKDIR_MARK, workdir)


WORKDIR_MARK = "TICKETFARM_WORKDIR"
"""In every worker's environment: its work dir. With the slave's own mark (slave.watchdog.SLAVE_MARK) it finds the
processes a worker left behind wherever they went, as long as they keep the environment they were given."""


def kill_marked(name: str, value: str) -> int:
    """SIGKILL every process (but this one) whose environment has name=value, among those this user may read;
    returns how many. A scan of the process table: for kills and clean-ups, never per ticket."""
    killed = 0
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(name) == value:
                proc.kill()
                killed += 1
        except psutil.Error:
            continue  # gone, a zombie, or another user's
    return killed


def remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)

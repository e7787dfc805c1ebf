"""What a run leaves behind as GNU parallel does: the --joblog file (also what --resume reads) and --results dirs."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from ticketfarm.errors import ParallelUsage

HEADER = "\t".join(("Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command")) + "\n"
_VALID = re.compile(r"\d+\s+\S+\s+([-0-9.]+\s+){6}")
_SUCCEEDED = re.compile(r"(\d+)(?:\t[^\t]+){5}\t0\t0\t")


@dataclass
class Blob:
    """One output of a job: its size, and its bytes read block by block when printed (large ones stay on disk)."""

    size: int
    chunks: Callable[[], Iterator[bytes]]

    @classmethod
    def of(cls, data: bytes) -> "Blob":
        return cls(len(data), lambda: iter((data,)))

    def read(self) -> bytes:
        return b"".join(self.chunks())


@dataclass
class Finished:
    """A job that ran to its end (or was given up on), with what parallel reports of it."""

    seq: int
    command: str
    stdout: Blob
    stderr: Blob
    exitval: int
    signal: int = 0
    host: str = ":"
    start: float = 0.0
    runtime: float = 0.0
    reason: str = ""
    """Why ticketfarm gave the job up without running it to its end (empty when it ran)."""

    @property
    def failed(self) -> bool:
        return bool(self.exitval or self.signal)

    def joblog_line(self) -> str:
        runtime = int(self.runtime * 1000) / 1000  # parallel truncates to milliseconds
        return "\t".join((str(self.seq), self.host, f"{self.start:.3f}", f"{runtime:10.3f}", "0",
                          str(self.stdout.size), str(self.exitval), str(self.signal),
                          self.command.replace("\n", "\0"))) + "\n"


def spec_path(spec: str) -> tuple[str, bool]:
    """--joblog +FILE appends to FILE (no header), as parallel does."""
    return (spec[1:], True) if spec.startswith("+") else (spec, False)


def already_run(spec: str, failed_too: bool) -> set[int]:
    """--resume: the Seq of every job in the joblog; --resume-failed: of those that exited 0 with no signal."""
    path, _ = spec_path(spec)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise ParallelUsage(f"cannot read --joblog {path}: {exc.strerror}") from None
    seqs = set()
    for line in lines[1:]:
        if not line:
            continue
        match = _SUCCEEDED.match(line) if failed_too else re.match(r"\d+", line)
        if match:
            seqs.add(int(match.group(1) if failed_too else match.group(0)))
        elif not _VALID.match(line):
            raise ParallelUsage(f"format of --joblog {path} is wrong: {line}")
    return seqs


def open_joblog(spec: str, resuming: bool) -> TextIO:
    """The joblog to write: appended to when resuming one that exists (or for +FILE), else new with its header."""
    path, append = spec_path(spec)
    append = append or (resuming and os.path.exists(path) and os.path.getsize(path) > 0)
    try:
        fh = open(path, "a" if append else "w", encoding="utf-8", errors="surrogateescape", newline="\n")
    except OSError as exc:
        raise ParallelUsage(f"cannot write --joblog {path}: {exc.strerror}") from None
    if not append:
        fh.write(HEADER)
        fh.flush()
    return fh


def results_dir(base: str, args: list[str]) -> Path:
    """--results DIR: DIR/1/<arg 1>/2/<arg 2>/..., with \\ tab NUL and / in arguments written \\\\ \\t \\0 \\_."""
    parts = []
    for n, arg in enumerate(args, 1):
        escaped = arg.replace("\\", "\\\\").replace("\t", "\\t").replace("\0", "\\0").replace("/", "\\_")
        parts += [str(n), escaped]
    return Path(base + "/" + "/".join(parts))


def has_results(base: str, args: list[str]) -> bool:
    """--resume with --results: a job whose stdout file exists has run."""
    return (results_dir(base, args) / "stdout").exists()


def write_results(base: str, args: list[str], job: Finished) -> None:
    folder = results_dir(base, args)
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in (("stdout", job.stdout), ("stderr", job.stderr)):
        with open(folder / name, "wb") as fh:
            for chunk in blob.chunks():
                fh.write(chunk)
    (folder / "seq").write_text(str(job.seq))

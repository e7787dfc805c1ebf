"""The walkthroughs of README.md and docs/*.md: named code blocks, and a user's shell that runs them as written.

A page marks each block a test runs with `<!-- walkthrough: NAME -->` on the line before its fence.
Every `sh`, `console` and `python` block of a page must be a named walkthrough (tests/test_walkthroughs.py
checks it), so a command shown to users is a command some test has run.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("sh", "bash", "console", "python")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
NAME = re.compile(r"<!-- walkthrough: ([\w-]+) -->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: its walkthrough name (None when unnamed), language, text, line."""

    page: Path
    name: str | None
    lang: str
    body: str
    line: int


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        named = NAME.match(before.strip())
        found.append(Block(page, named.group(1) if named else None, m.group(1), m.group(2),
                           text.count("\n", 0, m.start()) + 1))
    return found


def walkthroughs(page: Path) -> dict[str, str]:
    """The page's named blocks, in page order."""
    return {b.name: b.body for b in blocks(page) if b.name}


def commands(body: str) -> list[str]:
    """The commands of a shell block, one per entry: continuation lines joined, `$ ` prompts and
    whole-line comments dropped (a trailing comment stays: bash ignores it)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = [line[2:] if line.startswith("$ ") else line for line in joined.splitlines()]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class Shell:
    """A user's terminal: bash in DIR with `ticketfarm` and `ticketfarm-slave` of this checkout on PATH.

    `subs` maps the page's host names and paths to this test's; a command a user leaves running in a
    terminal of its own goes to `start` and is stopped (SIGTERM, then SIGKILL) by `close`."""

    cwd: Path
    subs: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    started: list[tuple[str, subprocess.Popen[str], Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        shim = self.cwd.parent / f"{self.cwd.name}-bin"
        shim.mkdir(exist_ok=True)
        for name, module in (("ticketfarm", "ticketfarm"), ("ticketfarm-slave", "slave")):
            (shim / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m {module} "$@"\n')
            (shim / name).chmod(0o755)
        base = {k: v for k, v in os.environ.items() if not k.startswith("TICKETFARM_")}
        self.env = {**base, "PATH": f"{shim}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), **self.env}

    def substitute(self, text: str) -> str:
        for page_value, ours in self.subs.items():
            text = text.replace(page_value, ours)
        return text

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """One command as the user types it, to its end."""
        return subprocess.run(["bash", "-o", "pipefail", "-c", self.substitute(command)], cwd=self.cwd,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def script(self, body: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A whole block in one bash, stopping at the first command that fails."""
        return self.run("set -e\n" + body, timeout=timeout)

    def start(self, command: str) -> subprocess.Popen[str]:
        """A command the user leaves running (a master, a slave): its output goes to a log file."""
        log = self.cwd.parent / f"{self.cwd.name}-bg{len(self.started)}.log"
        proc = subprocess.Popen(["bash", "-c", "exec " + self.substitute(command)], cwd=self.cwd, env=self.env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.started.append((command, proc, log))
        return proc

    def log(self, proc: subprocess.Popen[str]) -> str:
        return next(log.read_text() for _, p, log in self.started if p is proc)

    def close(self) -> None:
        for _, proc, _ in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 15
        for _, proc, _ in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

"""`ticketfarm parallel` as a user runs it: the command itself, refusals by name, a running master, what is left
behind (nothing but the joblog and results); tests/test_parallel_compat.py compares outputs with GNU parallel."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import MasterProcess, wait_for
from tests.walkthrough import ROOT, Shell, walkthroughs
from ticketfarm.logs import configure_logging
from ticketfarm.parallel.command import main
from ticketfarm.parallel.run import Streams


def tf_parallel(*words: str, cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None,
                before: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ticketfarm", *before, "parallel", *words], input=stdin, cwd=cwd,
                          capture_output=True, timeout=120, env={**os.environ, **(env or {})})


def in_process(*words: str, cwd: Path, stdin: bytes = b"") -> tuple[int, bytes, str]:
    configure_logging("warning")
    streams = Streams(io.BytesIO(stdin), io.BytesIO(), io.BytesIO())
    code = main(list(words), streams=streams, cwd=cwd)
    return code, streams.stdout.getvalue(), streams.stderr.getvalue().decode()


def test_the_command_runs_jobs_in_the_users_directory_from_stdin_and_counts_failures(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1\n2\n")
    (tmp_path / "b.txt").write_text("1\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = tf_parallel("-k", "printf '%s ' {}; wc -l < {}", cwd=tmp_path, stdin=b"a.txt\nb.txt\nmissing.txt\n",
                       env={"TMPDIR": str(scratch)})
    assert proc.stdout == b"a.txt 2\nb.txt 1\nmissing.txt ", proc.stderr
    assert b"missing.txt" in proc.stderr  # the shell's complaint, on stderr as under GNU parallel
    assert proc.returncode == 1
    assert list(scratch.iterdir()) == []  # the run's state dir went with it


def test_global_options_before_the_verb_and_the_bar_on_stderr(tmp_path: Path) -> None:
    proc = tf_parallel("--bar", "-k", "-j", "2", "echo", ":::", "x", "y", cwd=tmp_path,
                       before=("--log-level", "warning"))
    assert (proc.returncode, proc.stdout) == (0, b"x\ny\n"), proc.stderr
    assert b"2/2" in proc.stderr


@pytest.mark.parametrize("words, named", [
    (["--pipe", "wc"], "--pipe"), (["-u", "echo", ":::", "a"], "-u"), (["-S", "host", "echo"], "-S"),
    (["--sshlogin", "host", "echo"], "--sshlogin"), (["--halt", "now,fail=1", "echo"], "--halt"),
    (["-X", "echo"], "-X"), (["--plus", "echo"], "--plus"), (["echo", "{%}", ":::", "a"], "{%}"),
    (["echo", "{= $_ .= 1 =}", ":::", "a"], "{= $_ .= 1 =}"), (["--timeout", "50%", "echo"], "50%"),
    (["--results", "out.csv", "echo"], "out.csv"), (["--retries", "0", "echo"], "--retries 0"),
    (["-j", "jobs.txt", "echo"], "jobs.txt"), (["--resume", "echo", ":::", "a"], "--joblog"),
    (["echo", "::::", "nosuch"], "nosuch"), (["--joblog"], "--joblog"),
])
def test_what_is_not_supported_is_refused_by_name(words: list[str], named: str, tmp_path: Path) -> None:
    code, out, err = in_process(*words, cwd=tmp_path)
    assert (code, out) == (255, b"")
    assert named in err and err.startswith("ticketfarm parallel: ")


def test_a_refusal_from_the_command_exits_255_without_running_anything(tmp_path: Path) -> None:
    proc = tf_parallel("--line-buffer", "touch", "{}", ":::", "made", cwd=tmp_path)
    assert proc.returncode == 255
    assert b"--line-buffer is not supported" in proc.stderr and b"grouped" in proc.stderr
    assert not (tmp_path / "made").exists()


def test_a_job_whose_directory_the_slave_cannot_enter_is_given_up_with_the_reason(tmp_path: Path) -> None:
    code, out, err = in_process("-k", "echo", ":::", "a", "b", cwd=tmp_path / "gone")
    assert (code, out) == (2, b"")
    assert err.count("was given up") == 2 and "gone" in err


def test_help_lists_the_options(tmp_path: Path) -> None:
    code, out, _ = in_process("--help", cwd=tmp_path)
    assert code == 0 and b"--joblog" in out and b"{/.}" in out


def test_on_a_running_master_with_its_slaves(tmp_path: Path, master: MasterProcess, start_slave) -> None:
    start_slave("far-1", 2)
    work = tmp_path / "work-here"
    work.mkdir()
    (work / "f1").write_text("one\n")
    (work / "f2").write_text("two\n")
    proc = tf_parallel("--master", master.endpoint, "-k", "--joblog", "jl", "cat {}; exit {#}", ":::", "f1", "f2",
                       cwd=work, before=("--state", str(master.state)))
    assert (proc.returncode, proc.stdout) == (2, b"one\ntwo\n"), proc.stderr
    rows = [line.split("\t") for line in (work / "jl").read_text().splitlines()[1:]]
    assert [(r[0], r[1], r[6], r[8]) for r in rows] == [("1", "far-1", "1", "cat f1; exit 1"),
                                                        ("2", "far-1", "2", "cat f2; exit 2")]
    assert master.control("status")["sweeps"] == []  # forgotten on the master once reported


def test_the_state_dir_of_a_running_master_is_required(tmp_path: Path) -> None:
    code, _, err = in_process("--state", str(tmp_path / "nothing"), "echo", ":::", "a", cwd=tmp_path)
    assert code == 255 and "no master state here" in err


#: The walkthroughs of ticketfarm parallel (listed in tests/test_walkthroughs.py RUN_BY): page, name.
WALKTHROUGHS = [(ROOT / "README.md", "parallel"), (ROOT / "docs" / "PARALLEL.md", "parallel-tour")]


def console_steps(body: str) -> list[tuple[str, str]]:
    """A console block as ($ command, the output shown after it) pairs."""
    steps: list[list[str]] = []
    for line in body.splitlines(keepends=True):
        if line.startswith("$ "):
            steps.append([line[2:].rstrip("\n"), ""])
        else:
            steps[-1][1] += line
    return [(command, shown) for command, shown in steps]


@pytest.mark.parametrize("tool", ["ticketfarm parallel", "parallel"])
@pytest.mark.parametrize("page, name", WALKTHROUGHS, ids=[name for _, name in WALKTHROUGHS])
def test_walkthroughs_print_what_the_docs_show(page: Path, name: str, tool: str, tmp_path: Path) -> None:
    """As written, and with GNU parallel instead: the pages claim both print the same."""
    if tool == "parallel" and shutil.which("parallel") is None:
        pytest.skip("GNU parallel is not installed")
    (tmp_path / ".parallel").mkdir()
    (tmp_path / ".parallel" / "will-cite").touch()
    work = tmp_path / "work"
    work.mkdir()
    shell = Shell(work, env={"HOME": str(tmp_path)})
    for command, shown in console_steps(walkthroughs(page)[name]):
        result = shell.run(command.replace("ticketfarm parallel", tool))
        assert result.stdout == shown, (command, result.stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_kills_its_jobs_keeps_the_joblog_and_resumes(sig: int, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    words = ["-j2", "--joblog", "jl", "sleep {}; echo {}", ":::", "0.1", "300.5", "301.5"]
    proc = subprocess.Popen([sys.executable, "-m", "ticketfarm", "parallel", *words], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(scratch)})
    try:
        wait_for(lambda: (tmp_path / "jl").exists() and len((tmp_path / "jl").read_text().splitlines()) == 2, 60,
                 "the first job in the joblog")
        wait_for(lambda: len(sleepers()) == 2, 30, "both long jobs to run")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (proc.returncode, out) == (130, b"0.1\n"), err
    assert b"--resume" in err
    wait_for(lambda: not sleepers(), 10, "the jobs to be killed")
    assert list(scratch.iterdir()) == []
    again = tf_parallel("-k", "--resume", *words[1:3], "echo", ":::", "0.1", "x", "y", cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, b"x\ny\n"), again.stderr  # job 1 is in the joblog: skipped


def sleepers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] in (["sleep", "300.5"], ["sleep", "301.5"])]

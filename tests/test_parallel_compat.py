"""`ticketfarm parallel` against GNU parallel: a table of invocations run through both, byte-identical stdout and
equal exit codes; joblogs compared column by column (timings by format), --results trees file by file.

The ticketfarm side runs in this process (`ticketfarm.parallel.command.main`, a real embedded master and a real
local slave process per invocation); tests/test_parallel.py runs the `ticketfarm parallel` command itself.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ticketfarm.logs import configure_logging
from ticketfarm.parallel.command import main
from ticketfarm.parallel.run import Streams

pytestmark = pytest.mark.skipif(shutil.which("parallel") is None, reason="GNU parallel is not installed")

JOBLOG = """Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand
1\t:\t1700000000.000\t     0.010\t0\t2\t0\t0\techo a
2\t:\t1700000000.010\t     0.010\t0\t0\t1\t0\techo b; exit 1
4\t:\t1700000000.020\t     0.010\t0\t2\t0\t0\techo d
"""


@dataclass
class Case:
    """One invocation: the words after `parallel`, its stdin, and files made in its directory first."""

    name: str
    argv: list[str]
    stdin: bytes = b""
    files: dict[str, str] = field(default_factory=dict)
    joblog: str | None = None
    """A joblog this run writes: compared line by line (Starttime and JobRuntime by format only)."""
    results: str | None = None
    """A --results directory this run writes: compared file by file."""


CASES = [
    Case("cartesian", ["-k", "echo", ":::", "a", "b", ":::", "1", "2", "3"]),
    Case("three-sources", ["-k", "echo", "{3}{2}{1}", ":::", "a", "b", ":::", "1", "2", ":::", "x", "y"]),
    Case("argfile", ["-k", "echo", "line:", "::::", "args.txt"], files={"args.txt": "one\ntwo words\nthree\n"}),
    Case("two-argfiles", ["-k", "echo", "{1}-{2}", "::::", "f1", "f2"], files={"f1": "a\nb\n", "f2": "1\n2\n3"}),
    Case("args-and-file", ["-k", "echo", ":::", "x", "y", "::::", "f"], files={"f": "1\n2\n"}),
    Case("linked", ["-k", "echo", ":::", "a", "b", "c", ":::+", "1", "2", "3", ":::", "X", "Y"]),
    Case("linked-files", ["-k", "echo", ":::", "a", "b", "::::+", "f1", "f2"], files={"f1": "x\ny\n", "f2": "p\nq\n"}),
    Case("colsep-csv", ["-k", "--colsep", ",", "echo", "{2}", "{1}", "::::", "data.csv"],
         files={"data.csv": "1,one\n2,two\n3,\n"}),
    Case("colsep-tab-stdin", ["-k", "--colsep", "\\t", "echo", "{2}:{1}:{3}"], stdin=b"a\tb\nc\td\te\n"),
    Case("stdin", ["-k", "echo", "got"], stdin=b"x\ny y\nz\n"),
    Case("path-replacements", ["-k", "echo", "{}", "{.}", "{/}", "{//}", "{/.}"],
         stdin=b"dir/sub/file.tar.gz\nplain\n/abs/x.c\nrel/dir/\n.hidden\n"),
    Case("seq", ["-k", "echo", "{#}:", "{}", ":::", "a", "b", "c"]),
    Case("append-args", ["-k", "printf", "%s-%s|", ":::", "a", "b", ":::", "c d"]),
    Case("pipe", ["-k", "echo {} | tr a-z A-Z | rev", ":::", "abc", "def"]),
    Case("quoting", ["-k", "printf '<%s>\\n'", ":::", "a b", "it's", "$HOME", "x;y", "*", "", "tab\there", "é"]),
    Case("relative-files", ["-k", "wc -c < {}; cat {} | head -1", ":::", "f1.txt", "sub/f2.txt"],
         files={"f1.txt": "hello\nworld\n", "sub/f2.txt": "x\n"}),
    Case("failing", ["-k", "echo {}; exit {}", ":::", "0", "1", "2", "0"]),
    Case("many-failing", ["-j8", "exit 1", "::::", "n.txt"], files={"n.txt": "".join(f"{i}\n" for i in range(103))}),
    Case("j1-order", ["-j1", "echo", ":::", "c", "b", "a"]),
    Case("joblog", ["-k", "--joblog", "jl", "echo {}; exit {}", ":::", "0", "3", "0"], joblog="jl"),
    Case("results", ["--results", "res", "echo out {1}; echo err {2} >&2", ":::", "a", "b c", ":::", "x", "y/z"],
         results="res"),
    Case("timeout", ["-k", "--timeout", "1", "--joblog", "jl", "echo start {}; sleep {}; echo end {}", ":::", "0.1",
                     "20"], joblog="jl"),
    Case("retries", ["-k", "--retries", "3", "echo try {}; test -e flag{} || { touch flag{}; exit 1; }", ":::", "1",
                     "2"]),
    Case("retries-exhausted", ["-k", "--retries", "2", "--joblog", "jl", "echo try >> count{}; exit 4", ":::", "1"],
         joblog="jl"),
    Case("resume", ["-k", "--resume", "--joblog", "jl", "echo", ":::", "a", "b", "c", "d", "e"],
         files={"jl": JOBLOG}, joblog="jl"),
    Case("resume-failed", ["-k", "--resume-failed", "--joblog", "jl", "echo", ":::", "a", "b", "c", "d"],
         files={"jl": JOBLOG}, joblog="jl"),
    Case("null", ["-k", "-0", "echo", "[{}]"], stdin=b"a b\0c\nd\0"),
    Case("no-run-if-empty", ["-k", "-r", "echo", "x{}x"], stdin=b"a\n\n  \nb\n"),
    Case("tag", ["-k", "--tag", "echo {}; echo second", ":::", "a", "b c", ":::", "1"]),
    Case("verbose", ["-k", "-v", "echo", ":::", "a", "b c"]),
    Case("dry-run", ["-k", "--dry-run", "cp {} {.}.bak", ":::", "a.txt", "my file.txt", "o'k.c"]),
    Case("args-are-commands", ["-k", ":::", "echo a", "echo b | tr b B"]),
    Case("positional-transforms", ["-k", "echo", "{1/.}", "{2//}", "{-1/}", ":::", "dir/a.txt", ":::", "x/y/z"]),
    Case("delimiter-argfile", ["-k", "-d", ",", "-a", "list", "echo", "<{}>"], files={"list": "a,b b,c"}),
    Case("stderr-apart", ["-k", "echo out {}; echo err {} >&2", ":::", "1", "2"]),
    Case("empty-input", ["echo", "nothing"]),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME where GNU parallel's citation notice is acknowledged."""
    path = tmp_path_factory.mktemp("home")
    (path / ".parallel").mkdir()
    (path / ".parallel" / "will-cite").touch()
    return path


def prepare(directory: Path, case: Case) -> Path:
    directory.mkdir(parents=True)
    for name, text in case.files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def run_gnu(directory: Path, case: Case, home: Path) -> tuple[int, bytes]:
    proc = subprocess.run(["parallel", *case.argv], input=case.stdin, cwd=directory, capture_output=True,
                          env={**os.environ, "HOME": str(home)}, timeout=120)
    return proc.returncode, proc.stdout


def run_ticketfarm(directory: Path, case: Case) -> tuple[int, bytes, bytes]:
    streams = Streams(io.BytesIO(case.stdin), io.BytesIO(), io.BytesIO())
    code = main(list(case.argv), streams=streams, cwd=directory)
    return code, streams.stdout.getvalue(), streams.stderr.getvalue()


def joblog_rows(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal",
                                    "Command"]
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        assert len(row) == 9, row
        assert re.fullmatch(r"\d+\.\d{3}", row[2]) and re.fullmatch(r" *\d+\.\d{3}", row[3]), row
        assert len(row[3]) >= 10, row
    # Timings differ between any two runs; the rest must not (rows in Seq order: completion order may differ).
    return sorted(([r[0], r[1], r[4], r[5], r[6], r[7], r[8]] for r in rows), key=lambda r: int(r[0]))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_as_gnu_parallel(case: Case, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging("warning")
    monkeypatch.setenv("HOME", str(home))
    gnu_dir, tf_dir = prepare(tmp_path / "gnu", case), prepare(tmp_path / "tf", case)
    gnu_code, gnu_out = run_gnu(gnu_dir, case, home)
    tf_code, tf_out, tf_err = run_ticketfarm(tf_dir, case)
    assert tf_out == gnu_out, tf_err.decode(errors="replace")
    assert tf_code == gnu_code, tf_err.decode(errors="replace")
    if case.joblog:
        assert joblog_rows(tf_dir / case.joblog) == joblog_rows(gnu_dir / case.joblog)
    if case.results:
        assert tree(tf_dir / case.results) == tree(gnu_dir / case.results)
    for name in ("count1", "flag1"):  # what jobs left in their directory: attempts made
        assert (tf_dir / name).exists() == (gnu_dir / name).exists()
        if (gnu_dir / name).exists():
            assert (tf_dir / name).read_bytes() == (gnu_dir / name).read_bytes()

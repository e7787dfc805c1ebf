"""Collect formats on a real store (unit); the CLI's files and the HTTP downloads of a real sweep (integration)."""
from __future__ import annotations

import csv
import io
import base64
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from master.collect import (
    FORMATS,
    LEDGER,
    TABLE_CELL_LIMIT,
    CollectError,
    Collector,
    Entry,
    Part,
    collect,
    parts,
    tar_entries,
    write_entries,
)
from master.store import Store, StoredOutput
from tests import fixtures_tasks as tasks
from tests.httpcluster import ROOT, TOKEN, HttpCluster, env
from ticketfarm.protocol import INLINE_LIMIT
from ticketfarm.spec import PYTHON_RESULTS, CollectRule, Sweep, load_spec

API = "/api/v1"
BINARY = b"\x89PNG\r\n\x1a\n\x00\xff\xfe"
#: Parameters of a JSON-lines table whose rows give their keys in different orders.
JSONL_ROWS = ['{"x": 0, "y": "a"}', '{"y": "b", "x": 1}', '{"x": 2, "y": "c"}', '{"y": "d", "x": 3}']


class Farm:
    """A real Store in a state dir with one sweep loaded from a real spec; tasks are settled by hand."""

    def __init__(self, state: Path, sweep: Sweep):
        self.state, self.sweep = state, sweep
        state.mkdir(parents=True, exist_ok=True)
        self.store = Store(state / "state.db")
        self.store.add_sweep(sweep)
        self.store.commit()
        self.tickets = 0

    @classmethod
    def from_toml(cls, tmp_path: Path, toml: str, jsonl: list[str] = JSONL_ROWS) -> "Farm":
        (tmp_path / "p.jsonl").write_text("\n".join(jsonl) + "\n")
        (tmp_path / "spec.toml").write_text(toml)
        return cls(tmp_path / "state", load_spec(tmp_path / "spec.toml"))

    def done(self, idx: int, **outputs: bytes) -> None:
        """Task idx done with these outputs (`__` in a name is `/`); large ones stored as files, as the master does."""
        stored = []
        for key, data in outputs.items():
            name = key.replace("__", "/")
            if len(data) <= INLINE_LIMIT:
                stored.append(StoredOutput(name, len(data), data, None))
                continue
            path = self.state / "results" / self.sweep.name / str(idx) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            stored.append(StoredOutput(name, len(data), None, str(path.relative_to(self.state))))
        ticket = self._start(idx)
        self.store.complete_task(self.sweep.name, idx, ticket, stored)
        self.store.finish_ticket(ticket, "done", exit_code=0)
        self.store.commit()

    def fail(self, idx: int, reason: str) -> None:
        ticket = self._start(idx)
        self.store.finish_ticket(ticket, "failed", exit_code=3, reason=reason)
        self.store.fail_task(self.sweep.name, idx, reason)
        self.store.commit()

    def _start(self, idx: int) -> int:
        self.tickets += 1
        self.store.start_tickets(self.sweep.name, [(self.tickets, idx)], "s1", time.time())
        return self.tickets

    def collector(self, state_dir: Path | None = None) -> Collector:
        return Collector(self.store, state_dir or self.state, self.sweep)

    def bytes_of(self, fmt: str, result: str | None = None) -> bytes:
        return b"".join(self.collector().chunks(fmt, result))


GLOBS = """
name = "globs"
command = "true"
[parameters]
jsonl = "p.jsonl"
[results]
out = "stdout"
parts = "file:out/*.bin"
[[collect]]
mode = "blockwise"
result = "parts"
path = "blocks.txt"
"""


@pytest.fixture
def farm(tmp_path: Path) -> Farm:
    farm = Farm.from_toml(tmp_path, GLOBS)
    yield farm
    farm.store.close()


def csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


# -- regressions: the divergences between the CLI's and HTTP's copies -------------------------------------------------
def test_csv_cells_sit_under_their_header_when_jsonl_keys_come_in_another_order(farm: Farm) -> None:
    for idx in range(4):
        farm.done(idx, out=b"o%d\n" % idx)
    rows = csv_rows(farm.bytes_of("csv", "out"))
    assert rows == [["task", "x", "y", "out"], ["0", "0", "a", "o0"], ["1", "1", "b", "o1"],
                    ["2", "2", "c", "o2"], ["3", "3", "d", "o3"]]


def test_blockwise_ends_each_glob_file_with_a_newline(farm: Farm) -> None:
    farm.done(0, parts__out__a=b"x", parts__out__b=b"y")
    assert farm.bytes_of("blockwise", "parts") == b"# task=0 x=0 y=a\nx\ny\n"


def test_failed_csv_puts_parameters_under_their_header_when_jsonl_keys_come_in_another_order(farm: Farm) -> None:
    farm.fail(1, "exit code 3")
    farm.fail(3, 'said "no", twice')
    assert csv_rows(farm.bytes_of("failed")) == [["task", "x", "y", "reason"], ["1", "1", "b", "exit code 3"],
                                                 ["3", "3", "d", 'said "no", twice']]


def test_python_sweeps_failed_csv_and_tables_name_the_call_by_its_repr(tmp_path: Path) -> None:
    sweep = Sweep(name="py", params=[], kind="python", results=dict(PYTHON_RESULTS),
                  collect=[CollectRule("folders", "py")])
    farm = Farm(tmp_path / "state", sweep)
    call = [{"fn": "f" * 64, "args": "gASVBQAAAAAAAABLA4WULg==", "repr": f"({i},)"} for i in range(2)]
    farm.store.add_tasks("py", 0, [json.dumps(c) for c in call])
    farm.done(0, result=pickle.dumps(9))
    farm.fail(1, "python worker died: exit code 3")
    assert csv_rows(farm.bytes_of("failed")) == [["task", "repr", "reason"],
                                                 ["1", "(1,)", "python worker died: exit code 3"]]
    assert csv_rows(farm.bytes_of("csv", "result"))[0] == ["task", "repr", "result"]
    assert farm.bytes_of("blockwise", "result").startswith(b"# task=0 repr=(0,)\n")
    assert json.loads(farm.bytes_of("jsonl"))["params"] == {"repr": "(0,)", "fn": "f" * 64,
                                                            "args": "gASVBQAAAAAAAABLA4WULg=="}
    farm.store.close()


def test_a_large_table_cell_names_the_same_path_whatever_the_state_dir_was_called(
        farm: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    farm.done(0, out=b"z" * (INLINE_LIMIT + 1))
    monkeypatch.chdir(farm.state.parent)
    as_given = {str(farm.state), "state", f"../{farm.state.parent.name}/state"}
    cells = {b"".join(farm.collector(Path(name)).table_csv("out")) for name in as_given}
    assert len(cells) == 1
    (path,) = [row[-1] for row in csv_rows(cells.pop())[1:]]
    assert Path(path).is_absolute() and Path(path).read_bytes() == b"z" * (INLINE_LIMIT + 1)


def test_blockwise_header_lists_parameters_in_the_sweeps_order(farm: Farm) -> None:
    farm.done(1, parts__out__a=b"x\n")
    assert farm.bytes_of("blockwise", "parts") == b"# task=1 x=1 y=b\nx\n"


def test_cli_and_http_folders_are_one_archive_of_the_same_files(farm: Farm, tmp_path: Path) -> None:
    farm.done(1, out=b"hello\n", parts__out__a=b"x", parts__out__sub__b=BINARY)
    on_disk = tmp_path / "cli"
    write_entries(on_disk, farm.collector().folder_entries(None))
    archive = b"".join(farm.collector().chunks("folders"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        tf.extractall(tmp_path / "http", filter="data")
    assert tree(on_disk) == tree(tmp_path / "http") == {
        "1/params.json": b'{"x": 1, "y": "b"}', "1/out": b"hello\n", "1/parts/out/a": b"x", "1/parts/out/sub/b": BINARY}


# -- every format, unit -----------------------------------------------------------------------------------------------
def test_concat_is_each_done_tasks_result_in_task_order_large_files_streamed_whole(farm: Farm) -> None:
    big = bytes(range(256)) * (3 * 1024 * 1024 // 256 + 7)  # over READ_SIZE: several blocks from its file
    farm.done(2, out=b"two\n")
    farm.done(0, out=big)
    farm.fail(1, "no")
    farm.done(3, out=b"")
    assert farm.bytes_of("concat", "out") == big + b"two\n"
    assert farm.bytes_of("concat") == big + b"two\n"  # the first result by default


def test_concat_of_a_glob_result_is_its_files_in_name_order(farm: Farm) -> None:
    farm.done(0, parts__out__b=b"B", parts__out__a=b"A", parts__out__c=b"")
    farm.done(1, parts__out__a=b"a")
    assert farm.bytes_of("concat", "parts") == b"ABa"


def test_blockwise_keeps_newlines_and_adds_none_for_empty_files(farm: Farm) -> None:
    farm.done(0, parts__out__a=b"x\n\n", parts__out__b=b"", parts__out__c=b"y")
    farm.done(2)
    assert farm.bytes_of("blockwise", "parts") == b"# task=0 x=0 y=a\nx\n\ny\n# task=2 x=2 y=c\n"


def test_jsonl_table_has_parameters_in_sweep_order_and_every_result(farm: Farm) -> None:
    farm.done(1, out=b"  one\n", parts__out__a=b"x", parts__out__b=b"y")
    farm.done(3)
    lines = farm.bytes_of("jsonl").splitlines()
    assert [list(json.loads(line)["params"]) for line in lines] == [["x", "y"], ["x", "y"]]
    assert json.loads(lines[0]) == {"task": 1, "params": {"x": 1, "y": "b"},
                                    "results": {"out": "one", "parts": "out/a out/b"}}
    assert json.loads(lines[1])["results"] == {"out": "", "parts": ""}  # nothing stored: empty cells


def test_table_cells_of_bytes_that_are_not_utf8_come_base64_encoded_and_decode_to_the_bytes(
        farm: Farm, tmp_path: Path) -> None:
    farm.done(0, out=BINARY)
    farm.done(1, out=b"base64:looks encoded\n")  # text with the prefix is encoded too: no cell is ambiguous
    collect(farm.store, farm.state, farm.sweep, tmp_path / "o")
    assert (tmp_path / "o" / "blocks.txt").read_bytes() == farm.bytes_of("blockwise", "parts")
    rows = csv_rows(farm.bytes_of("csv", "out"))
    assert rows[1][-1].startswith("base64:") and base64.b64decode(rows[1][-1][len("base64:"):]) == BINARY
    assert base64.b64decode(rows[2][-1][len("base64:"):]) == b"base64:looks encoded"
    first, second = (json.loads(line) for line in farm.bytes_of("jsonl", "out").splitlines())
    assert base64.b64decode(first["results"]["out"]["base64"]) == BINARY
    assert second["results"]["out"] == "base64:looks encoded"  # JSON tells strings from objects: no escaping


def test_binary_results_pass_untouched_through_concat_blockwise_and_folders(farm: Farm, tmp_path: Path) -> None:
    farm.done(0, out=BINARY, parts__out__a=BINARY)
    assert farm.bytes_of("concat", "out") == BINARY
    assert farm.bytes_of("blockwise", "parts") == b"# task=0 x=0 y=a\n" + BINARY + b"\n"
    write_entries(tmp_path / "f", farm.collector().folder_entries(None))
    task = tmp_path / "f" / "0"
    assert (task / "out").read_bytes() == (task / "parts" / "out" / "a").read_bytes() == BINARY


def test_a_large_result_appears_in_tables_as_its_path_not_its_bytes(farm: Farm) -> None:
    farm.done(0, out=b"q" * (TABLE_CELL_LIMIT + 1))
    cell = json.loads(farm.bytes_of("jsonl", "out"))["results"]["out"]
    assert cell == str((farm.state / "results" / "globs" / "0" / "out").resolve())


def test_folders_of_one_result_hold_only_its_files(farm: Farm, tmp_path: Path) -> None:
    farm.done(0, out=b"o", parts__out__a=b"x", partsy=b"not mine")
    names = [e.path for e in farm.collector().folder_entries("parts")]
    assert names == ["0/params.json", "0/parts/out/a"]


def test_folders_archive_streams_long_names_and_large_files_and_reads_back(farm: Farm, tmp_path: Path) -> None:
    long = "parts__" + "__".join(["d" * 60] * 3)
    big = os.urandom(2 * 1024 * 1024 + 3)
    farm.done(0, out=big, **{long: b"deep"})
    chunks = list(farm.collector().chunks("folders"))
    assert max(len(c) for c in chunks) <= 1024 * 1024  # never the whole file in one piece
    assert sum(map(len, chunks)) % tarfile.RECORDSIZE == 0
    write_entries(tmp_path / "back", tar_entries(io.BytesIO(b"".join(chunks))))
    assert (tmp_path / "back" / "0" / "out").read_bytes() == big
    assert (tmp_path / "back" / "0" / long.replace("__", "/")).read_bytes() == b"deep"


def test_folders_archive_refuses_a_result_whose_file_changed_size(farm: Farm) -> None:
    farm.done(0, out=b"w" * (INLINE_LIMIT + 10))
    (farm.state / "results" / "globs" / "0" / "out").write_bytes(b"short")
    with pytest.raises(CollectError, match="5 bytes, but 65546 recorded"):
        b"".join(farm.collector().chunks("folders"))


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a//b", "a/./b", "a\\b"])
def test_writing_folders_refuses_paths_that_leave_the_folder(tmp_path: Path, path: str) -> None:
    with pytest.raises(CollectError, match="unsafe path"):
        write_entries(tmp_path / "f", [Entry(path, 1, iter([b"x"]))])
    assert not (tmp_path / "x").exists()


def test_a_folders_archive_that_is_not_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CollectError, match="not a folders archive"):
        write_entries(tmp_path / "f", tar_entries(io.BytesIO(b"<html>502 Bad Gateway</html>")))


def test_a_sweep_with_nothing_done_collects_empty_files_and_headers(farm: Farm) -> None:
    assert farm.bytes_of("concat") == farm.bytes_of("blockwise") == farm.bytes_of("jsonl") == b""
    assert farm.bytes_of("csv") == b"task,x,y,out,parts\r\n" and farm.bytes_of("failed") == b"task,x,y,reason\r\n"
    with tarfile.open(fileobj=io.BytesIO(farm.bytes_of("folders"))) as tf:
        assert tf.getnames() == []


def test_an_unknown_format_is_refused(farm: Farm) -> None:
    with pytest.raises(CollectError, match="format must be one of"):
        farm.collector().chunks("zip")


def test_parts_are_one_per_rule_then_the_failed_csv_when_a_task_failed() -> None:
    rules = [CollectRule("concat", "a.txt", "out"), CollectRule("blockwise", "b.txt", "out"),
             CollectRule("table", "t.csv"), CollectRule("table", "t.jsonl", format="jsonl"),
             CollectRule("folders", "f", "out")]
    expected = [Part("a.txt", "concat", "out"), Part("b.txt", "blockwise", "out"), Part("t.csv", "csv"),
                Part("t.jsonl", "jsonl"), Part("f", "folders", "out")]
    assert parts("s", rules, False) == expected
    assert parts("s", rules, True) == [*expected, Part("s-failed.csv", "failed")]
    assert {p.format for p in parts("s", rules, True)} == set(FORMATS)


def test_collect_writes_each_rule_and_the_failed_csv_as_the_streams_make_them(tmp_path: Path) -> None:
    farm = Farm.from_toml(tmp_path, GLOBS + """
[[collect]]
mode = "table"
path = "t/table.csv"
[[collect]]
mode = "table"
format = "jsonl"
path = "table.jsonl"
[[collect]]
mode = "concat"
path = "all.out"
[[collect]]
mode = "folders"
path = "per-task"
""")
    farm.done(0, out=b"zero\n", parts__out__a=b"x")
    out = tmp_path / "out"
    assert collect(farm.store, farm.state, farm.sweep, out) == [
        out / "blocks.txt", out / "t" / "table.csv", out / "table.jsonl", out / "all.out", out / "per-task"]
    for name, fmt, result in [("blocks.txt", "blockwise", "parts"), ("t/table.csv", "csv", None),
                              ("table.jsonl", "jsonl", None), ("all.out", "concat", None)]:
        assert (out / name).read_bytes() == farm.bytes_of(fmt, result)
    assert tree(out / "per-task") == {"0/params.json": b'{"x": 0, "y": "a"}', "0/out": b"zero\n",
                                      "0/parts/out/a": b"x"}
    farm.fail(2, "exit code 3")
    assert collect(farm.store, farm.state, farm.sweep, out)[-1] == out / "globs-failed.csv"
    assert (out / "globs-failed.csv").read_bytes() == b"task,x,y,reason\r\n2,2,c,exit code 3\r\n"
    farm.store.close()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- integration: a real sweep on a real master, collected by the CLI (from the store, through HTTP) and downloaded ---
MIX_ROWS = [json.dumps(row) for row in ({"x": 0, "y": "a"}, {"y": "b", "x": 1}, {"x": 2, "y": "c"},
                                       {"y": "d", "x": 3}, {"x": 4, "y": "e"}, {"y": "f", "x": 5})]
MIX = {
    "name": "mix", "timeout": 30, "max_attempts": 1,
    # x=3 fails; x=2 prints nothing; every task writes two files without a newline, a binary one, an empty one,
    # and one too large to travel inline or to sit in a table cell.
    "command": "test {x} -ne 3 || exit 3; mkdir -p out; printf x > out/a.bin; printf y{x} > out/b.bin; "
               "printf '\\211PNG\\000\\377' > out/c.bin; : > out/empty.bin; "
               "head -c 70000 /dev/zero | tr '\\000' z > big.dat; test {x} -eq 2 || echo {x} {y}",
    "parameters": {"jsonl": "p.jsonl"},
    "results": {"out": "stdout", "parts": "file:out/*.bin", "raw": "file:out/c.bin", "big": "file:big.dat"},
    "collect": [{"mode": "concat", "result": "out", "path": "all.out"},
                {"mode": "blockwise", "result": "parts", "path": "blocks.txt"},
                {"mode": "table", "path": "tables/table.csv"},
                {"mode": "table", "format": "jsonl", "path": "table.jsonl"},
                {"mode": "folders", "path": "per-task"}],
}
SWEEPS = ("mix", "py-chatty", "py-mixed")


@dataclass
class Collected:
    """What each way of collecting gave: `ticketfarm collect` from the store and through HTTP, and the downloads."""

    local: Path
    via_http: Path
    downloads: dict[tuple[str, str], tuple[Part, bytes]]


def run_cli(state: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ticketfarm", "--state", str(state), *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    from ticketfarm import Cluster

    root = tmp_path_factory.mktemp("collect")
    state, runs = root / "state", root / "runs"
    runs.mkdir()
    found = Collected(root / "local", root / "via-http", {})
    cluster = HttpCluster(state)
    try:
        assert cluster.submit(MIX, files={"p.jsonl": "\n".join(MIX_ROWS) + "\n"}).status == 201
        with Cluster(address=cluster.endpoint, keys=state / "keys") as c:
            assert list(c.map(tasks.chatty, range(3), name="py-chatty")) == [1, 2, 3]
            mixed = c.sweep(tasks.square_or_exit, range(3), [1] * 3, [str(runs)] * 3, name="py-mixed", max_attempts=1)
            assert mixed.wait(60)
        cluster.wait_state("mix", "finished", timeout=60)
        for name in SWEEPS:
            detail = cluster.sweep(name)
            for part in parts(name, [CollectRule(**r) for r in detail["spec"]["collect"]], detail["failed"] > 0):
                query = f"?format={part.format}" + (f"&result={part.result}" if part.result else "")
                reply = cluster.get(f"{API}/sweeps/{name}/collect{query}")
                assert reply.status == 200, reply.body
                found.downloads[(name, part.path)] = (part, reply.body)
            run_cli(state, "--token", TOKEN, "collect", name, "--out", str(found.via_http))
    finally:
        cluster.close()
    for name in SWEEPS:  # the master is gone: the CLI reads its store
        run_cli(state, "collect", name, "--out", str(found.local))
    return found


def untar(data: bytes, into: Path) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(into, filter="data")
    return tree(into)


def test_every_mode_of_the_cli_and_the_http_download_are_byte_for_byte_identical(
        collected: Collected, tmp_path: Path) -> None:
    formats = set()
    for (name, path), (part, body) in collected.downloads.items():
        formats.add(part.format)
        local, via_http = collected.local / path, collected.via_http / path
        if part.format == "folders":
            assert untar(body, tmp_path / name) == tree(local) == tree(via_http) and tree(local)
        else:
            assert body == local.read_bytes() == via_http.read_bytes(), (name, path)
    assert formats == set(FORMATS)
    written = {p.relative_to(collected.local).parts[0] for p in collected.local.rglob("*")
               if p.is_file() and p.name != LEDGER}
    assert written == {Path(path).parts[0] for _, path in collected.downloads}
    assert tree(collected.local) == tree(collected.via_http)


def test_http_csv_puts_cells_under_their_header_with_jsonl_keys_in_any_order(collected: Collected) -> None:
    _, body = collected.downloads[("mix", "tables/table.csv")]
    rows = csv_rows(body)
    assert rows[0] == ["task", "x", "y", "out", "parts", "raw", "big"]
    assert [r[:4] for r in rows[1:]] == [["0", "0", "a", "0 a"], ["1", "1", "b", "1 b"], ["2", "2", "c", ""],
                                         ["4", "4", "e", "4 e"], ["5", "5", "f", "5 f"]]
    assert {r[4] for r in rows[1:]} == {"out/a.bin out/b.bin out/c.bin out/empty.bin"}
    assert all(Path(r[6]).name == "big" and Path(r[6]).is_absolute() for r in rows[1:])


def test_http_blockwise_ends_each_glob_file_with_a_newline(collected: Collected) -> None:
    _, body = collected.downloads[("mix", "blocks.txt")]
    blocks = [b"# task=%d x=%d y=%s\nx\ny%d\n\x89PNG\x00\xff\n" % (i, i, y, i)
              for i, y in enumerate([b"a", b"b", b"c", b"d", b"e", b"f"])]
    assert body == b"".join(blocks[:3] + blocks[4:])


def test_cli_over_http_writes_the_failed_csv_with_parameters_under_their_header(collected: Collected) -> None:
    rows = csv_rows((collected.via_http / "mix-failed.csv").read_bytes())
    assert rows[0] == ["task", "x", "y", "reason"] and [r[:3] for r in rows[1:]] == [["3", "3", "d"]]
    assert "exit code 3" in rows[1][3]


def test_python_sweeps_pickles_and_failures_arrive_the_same_both_ways(collected: Collected) -> None:
    for out in (collected.local, collected.via_http):
        assert [pickle.loads((out / "py-mixed" / str(i) / "result").read_bytes()) for i in (0, 2)] == [0, 4]
        assert json.loads((out / "py-mixed" / "2" / "params.json").read_bytes())["repr"].startswith("(2, 1, '")
        assert (out / "py-chatty" / "1" / "stdout").read_bytes() == b"working on 1\n"
        rows = csv_rows((out / "py-mixed-failed.csv").read_bytes())
        assert rows[0] == ["task", "repr", "reason"] and rows[1][1].startswith("(1, 1, '")
        assert rows[1][0] == "1" and "exit code 3" in rows[1][2] and len(rows) == 2

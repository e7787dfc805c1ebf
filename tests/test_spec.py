"""Sweep specs: parameter tables, templates and quoting, and errors that name file, line or field."""
from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_spec
from ticketfarm.errors import ConfigError
from ticketfarm.spec import ParamLines, Sweep, load_spec, parse_spec
from ticketfarm.template import render_shell


def test_csv_with_pipe_delimiter_gives_one_task_per_row(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a|b\n1|x y\n2|z\n")
    spec = load_spec(write_spec(tmp_path, """
        name = "pipes"
        command = "echo {a} {b}"
        [parameters]
        csv = "p.csv"
        delimiter = "|"
    """))
    assert spec.params == [{"a": "1", "b": "x y"}, {"a": "2", "b": "z"}]


def test_a_spec_without_parameters_is_one_task(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, """
        name = "single"
        command = "echo {task}"
    """))
    assert spec.params == [{}] and spec.param_names == []


def test_csv_short_row_is_reported_as_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a|b\n1|2\n3\n4|5\n")
    path = write_spec(tmp_path, """
        name = "short"
        command = "echo {a}"
        [parameters]
        csv = "p.csv"
        delimiter = "|"
    """)
    with pytest.raises(ConfigError, match=r"p\.csv:3: expected 2 cells like the header, got 1"):
        load_spec(path)


def test_cli_refuses_bad_csv_and_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a,b\n1,2\n3,4,5\n")
    write_spec(tmp_path, """
        name = "bad"
        command = "touch ran-{a}"
        [parameters]
        csv = "p.csv"
    """)
    result = run_cli("--state", str(tmp_path / "st"), "run", "spec.toml", "--local", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "p.csv:3" in result.stderr
    assert not list(tmp_path.rglob("ran-*"))
    assert not (tmp_path / "st").exists()


def test_jsonl_parameters_and_line_errors(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"n": 1, "s": "a"}\n\n{"n": 2, "s": "b"}\n')
    spec = load_spec(write_spec(tmp_path, """
        name = "j"
        argv = ["echo", "{n}", "{s}"]
        [parameters]
        jsonl = "p.jsonl"
    """))
    assert spec.params == [{"n": 1, "s": "a"}, {"n": 2, "s": "b"}]
    (tmp_path / "p.jsonl").write_text('{"n": 1}\n{"n": \n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: not JSON"):
        load_spec(tmp_path / "spec.toml")


def test_grid_is_the_product_first_axis_outermost(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, """
        name = "g"
        command = "echo {x} {y}"
        [parameters.grid]
        x = ["a", "b"]
        y = {range = [0, 6, 2]}
    """))
    assert spec.params == [{"x": "a", "y": 0}, {"x": "a", "y": 2}, {"x": "a", "y": 4},
                           {"x": "b", "y": 0}, {"x": "b", "y": 2}, {"x": "b", "y": 4}]


@pytest.mark.parametrize("body, message", [
    ('name = "a"\ncommand = "x"\ncomand = 1\n[parameters.grid]\nx=[1]', "unknown field 'comand'"),
    ('name = "a"\n[parameters.grid]\nx=[1]', "exactly one of 'command'"),
    ('name = "a"\ncommand = "echo {nope}"\n[parameters.grid]\nx=[1]', "command: unknown placeholder {nope}"),
    ('name = "a"\ncommand = "x"\ntimeout = "soon"\n[parameters.grid]\nx=[1]', "field 'timeout' must be"),
    ('name = "a b"\ncommand = "x"\n[parameters.grid]\nx=[1]', "field 'name' must match"),
    ('name = "a"\ncommand = "x"\n[parameters.grid]\nx=[1]\n[results]\nr = "file:../up"', "results.r"),
    ('name = "a"\ncommand = "x"\n[parameters.grid]\nx=[1]\n[[inputs]]\nname = "/etc/x"\ntemplate = "t"', "inputs[0].name"),
    ('name = "a"\ncommand = "x"\n[parameters.grid]\nx=[1]\n[[collect]]\nmode = "zip"\npath = "o"', "collect[0].mode"),
    ('name = "a"\ncommand = "x"\n[parameters]\ncsv = "missing.csv"', "missing.csv"),
    ('name = "a"\ncommand = "x"\n[parameters.grid\n', "spec.toml"),
    ('name = "a"\ncommand = "x"\nslaves = "h1"', "field 'slaves' must be a list of slave names"),
    ('name = "a"\ncommand = "x"\nslaves = ["h1", ""]', "field 'slaves' must be a list"),
    ('name = "a"\ncommand = "x"\nslaves = ["h1", "h1"]', "field 'slaves' names a slave twice"),
])
def test_bad_spec_names_the_field(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "spec.toml").write_text(body)
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path / "spec.toml")
    assert message in str(err.value)
    assert "spec.toml" in str(err.value)


def test_a_pin_names_slaves_and_makes_the_sweep_restricted(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text('name = "a"\ncommand = "x"\nslaves = ["h1", "h2"]')
    spec = load_spec(tmp_path / "spec.toml")
    assert spec.slaves == ["h1", "h2"] and spec.restricted
    (tmp_path / "spec.toml").write_text('name = "a"\ncommand = "x"')
    assert load_spec(tmp_path / "spec.toml").slaves == []


def test_shell_template_keeps_hostile_values_literal(tmp_path: Path) -> None:
    hostile = "x; rm -rf ~ $(id) `id` 'q\" \\ \n"
    line = render_shell("printf '%s\\n' {v}", {"v": hostile})
    out = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, check=True).stdout
    assert out == hostile + "\n"


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    spec = load_spec(write_spec(tmp_path, """
        name = "rt"
        command = "cat data.bin"
        [parameters.grid]
        x = [1]
        [[inputs]]
        name = "data.bin"
        source = "data.bin"
    """))
    again = type(spec).from_json(spec.to_json())
    assert again == spec and again.digest() == spec.digest()
    assert json.loads(spec.to_json())["name"] == "rt"


def test_a_submits_rows_travel_as_json_lines_and_hash_to_the_digest_of_the_whole_spec() -> None:
    """The master hashes the rows as received: the digest is still the SHA-256 of `to_json()` (digests stored
    before rows travelled apart stay valid), and the spec a submit carries holds no rows."""
    sweep = Sweep(name="d", params=[{"x": i, "s": 'q"\n'} for i in range(5)], command="echo {x}")
    fields = sweep.submit_fields()
    rows = ParamLines.parse(fields["params"])
    assert rows.count == 5 and [json.loads(r) for r in rows.rows()] == sweep.params
    assert json.loads(fields["sweep"])["params"] == []
    assert sweep.digest() == hashlib.sha256(sweep.to_json().encode()).hexdigest()[:16]
    assert Sweep.from_json(fields["sweep"]).digest(rows) == sweep.digest()
    assert Sweep(name="d", params=[], command="echo {x}").digest(rows) == sweep.digest()
    assert replace(sweep, params=sweep.params[:4]).digest() != sweep.digest()


@pytest.mark.parametrize("text, error", [('{"x": 1}', "newline"), ('{"x": 1}\n[1]\n', "line 2: a row must be"),
                                         ('{"x": 1}\n{x\n', "line 2: not JSON")])
def test_rows_that_are_not_json_objects_one_a_line_are_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ParamLines.parse(text)


@pytest.mark.parametrize("command, fix", [
    ("echo '{val}'", "write {val} instead"),
    ('echo \\"{val}\\"', "write {val} instead"),
    ('echo \\"out {val}.txt\\" > log', 'write "out "{val}".txt" instead'),
])
def test_a_placeholder_inside_quotes_the_user_wrote_is_refused_with_the_fix(tmp_path: Path, command: str,
                                                                            fix: str) -> None:
    (tmp_path / "spec.toml").write_text(f'name = "q"\ncommand = "{command}"\n[parameters.grid]\nval = ["a"]\n')
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path / "spec.toml")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'spec.toml'}: command: placeholder {{val}} is inside the quotes of ")
    assert "shell-quoted already" in message and "runs as shell code" in message and fix in message
    assert err.value.field == "command"


def test_quotes_without_placeholders_pass_and_validate_commands_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "spec.toml").write_text('name = "q"\ncommand = "printf \'%s\\\\n\' {v} \\"$(cat {v})\\""\n'
                                        'validate = "test \'{v}\' = x"\n[parameters.grid]\nv = ["a"]\n')
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path / "spec.toml")
    assert err.value.field == "validate.command"


def test_cwd_is_resolved_where_the_spec_is_loaded_and_refused_from_afar(tmp_path: Path) -> None:
    base = {"name": "c", "command": "ls"}
    assert parse_spec({**base, "cwd": "spec"}, tmp_path, "s.toml", submitted_from=Path("/")).cwd == str(tmp_path)
    assert parse_spec({**base, "cwd": "submit"}, tmp_path, "s.toml", submitted_from=Path("/tmp")).cwd == "/tmp"
    assert parse_spec({**base, "cwd": "/data/shared"}, tmp_path, "s.toml").cwd == "/data/shared"
    assert parse_spec(base, tmp_path, "s.toml").cwd == ""
    with pytest.raises(ConfigError, match="'cwd': 'spec' names a directory of the submitting machine"):
        parse_spec({**base, "cwd": "spec"}, tmp_path, "s.toml")
    with pytest.raises(ConfigError, match="field 'cwd' must be one of 'ticket', 'spec', 'submit' or an absolute"):
        parse_spec({**base, "cwd": "here"}, tmp_path, "s.toml")

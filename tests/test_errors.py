"""Errors: one base class, bad specs and configs blamed on their field, and one version string."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pickle
import re
import tomllib
from pathlib import Path

import pytest

import ticketfarm
from master.config import load_master_config
from slave.config import load_slave_config
from tests.conftest import run_cli
from ticketfarm.errors import ApiRefused, ConfigError, TicketfarmError
from ticketfarm.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("ticketfarm", "master", "slave")
TEXT_SUFFIXES = {".py", ".toml", ".md", ".yml", ".j2", ".sh", ".json", ".html"}

TOP = 'name = "e"\ncommand = "echo {x}"\n'
GRID = "[parameters]\ngrid = {x = [1, 2]}\n"

# (id, spec.toml, other files, expected field, text the message must hold (default: the field),
#  file the message must name (default: spec.toml))
BAD_SPECS = [
    # top-level fields
    ("unknown", TOP + 'colour = "red"\n' + GRID, {}, "colour", "unknown field 'colour'", None),
    ("name-missing", 'command = "x"\n' + GRID, {}, "name", "field 'name' is required", None),
    ("name-pattern", 'name = "a b"\ncommand = "x"\n' + GRID, {}, "name", "field 'name' must match", None),
    ("timeout-type", TOP + 'timeout = "soon"\n' + GRID, {}, "timeout", "field 'timeout' must be int or float", None),
    ("timeout-zero", TOP + "timeout = 0\n" + GRID, {}, "timeout", "field 'timeout' must be > 0", None),
    ("max-attempts", TOP + "max_attempts = 0\n" + GRID, {}, "max_attempts", None, None),
    ("cpus", TOP + "cpus = -1\n" + GRID, {}, "cpus", None, None),
    ("memory", TOP + 'memory = "lots"\n' + GRID, {}, "memory", None, None),
    ("command-and-argv", TOP + 'argv = ["x"]\n' + GRID, {}, "command", "exactly one of 'command'", None),
    ("argv-empty", 'name = "e"\nargv = []\n' + GRID, {}, "argv", None, None),
    ("command-placeholder", 'name = "e"\ncommand = "echo {nope}"\n' + GRID, {}, "command",
     "command: unknown placeholder {nope}", None),
    ("argv-placeholder", 'name = "e"\nargv = ["echo", "{nope}"]\n' + GRID, {}, "argv[1]", None, None),
    ("toml-syntax", TOP + "[parameters\n", {}, "", "line 3", None),
    # parameters: the table, CSV, JSON lines, grid
    ("parameters-not-table", TOP + "parameters = 3\n", {}, "parameters", "[parameters] must be a table", None),
    ("parameters-two-kinds", TOP + GRID + 'csv = "p.csv"\n', {}, "parameters", None, None),
    ("parameters-unknown", TOP + GRID + 'sep = ","\n', {}, "parameters.sep", None, None),
    ("csv-missing", TOP + '[parameters]\ncsv = "nope.csv"\n', {}, "parameters.csv", "no such file", None),
    ("csv-short-row", TOP + '[parameters]\ncsv = "p.csv"\n', {"p.csv": "x,y\n1,2\n3\n"}, "parameters.csv",
     "p.csv:3: expected 2 cells", "p.csv"),
    ("csv-duplicate-header", TOP + '[parameters]\ncsv = "p.csv"\n', {"p.csv": "x,x\n1,2\n"}, "parameters.csv",
     "p.csv:1: duplicate", "p.csv"),
    ("csv-delimiter", TOP + '[parameters]\ncsv = "p.csv"\ndelimiter = "||"\n', {"p.csv": "x\n1\n"},
     "parameters.delimiter", None, "p.csv"),
    ("jsonl-not-json", TOP + '[parameters]\njsonl = "p.jsonl"\n', {"p.jsonl": '{"x": 1}\n{"x": \n'},
     "parameters.jsonl", "p.jsonl:2: not JSON", "p.jsonl"),
    ("jsonl-keys", TOP + '[parameters]\njsonl = "p.jsonl"\n', {"p.jsonl": '{"x": 1}\n{"y": 2}\n'},
     "parameters.jsonl", "p.jsonl:2: keys", "p.jsonl"),
    ("grid-empty-axis", TOP + "[parameters]\ngrid = {x = []}\n", {}, "parameters.grid.x", None, None),
    ("grid-range", TOP + "[parameters]\ngrid = {x = {range = [1, 2, 3, 4]}}\n", {}, "parameters.grid.x.range",
     None, None),
    ("grid-range-step", TOP + "[parameters]\ngrid = {x = {range = [0, 5, 0]}}\n", {}, "parameters.grid.x.range",
     None, None),
    ("reserved-name", 'name = "e"\ncommand = "echo {ticket}"\n[parameters]\ngrid = {ticket = [1]}\n', {},
     "parameters", "'ticket' is reserved", None),
    # inputs
    ("inputs-not-array", TOP + 'inputs = "x"\n' + GRID, {}, "inputs", None, None),
    ("input-absolute", TOP + GRID + '[[inputs]]\nname = "/etc/x"\ntemplate = "t"\n', {}, "inputs[0].name", None, None),
    ("input-unknown", TOP + GRID + '[[inputs]]\nname = "a"\ntemplate = "t"\n[[inputs]]\nname = "b"\ncolour = 1\n',
     {}, "inputs[1].colour", "inputs[1]: unknown field 'colour'", None),
    ("input-no-content", TOP + GRID + '[[inputs]]\nname = "a"\n', {}, "inputs[0]", "exactly one of 'source'", None),
    ("input-source-missing", TOP + GRID + '[[inputs]]\nname = "a"\nsource = "nope.bin"\n', {}, "inputs[0].source",
     "cannot read", None),
    ("input-source-type", TOP + GRID + '[[inputs]]\nname = "a"\nsource = 5\n', {}, "inputs[0].source", None, None),
    ("input-placeholder", TOP + GRID + '[[inputs]]\nname = "a"\ntemplate = "{nope}"\n', {}, "inputs[0].template",
     "unknown placeholder {nope}", None),
    # results
    ("results-empty", TOP + "results = {}\n" + GRID, {}, "results", "[results]", None),
    ("result-source", TOP + GRID + '[results]\nr = "stdin"\n', {}, "results.r", None, None),
    ("result-name", TOP + GRID + '[results]\n"a b" = "stdout"\n', {}, "results.a b", None, None),
    ("result-escapes", TOP + GRID + '[results]\nr = "file:../up"\n', {}, "results.r", "relative path", None),
    ("result-placeholder", TOP + GRID + '[results]\nr = "file:{nope}.txt"\n', {}, "results.r", None, None),
    # collect
    ("collect-mode", TOP + GRID + '[[collect]]\nmode = "zip"\npath = "o"\n', {}, "collect[0].mode", None, None),
    ("collect-path", TOP + GRID + '[[collect]]\nmode = "table"\n', {}, "collect[0].path", None, None),
    ("collect-result", TOP + GRID + '[[collect]]\nmode = "concat"\npath = "o"\nresult = "nope"\n', {},
     "collect[0].result", "no result named 'nope'", None),
    ("collect-format", TOP + GRID + '[[collect]]\nmode = "table"\npath = "o"\nformat = "xml"\n', {},
     "collect[0].format", None, None),
    ("collect-unknown", TOP + GRID + '[[collect]]\nmode = "table"\npath = "o"\n[[collect]]\nmode = "table"\n'
     'path = "p"\ncolour = 1\n', {}, "collect[1].colour", "collect[1]: unknown field 'colour'", None),
    ("collect-not-table", TOP + "collect = [1]\n" + GRID, {}, "collect[0]", None, None),
    # workers
    ("workers-type", TOP + "workers = 5\n" + GRID, {}, "workers", "[workers]", None),
    ("worker-tag", TOP + GRID + '[workers]\nwindows = "w"\n', {"w": "x"}, "workers.windows", None, None),
    ("worker-missing", TOP + GRID + '[workers]\nlinux-x86_64 = "nope"\n', {}, "workers.linux-x86_64",
     "cannot read", None),
    # validate
    ("validate-both", TOP + GRID + '[validate]\ncommand = "true"\npython = "m:f"\n', {}, "validate",
     "exactly one of 'command' or 'python'", None),
    ("validate-timeout", TOP + GRID + '[validate]\ncommand = "true"\ntimeout = 0\n', {}, "validate.timeout", None,
     None),
    ("validate-unknown", TOP + GRID + '[validate]\ncmd = "true"\n', {}, "validate.cmd", None, None),
    ("validate-target", TOP + GRID + '[validate]\npython = "nocolon"\n', {}, "validate.python", None, None),
    ("validate-syntax", TOP + GRID + '[validate]\npython = "check.py:ok"\n', {"check.py": "def ok(:\n"},
     "validate.python", "check.py:1", None),
    ("validate-placeholder", TOP + 'validate = "test {nope}"\n' + GRID, {}, "validate.command",
     "validate.command: unknown placeholder {nope}", None),
]


@pytest.mark.parametrize("toml, files, field, text, named", [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_error_carries_its_field_and_names_file_and_field(
        tmp_path: Path, toml: str, files: dict[str, str], field: str, text: str | None, named: str | None) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "spec.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_spec(tmp_path / "spec.toml")
    err = info.value
    assert type(err) is ConfigError
    assert err.field == field
    message = str(err)
    assert str(tmp_path / (named or "spec.toml")) in message
    assert (text or field) in message


@pytest.mark.parametrize("toml, field", [
    ('heartbeat_interval = "fast"\n', "heartbeat_interval"),
    ("colour = 1\n", "colour"),
    ('slave_on_no_work = "never"\n', "slave_on_no_work"),
    ("insecure = 1\n", "insecure"),
])
def test_bad_master_config_names_its_field(tmp_path: Path, toml: str, field: str) -> None:
    (tmp_path / "master.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_master_config(tmp_path)
    assert info.value.field == field
    assert str(tmp_path / "master.toml") in str(info.value) and repr(field) in str(info.value)


@pytest.mark.parametrize("toml, field", [
    ("slots = 2\n", "master"),
    ('master = "tcp://m:1"\ninsecure = true\nslots = 0\n', "slots"),
    ('master = "tcp://m:1"\ninsecure = true\nprefetch = -1\n', "prefetch"),
    ('master = "tcp://m:1"\ninsecure = true\non_no_work = "later"\n', "on_no_work"),
    ('master = "tcp://m:1"\ninsecure = true\nmemory_mb = -1\n', "memory_mb"),
    ('master = "tcp://m:1"\nmaster_key = "m.key"\n', "secret_key"),
    ('master = "tcp://m:1"\nslots = "many"\n', "slots"),
])
def test_bad_slave_config_names_its_field(tmp_path: Path, toml: str, field: str) -> None:
    (tmp_path / "slave.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_slave_config(tmp_path / "slave.toml")
    assert info.value.field == field
    assert str(tmp_path / "slave.toml") in str(info.value) and repr(field) in str(info.value)


def test_master_with_a_bad_secret_key_names_master_toml_and_the_field(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert run_cli("--state", str(state), "init", cwd=tmp_path).returncode == 0
    config = state / "master.toml"
    default = config.read_text()
    (tmp_path / "garbage.key_secret").write_text("not a key\n")
    for value, says in ((str(tmp_path / "nope.key_secret"), "no such file"), (str(tmp_path / "garbage.key_secret"), "")):
        config.write_text(re.sub(r'(?m)^secret_key = .*$', f"secret_key = {value!r}".replace("'", '"'), default))
        result = run_cli("--state", str(state), "master", cwd=tmp_path, timeout=30)
        assert result.returncode == 2, result.stderr
        assert f"{config}: field 'secret_key': " in result.stderr and says in result.stderr, result.stderr


def test_every_exception_class_in_the_sources_is_a_ticketfarm_error() -> None:
    """Those of ticketfarm/errors.py and any other module's (each must be caught as a TicketfarmError)."""
    # _HeadDone never leaves the HTTP app: it ends a HEAD answer once its headers went out, not a failure kind.
    internal = {"master.web.app._HeadDone"}
    found = []
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            names = [node.name for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ClassDef) and node.bases]
            if not names:
                continue
            module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for name in names:
                cls = getattr(module, name, None)
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    found.append(cls)
                    if f"{module.__name__}.{name}" not in internal:
                        assert issubclass(cls, TicketfarmError), f"{module.__name__}.{name}"
    assert len(found) > 10


def test_errors_keep_their_fields_through_pickling() -> None:
    err = pickle.loads(pickle.dumps(ConfigError("spec: inputs[2]: bad", field="inputs[2]")))
    assert (type(err), str(err), err.field) == (ConfigError, "spec: inputs[2]: bad", "inputs[2]")
    refused = pickle.loads(pickle.dumps(ApiRefused(400, "bad_request", "spec: field 'timeout' bad", "timeout")))
    assert (refused.status, refused.code, refused.field) == (400, "bad_request", "timeout")
    assert str(refused) == "spec: field 'timeout' bad (400 bad_request)"


def test_cluster_arguments_are_checked_before_anything_starts() -> None:
    with pytest.raises(ConfigError) as info:
        ticketfarm.Cluster()
    assert info.value.field == "address"
    with pytest.raises(ConfigError):
        ticketfarm.Cluster("tcp://127.0.0.1:1", local=1)


# -- the version string ---------------------------------------------------------------------------------
def test_installed_version_is_ticketfarm_version() -> None:
    assert importlib.metadata.version("ticketfarm") == ticketfarm.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ticketfarm.__version__"}


def test_no_source_but_ticketfarm_init_writes_the_version() -> None:
    literal = re.compile(r"""["']v?""" + re.escape(ticketfarm.__version__) + r"""["']""")
    files = [p for d in (*SOURCES, "scripts", "playbooks", "docs") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in TEXT_SUFFIXES]
    files += [ROOT / "pyproject.toml", ROOT / "README.md"]
    holders = [str(p.relative_to(ROOT)) for p in files if literal.search(p.read_text(errors="replace"))]
    # docs/openapi.json is generated from the app (`python -m master.web.openapi`), which reads the attribute
    assert sorted(holders) == ["docs/openapi.json", "ticketfarm/__init__.py"]
    # The two places that announce it read the attribute.
    assert "ticketfarm.__version__" in (ROOT / "slave" / "daemon.py").read_text()
    assert "ticketfarm.__version__" in (ROOT / "master" / "web" / "reads.py").read_text()

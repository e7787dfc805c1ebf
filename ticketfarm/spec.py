"""Sweep specifications: the TOML format, parameter tables (CSV, JSON lines, grid) and their validation."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from ticketfarm import template
from ticketfarm.config import load_toml
from ticketfarm.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESULT_SOURCES = ("stdout", "stderr", "exit_code")
COLLECT_MODES = ("concat", "blockwise", "table", "folders")
TABLE_FORMATS = ("csv", "jsonl")
#: Result names of a python sweep: its value, and what the function printed (when it printed anything).
PYTHON_RESULTS = {"result": "python", "error": "python", "stdout": "python", "stderr": "python"}
#: Most tasks one sweep may have (a grid is counted before it is expanded).
MAX_TASKS = 5_000_000
#: Largest parameter file (CSV or JSON lines) read, in bytes.
MAX_PARAMETER_FILE = 512 * 1024 * 1024
SPEC_KEYS = {"name", "command", "argv", "timeout", "max_attempts", "priority", "env",
             "parameters", "inputs", "results", "collect",
             "workers", "validate", "speculate", "max_concurrent", "cpus", "memory", "slaves", "cwd"}
#: Where `cwd` may point besides an absolute path: each ticket's fresh work dir (the default), the spec's directory,
#: or the directory the sweep was submitted from.
CWD_CHOICES = ("ticket", "spec", "submit")
#: Platform tags look like `linux-x86_64`: the slave's sys.platform and machine, lower case.
PLATFORM_RE = re.compile(r"^[a-z0-9_]+-[a-z0-9_.]+$")


@dataclass
class InputFile:
    """A file placed in the ticket's work dir before the worker starts ("stdin" feeds the worker)."""

    name: str
    content: bytes | None = None
    template: str | None = None


@dataclass
class ShippedWorker:
    """The worker executable for one platform, shipped by the master and cached by slaves by SHA-256."""

    name: str
    sha256: str
    content: bytes


@dataclass
class Validation:
    """How results are checked on the master: a shell command, or a Python callable (module or embedded file)."""

    command: str | None = None
    python: str | None = None
    """`module:function` importable on the master, or `file.py:function` (the file travels in `source`)."""
    source: str | None = None
    timeout: float = 60.0


@dataclass
class CollectRule:
    """How one output file is assembled from all tasks' results."""

    mode: str
    path: str
    result: str | None = None
    format: str = "csv"


@dataclass
class Sweep:
    """A whole job: worker spec, one parameter set per task, result and collection rules."""

    name: str
    params: list[dict[str, Any]]
    command: str | None = None
    argv: list[str] | None = None
    timeout: float = 3600.0
    max_attempts: int = 3
    priority: int = 0
    env: dict[str, str] = field(default_factory=dict)
    inputs: list[InputFile] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=lambda: {"stdout": "stdout"})
    collect: list[CollectRule] = field(default_factory=list)
    kind: str = "command"
    """"command" runs a program; "python" calls a cloudpickled function (params: fn hash + pickled args)."""
    workers: dict[str, ShippedWorker] = field(default_factory=dict)
    """Worker executable per platform tag (`{worker}` in the command is its cached path on the slave)."""
    validate: Validation | None = None
    speculate: float = 0.0
    """Duplicate a ticket running longer than this many times the sweep's median task time (0 = off)."""
    max_concurrent: int = 0
    """Tickets of this sweep out at once at most (0 = no limit)."""
    cpus: int = 0
    """CPUs one task needs: a slave takes it only while that many of its CPUs are free (0 = no claim)."""
    memory: int = 0
    """MiB one task may use: a slave takes it only with that much free, and kills a worker using more (0 = no limit)."""
    slaves: list[str] = field(default_factory=list)
    """The slaves (by name) its tickets may go to; empty = any slave (a pin: `slaves = ["h1", "h2"]`)."""
    cwd: str = ""
    """The workers' working directory, an absolute path ("" = each ticket's own fresh work dir, `{workdir}`)."""

    @property
    def restricted(self) -> bool:
        """Whether the scheduler must ask, per slave, if this sweep may run there."""
        return bool(self.workers or self.max_concurrent or self.cpus or self.memory or self.slaves)

    @property
    def param_names(self) -> list[str]:
        return list(self.params[0]) if self.params else []

    def to_json(self) -> str:
        return self._dumps(self.params)

    def submit_fields(self) -> dict[str, str]:
        """The fields of a CONTROL submit: the spec, and its parameter rows apart as JSON lines."""
        return {"sweep": self.spec_json(), "params": ParamLines.of(self.params).text}

    def spec_json(self) -> str:
        """The spec without its parameter rows (`"params": []`): what a submit carries beside `ParamLines` and the
        store keeps (the rows live once, in the task table)."""
        return self._dumps([])

    def _dumps(self, params: list[dict[str, Any]]) -> str:
        # Field by field rather than asdict(self): asdict deep-copies the params, a transient copy of every task
        # (hundreds of MB for a million) just to be serialised once.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["params"] = params
        data["collect"] = [asdict(c) for c in self.collect]
        data["validate"] = None if self.validate is None else asdict(self.validate)
        data["inputs"] = [{**asdict(i), "content": None if i.content is None else base64.b64encode(i.content).decode()}
                          for i in self.inputs]
        data["workers"] = {p: {**asdict(w), "content": base64.b64encode(w.content).decode()}
                           for p, w in self.workers.items()}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Sweep":
        data = json.loads(text)
        data["inputs"] = [
            InputFile(i["name"], None if i["content"] is None else base64.b64decode(i["content"]), i["template"])
            for i in data["inputs"]
        ]
        data["collect"] = [CollectRule(**c) for c in data["collect"]]
        data["workers"] = {p: ShippedWorker(w["name"], w["sha256"], base64.b64decode(w["content"]))
                           for p, w in data.get("workers", {}).items()}
        if data.get("validate") is not None:
            data["validate"] = Validation(**data["validate"])
        return cls(**data)

    def digest(self, rows: "ParamLines | None" = None) -> str:
        """Identifies the spec's content, so a resumed sweep is known to be the same sweep: the SHA-256 of
        `to_json()`, hashed piece by piece so that the master hashes a submit's `rows` without decoding them."""
        head, tail = self.spec_json().split('"params": []', 1)
        h = hashlib.sha256(head.encode())
        h.update(b'"params": [')
        for i, row in enumerate(rows.rows() if rows is not None else map(json.dumps, self.params)):
            h.update(row.encode() if i == 0 else b", " + row.encode())
        h.update(b"]" + tail.encode())
        return h.hexdigest()[:16]

    def differing_fields(self, other: "Sweep") -> list[str]:
        """The spec fields but `params` whose values differ from `other`'s, in field order."""
        mine, theirs = json.loads(self.spec_json()), json.loads(other.spec_json())
        return [name for name in mine if mine[name] != theirs.get(name)]


@dataclass
class ParamLines:
    """A sweep's parameter rows as JSON text, one object per line: how a submit carries them and the store keeps
    them, so the master never holds a dict per task (a million of them were most of its memory)."""

    text: str
    count: int

    @classmethod
    def of(cls, params: list[dict[str, Any]]) -> "ParamLines":
        return cls("".join(json.dumps(p) + "\n" for p in params), len(params))

    @classmethod
    def parse(cls, text: str) -> "ParamLines":
        """Rows received as text, each checked to be a JSON object (one at a time: none is kept)."""
        if text and not text.endswith("\n"):
            raise ValueError("params: the last row does not end with a newline")
        count = 0
        for count, row in enumerate(cls(text, 0).rows(), 1):
            try:
                value = json.loads(row)
            except json.JSONDecodeError as exc:
                raise ValueError(f"params line {count}: not JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError(f"params line {count}: a row must be a JSON object")
        return cls(text, count)

    def rows(self) -> Iterator[str]:
        """Each row's JSON text, in task order."""
        return (line[:-1] for line in io.StringIO(self.text))


def files_left_behind(sweep: Sweep, spec_dir: Path, limit: int = 1000) -> list[tuple[str, str]]:
    """(parameter, value) pairs of the first `limit` tasks naming a file beside the spec by a relative name, which
    a worker in its fresh work dir (cwd = "ticket") will not find there unless an input puts it there."""
    if sweep.cwd or sweep.kind != "command":
        return []
    shipped = {i.name for i in sweep.inputs}
    found: dict[tuple[str, str], None] = {}
    for row in sweep.params[:limit]:
        for key, value in row.items():
            if isinstance(value, str) and value not in shipped and _names_file(spec_dir, value):
                found[(key, value)] = None
    return list(found)


def _names_file(spec_dir: Path, value: str) -> bool:
    if not value or value.startswith("/") or "\n" in value or len(value) > 1024:
        return False
    try:
        return (spec_dir / value).exists()
    except OSError:  # a name too long for this filesystem names nothing
        return False


def load_spec(path: Path) -> Sweep:
    """Read and validate a sweep spec; every error names the file (and line or field).

    Relative names in it are the spec's directory's; `cwd = "submit"` is the current directory's.
    """
    path = Path(path)
    data = load_toml(path)
    return parse_spec(data, path.parent, str(path), submitted_from=Path.cwd())


def parse_spec(data: dict[str, Any], base: Path, source: str, submitted_from: Path | None = None) -> Sweep:
    """A sweep from a spec's table; `base` holds the files it names, `submitted_from` is the submitter's directory
    (None: submitted from afar, where `cwd = "spec"` or `"submit"` would name no directory the slaves know)."""
    unknown = set(data) - SPEC_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{source}: unknown field {key!r} (known: {', '.join(sorted(SPEC_KEYS))})", field=key)
    name = _get(data, "name", str, source)
    if not NAME_RE.match(name):
        raise ConfigError(f"{source}: field 'name' must match {NAME_RE.pattern}, got {name!r}", field="name")
    command, argv = data.get("command"), data.get("argv")
    if (command is None) == (argv is None):
        raise ConfigError(f"{source}: exactly one of 'command' (shell template) or 'argv' (list) is required",
                          field="command")
    if command is not None and not isinstance(command, str):
        raise ConfigError(f"{source}: field 'command' must be a string", field="command")
    if argv is not None and (not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)):
        raise ConfigError(f"{source}: field 'argv' must be a non-empty list of strings", field="argv")
    params = _load_parameters(data.get("parameters"), base, source)
    sweep = Sweep(
        name=name,
        params=params,
        command=command,
        argv=argv,
        timeout=float(_get(data, "timeout", (int, float), source, 3600.0)),
        max_attempts=_get(data, "max_attempts", int, source, 3),
        priority=_get(data, "priority", int, source, 0),
        env={str(k): str(v) for k, v in _get(data, "env", dict, source, {}).items()},
        inputs=_load_inputs(data.get("inputs", []), base, source),
        results=_load_results(data.get("results", {"stdout": "stdout"}), source),
    )
    sweep.collect = _load_collect(data.get("collect"), sweep, source)
    sweep.workers = _load_workers(data.get("workers"), base, source)
    sweep.validate = _load_validation(data.get("validate"), base, source)
    sweep.speculate = float(_get(data, "speculate", (int, float), source, 0.0))
    sweep.max_concurrent = _get(data, "max_concurrent", int, source, 0)
    sweep.cpus = _get(data, "cpus", int, source, 0)
    sweep.memory = _load_memory(data.get("memory", 0), source)
    sweep.slaves = _load_slaves(data.get("slaves", []), source)
    sweep.cwd = _load_cwd(data.get("cwd", "ticket"), base, submitted_from, source)
    for key in ("speculate", "max_concurrent", "cpus"):
        if getattr(sweep, key) < 0:
            raise ConfigError(f"{source}: field {key!r} must be >= 0", field=key)
    if sweep.timeout <= 0:
        raise ConfigError(f"{source}: field 'timeout' must be > 0", field="timeout")
    if sweep.max_attempts < 1:
        raise ConfigError(f"{source}: field 'max_attempts' must be >= 1", field="max_attempts")
    _check_templates(sweep, source)
    return sweep


def _get(data: dict[str, Any], key: str, kind: Any, source: str, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise ConfigError(f"{source}: field {key!r} is required", field=key)
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ConfigError(f"{source}: field {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}",
                          field=key)
    return value


def _load_parameters(spec: Any, base: Path, source: str) -> list[dict[str, Any]]:
    if spec is None:
        return [{}]  # no parameter table: a single job, one task without parameters
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: [parameters] must be a table (csv, jsonl or grid)", field="parameters")
    kinds = [k for k in ("csv", "jsonl", "grid") if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{source}: [parameters] needs exactly one of 'csv', 'jsonl', 'grid'", field="parameters")
    extra = set(spec) - {"csv", "jsonl", "grid", "delimiter"}
    if extra:
        raise ConfigError(f"{source}: unknown field 'parameters.{sorted(extra)[0]}'",
                          field=f"parameters.{sorted(extra)[0]}")
    for kind in ("csv", "jsonl"):
        if kind in spec and not (base / str(spec[kind])).is_file():
            raise ConfigError(f"{source}: parameters.{kind}: no such file {base / str(spec[kind])}",
                              field=f"parameters.{kind}")
        if kind in spec and (size := (base / str(spec[kind])).stat().st_size) > MAX_PARAMETER_FILE:
            raise ConfigError(f"{source}: parameters.{kind}: {base / str(spec[kind])} is {size} bytes, over the "
                              f"limit of {MAX_PARAMETER_FILE} (split the sweep)", field=f"parameters.{kind}")
    if "csv" in spec:
        rows = read_csv(base / spec["csv"], spec.get("delimiter", ","))
    elif "jsonl" in spec:
        rows = read_jsonl(base / spec["jsonl"])
    else:
        rows = expand_grid(spec["grid"], source)
    if not rows:
        raise ConfigError(f"{source}: [parameters] yields no tasks (give at least one row)", field="parameters")
    if len(rows) > MAX_TASKS:
        raise ConfigError(f"{source}: [parameters] has {len(rows)} tasks, over the limit of {MAX_TASKS} "
                          "(split the sweep)", field="parameters")
    return rows


def read_csv(path: Path, delimiter: str) -> list[dict[str, str]]:
    """Rows of a CSV file with a header line; a row with the wrong cell count is an error at file:line.

    Errors blame field "parameters.csv" (or "parameters.delimiter"): the spec key that names this file.
    """
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ConfigError(f"{path}: parameters.delimiter must be one character, got {delimiter!r}",
                          field="parameters.delimiter")
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}", field="parameters.csv") from None
    with fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header or any(not h.strip() for h in header):
            raise ConfigError(f"{path}:1: header line with parameter names is required", field="parameters.csv")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise ConfigError(f"{path}:1: duplicate parameter name in header", field="parameters.csv")
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise ConfigError(
                    f"{path}:{reader.line_num}: expected {len(header)} cells like the header, got {len(cells)}",
                    field="parameters.csv")
            rows.append(dict(zip(header, cells)))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; every object must have the first one's keys (errors blame "parameters.jsonl")."""
    rows: list[dict[str, Any]] = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}", field="parameters.jsonl") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: not JSON: {exc.msg}", field="parameters.jsonl") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: each line must be a JSON object", field="parameters.jsonl")
            if rows and set(row) != set(rows[0]):
                raise ConfigError(f"{path}:{lineno}: keys {sorted(row)} differ from the first line's {sorted(rows[0])}",
                                  field="parameters.jsonl")
            rows.append(row)
    return rows


def expand_grid(grid: Any, source: str) -> list[dict[str, Any]]:
    """The product of every axis, first axis outermost; an axis is a list or {range = [start, stop, step]}."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{source}: [parameters.grid] must map names to lists", field="parameters.grid")
    axes = {}
    for key, axis in grid.items():
        at = f"parameters.grid.{key}"
        if isinstance(axis, dict) and set(axis) == {"range"}:
            bounds = axis["range"]
            if not (isinstance(bounds, list) and 1 <= len(bounds) <= 3 and all(isinstance(b, int) for b in bounds)):
                raise ConfigError(f"{source}: {at}.range must be [stop], [start, stop] or [start, stop, step]",
                                  field=f"{at}.range")
            try:
                axes[key] = range(*bounds)
            except ValueError as exc:
                raise ConfigError(f"{source}: {at}.range: {exc}", field=f"{at}.range") from None
        elif isinstance(axis, list) and axis:
            axes[key] = axis
        else:
            raise ConfigError(f"{source}: {at} must be a non-empty list or {{range = [...]}}", field=at)
    total = math.prod(len(a) for a in axes.values())
    if total > MAX_TASKS:
        raise ConfigError(f"{source}: [parameters.grid] makes {total} tasks, over the limit of {MAX_TASKS} "
                          "(split the sweep)", field="parameters.grid")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _load_inputs(items: Any, base: Path, source: str) -> list[InputFile]:
    if not isinstance(items, list):
        raise ConfigError(f"{source}: 'inputs' must be an array of tables ([[inputs]])", field="inputs")
    inputs = []
    for n, item in enumerate(items):
        at = f"inputs[{n}]"
        where = f"{source}: {at}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: field 'name' (file name or \"stdin\") is required", field=f"{at}.name")
        extra = set(item) - {"name", "source", "template", "template_file"}
        if extra:
            raise ConfigError(f"{where}: unknown field {sorted(extra)[0]!r}", field=f"{at}.{sorted(extra)[0]}")
        _check_relative(item["name"], source, f"{at}.name")
        given = [k for k in ("source", "template", "template_file") if k in item]
        if len(given) != 1:
            raise ConfigError(f"{where}: exactly one of 'source', 'template', 'template_file' is required", field=at)
        if given[0] != "template" and not isinstance(item[given[0]], str):
            raise ConfigError(f"{where}.{given[0]} must be a file name (a string), got {item[given[0]]!r}",
                              field=f"{at}.{given[0]}")
        if "source" in item:
            inputs.append(InputFile(item["name"], content=_read_bytes(base / item["source"], source, f"{at}.source")))
        elif "template" in item:
            inputs.append(InputFile(item["name"], template=str(item["template"])))
        else:
            text = _read_bytes(base / item["template_file"], source, f"{at}.template_file").decode()
            inputs.append(InputFile(item["name"], template=text))
    return inputs


def _read_bytes(path: Path, source: str, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: {field}: cannot read {path}: {exc.strerror}", field=field) from None


def _check_relative(name: str, source: str, field: str) -> None:
    if name == "stdin":
        return
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not name.strip():
        raise ConfigError(f"{source}: {field}: must be a relative path inside the work dir, got {name!r}", field=field)


def _load_results(results: Any, source: str) -> dict[str, str]:
    if not isinstance(results, dict) or not results:
        raise ConfigError(f"{source}: [results] must map result names to stdout, stderr, exit_code or file:PATH",
                          field="results")
    for name, src in results.items():
        at = f"results.{name}"
        if not NAME_RE.match(name):
            raise ConfigError(f"{source}: {at}: result names must match {NAME_RE.pattern}", field=at)
        if not isinstance(src, str):
            raise ConfigError(f"{source}: {at} must be a string", field=at)
        if src.startswith("file:"):
            _check_relative(src[5:], source, at)
        elif src not in RESULT_SOURCES:
            raise ConfigError(f"{source}: {at} must be stdout, stderr, exit_code or file:PATH, got {src!r}", field=at)
    return dict(results)


def _load_collect(rules: Any, sweep: Sweep, source: str) -> list[CollectRule]:
    if rules is None:
        return [CollectRule(mode="table", path=f"{sweep.name}-results.csv", format="csv")]
    if isinstance(rules, dict):
        rules = [rules]
    if not isinstance(rules, list):
        raise ConfigError(f"{source}: 'collect' must be a table or an array of tables", field="collect")
    out = []
    for n, rule in enumerate(rules):
        at = f"collect[{n}]"
        where = f"{source}: {at}"
        if not isinstance(rule, dict):
            raise ConfigError(f"{where} must be a table with 'mode' and 'path'", field=at)
        extra = set(rule) - {"mode", "path", "result", "format"}
        if extra:
            raise ConfigError(f"{where}: unknown field {sorted(extra)[0]!r}", field=f"{at}.{sorted(extra)[0]}")
        mode, path = rule.get("mode"), rule.get("path")
        if mode not in COLLECT_MODES:
            raise ConfigError(f"{where}.mode must be one of {', '.join(COLLECT_MODES)}, got {mode!r}",
                              field=f"{at}.mode")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.path is required", field=f"{at}.path")
        result = rule.get("result")
        if mode in ("concat", "blockwise"):
            result = result or next(iter(sweep.results))
        if result is not None and (not isinstance(result, str) or result not in sweep.results):
            raise ConfigError(f"{where}.result: no result named {result!r} (known: {', '.join(sweep.results)})",
                              field=f"{at}.result")
        fmt = rule.get("format", "csv")
        if fmt not in TABLE_FORMATS:
            raise ConfigError(f"{where}.format must be csv or jsonl, got {fmt!r}", field=f"{at}.format")
        out.append(CollectRule(mode=mode, path=path, result=result, format=fmt))
    return out


def _load_workers(spec: Any, base: Path, source: str) -> dict[str, ShippedWorker]:
    """[workers]: platform tag = path of the executable for that platform (read and hashed now)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{source}: [workers] must map platform tags (e.g. linux-x86_64) to executable paths",
                          field="workers")
    out = {}
    for tag, rel in spec.items():
        at = f"workers.{tag}"
        if not PLATFORM_RE.match(tag):
            raise ConfigError(f"{source}: {at}: a platform tag looks like linux-x86_64", field=at)
        if not isinstance(rel, str) or not rel:
            raise ConfigError(f"{source}: {at} must be the path of an executable", field=at)
        content = _read_bytes(base / rel, source, at)
        name = Path(rel).name
        if not NAME_RE.match(name):
            raise ConfigError(f"{source}: {at}: file name {name!r} must match {NAME_RE.pattern}", field=at)
        out[tag] = ShippedWorker(name, hashlib.sha256(content).hexdigest(), content)
    return out


def _load_validation(spec: Any, base: Path, source: str) -> Validation | None:
    """validate = "shell command" or {command = ..., timeout = ...} or {python = "file.py:fn" | "module:fn"}."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"command": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: 'validate' must be a command string or a table", field="validate")
    extra = set(spec) - {"command", "python", "timeout"}
    if extra:
        key = f"validate.{sorted(extra)[0]}"
        raise ConfigError(f"{source}: unknown field {key!r}", field=key)
    if ("command" in spec) == ("python" in spec):
        raise ConfigError(f"{source}: validate needs exactly one of 'command' or 'python'", field="validate")
    timeout = spec.get("timeout", 60.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"{source}: validate.timeout must be a number > 0", field="validate.timeout")
    if "command" in spec:
        if not isinstance(spec["command"], str) or not spec["command"].strip():
            raise ConfigError(f"{source}: validate.command must be a non-empty string", field="validate.command")
        return Validation(command=spec["command"], timeout=float(timeout))
    target = spec["python"]
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ConfigError(f"{source}: validate.python must be \"module:function\" or \"file.py:function\"",
                          field="validate.python")
    module, _ = target.split(":")
    text = None
    if module.endswith(".py"):
        text = _read_bytes(base / module, source, "validate.python").decode()
        try:
            compile(text, module, "exec")
        except SyntaxError as exc:
            raise ConfigError(f"{source}: validate.python: {module}:{exc.lineno}: {exc.msg}",
                              field="validate.python") from None
    return Validation(python=target, source=text, timeout=float(timeout))


def _load_slaves(value: Any, source: str) -> list[str]:
    """A pin: slave names (as given by `--name`), each once."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{source}: field 'slaves' must be a list of slave names (e.g. [\"h1\", \"h2\"]), "
                          f"got {value!r}", field="slaves")
    if len(set(value)) != len(value):
        raise ConfigError(f"{source}: field 'slaves' names a slave twice: {value!r}", field="slaves")
    return list(value)


def _load_cwd(value: Any, base: Path, submitted_from: Path | None, source: str) -> str:
    """cwd = "ticket" | "spec" | "submit" | an absolute path: resolved now, on the submitter's machine (an absolute
    path is not checked here: it may exist only on the slaves' shared filesystem)."""
    if not isinstance(value, str) or not (value in CWD_CHOICES or value.startswith("/")):
        raise ConfigError(f"{source}: field 'cwd' must be one of {', '.join(map(repr, CWD_CHOICES))} or an absolute "
                          f"path, got {value!r}", field="cwd")
    if value == "ticket":
        return ""
    if value in ("spec", "submit") and submitted_from is None:
        raise ConfigError(f"{source}: field 'cwd': {value!r} names a directory of the submitting machine, which "
                          "a remote submission does not have: give an absolute path the slaves share", field="cwd")
    where = {"spec": base, "submit": submitted_from}.get(value) or Path(value)
    return str(where.resolve())


def _load_memory(value: Any, source: str) -> int:
    """memory = MiB as an integer, or a string with a unit: "512M", "2G"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([MmGg])i?[Bb]?\s*", value)
        if m:
            return int(m.group(1)) * (1024 if m.group(2) in "Gg" else 1)
    raise ConfigError(f"{source}: field 'memory' must be MiB (an integer >= 0) or a size like \"512M\" or \"2G\"",
                      field="memory")


def _check_templates(sweep: Sweep, source: str) -> None:
    known = sweep.param_names + (["worker"] if sweep.workers else [])
    for row_no, row in enumerate(sweep.params[:1]):
        clash = set(row) & (set(template.BUILTINS) | ({"worker"} if sweep.workers else set()))
        if clash:
            raise ConfigError(f"{source}: parameter name {sorted(clash)[0]!r} is reserved (rename that parameter)",
                              field="parameters")
    if sweep.command is not None:
        template.check(sweep.command, known, source, "command")
        template.check_shell(sweep.command, source, "command")
    for n, arg in enumerate(sweep.argv or []):
        template.check(arg, known, source, f"argv[{n}]")
    for n, inp in enumerate(sweep.inputs):
        if inp.template is not None:
            template.check(inp.template, known, source, f"inputs[{n}].template")
    for name, src in sweep.results.items():
        template.check(src, known, source, f"results.{name}")
    if sweep.validate is not None and sweep.validate.command is not None:
        template.check(sweep.validate.command, [*known, "results"], source, "validate.command")
        template.check_shell(sweep.validate.command, source, "validate.command")

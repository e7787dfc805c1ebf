"""Sweep specifications: the TOML format, parameter tables (CSV, JSON lines, grid) and their validation."""
from __future__ import annotations

import base64
import csv
import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from master import template
from master.config import ConfigError, load_toml

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESULT_SOURCES = ("stdout", "stderr", "exit_code")
COLLECT_MODES = ("concat", "blockwise", "table", "folders")
TABLE_FORMATS = ("csv", "jsonl")
SPEC_KEYS = {"name", "command", "argv", "timeout", "max_attempts", "priority", "env",
             "parameters", "inputs", "results", "collect"}


@dataclass
class InputFile:
    """A file placed in the ticket's work dir before the worker starts ("stdin" feeds the worker)."""

    name: str
    content: bytes | None = None
    template: str | None = None


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

    @property
    def param_names(self) -> list[str]:
        return list(self.params[0]) if self.params else []

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = [
            {**i, "content": None if i["content"] is None else base64.b64encode(i["content"]).decode()}
            for i in data["inputs"]
        ]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Sweep":
        data = json.loads(text)
        data["inputs"] = [
            InputFile(i["name"], None if i["content"] is None else base64.b64decode(i["content"]), i["template"])
            for i in data["inputs"]
        ]
        data["collect"] = [CollectRule(**c) for c in data["collect"]]
        return cls(**data)

    def digest(self) -> str:
        """Identifies the spec's content, so a resumed sweep is known to be the same sweep."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def load_spec(path: Path) -> Sweep:
    """Read and validate a sweep spec; every error names the file (and line or field)."""
    path = Path(path)
    data = load_toml(path)
    return parse_spec(data, path.parent, str(path))


def parse_spec(data: dict[str, Any], base: Path, source: str) -> Sweep:
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(SPEC_KEYS))})")
    name = _get(data, "name", str, source)
    if not NAME_RE.match(name):
        raise ConfigError(f"{source}: field 'name' must match {NAME_RE.pattern}, got {name!r}")
    command, argv = data.get("command"), data.get("argv")
    if (command is None) == (argv is None):
        raise ConfigError(f"{source}: exactly one of 'command' (shell template) or 'argv' (list) is required")
    if command is not None and not isinstance(command, str):
        raise ConfigError(f"{source}: field 'command' must be a string")
    if argv is not None and (not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv)):
        raise ConfigError(f"{source}: field 'argv' must be a non-empty list of strings")
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
    if sweep.timeout <= 0:
        raise ConfigError(f"{source}: field 'timeout' must be > 0")
    if sweep.max_attempts < 1:
        raise ConfigError(f"{source}: field 'max_attempts' must be >= 1")
    _check_templates(sweep, source)
    return sweep


def _get(data: dict[str, Any], key: str, kind: Any, source: str, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise ConfigError(f"{source}: field {key!r} is required")
        return default
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ConfigError(f"{source}: field {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _load_parameters(spec: Any, base: Path, source: str) -> list[dict[str, Any]]:
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: table [parameters] is required (csv, jsonl or grid)")
    kinds = [k for k in ("csv", "jsonl", "grid") if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{source}: [parameters] needs exactly one of 'csv', 'jsonl', 'grid'")
    extra = set(spec) - {"csv", "jsonl", "grid", "delimiter"}
    if extra:
        raise ConfigError(f"{source}: unknown field 'parameters.{sorted(extra)[0]}'")
    for kind in ("csv", "jsonl"):
        if kind in spec and not (base / str(spec[kind])).is_file():
            raise ConfigError(f"{source}: parameters.{kind}: no such file {base / str(spec[kind])}")
    if "csv" in spec:
        rows = read_csv(base / spec["csv"], spec.get("delimiter", ","))
    elif "jsonl" in spec:
        rows = read_jsonl(base / spec["jsonl"])
    else:
        rows = expand_grid(spec["grid"], source)
    if not rows:
        raise ConfigError(f"{source}: [parameters] yields no tasks")
    return rows


def read_csv(path: Path, delimiter: str) -> list[dict[str, str]]:
    """Rows of a CSV file with a header line; a row with the wrong cell count is an error at file:line."""
    if len(delimiter) != 1:
        raise ConfigError(f"{path}: delimiter must be one character, got {delimiter!r}")
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    with fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header or any(not h.strip() for h in header):
            raise ConfigError(f"{path}:1: header line with parameter names is required")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise ConfigError(f"{path}:1: duplicate parameter name in header")
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise ConfigError(
                    f"{path}:{reader.line_num}: expected {len(header)} cells like the header, got {len(cells)}"
                )
            rows.append(dict(zip(header, cells)))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; every object must have the first one's keys."""
    rows: list[dict[str, Any]] = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: each line must be a JSON object")
            if rows and set(row) != set(rows[0]):
                raise ConfigError(f"{path}:{lineno}: keys {sorted(row)} differ from the first line's {sorted(rows[0])}")
            rows.append(row)
    return rows


def expand_grid(grid: Any, source: str) -> list[dict[str, Any]]:
    """The product of every axis, first axis outermost; an axis is a list or {range = [start, stop, step]}."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{source}: [parameters.grid] must map names to lists")
    axes = {}
    for key, axis in grid.items():
        if isinstance(axis, dict) and set(axis) == {"range"}:
            bounds = axis["range"]
            if not (isinstance(bounds, list) and 1 <= len(bounds) <= 3 and all(isinstance(b, int) for b in bounds)):
                raise ConfigError(f"{source}: parameters.grid.{key}.range must be [stop], [start, stop] or [start, stop, step]")
            axes[key] = list(range(*bounds))
        elif isinstance(axis, list) and axis:
            axes[key] = axis
        else:
            raise ConfigError(f"{source}: parameters.grid.{key} must be a non-empty list or {{range = [...]}}")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _load_inputs(items: Any, base: Path, source: str) -> list[InputFile]:
    if not isinstance(items, list):
        raise ConfigError(f"{source}: 'inputs' must be an array of tables ([[inputs]])")
    inputs = []
    for n, item in enumerate(items):
        where = f"{source}: inputs[{n}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: field 'name' (file name or \"stdin\") is required")
        extra = set(item) - {"name", "source", "template", "template_file"}
        if extra:
            raise ConfigError(f"{where}: unknown field {sorted(extra)[0]!r}")
        _check_relative(item["name"], f"{where}.name")
        given = [k for k in ("source", "template", "template_file") if k in item]
        if len(given) != 1:
            raise ConfigError(f"{where}: exactly one of 'source', 'template', 'template_file' is required")
        if "source" in item:
            inputs.append(InputFile(item["name"], content=_read_bytes(base / item["source"], f"{where}.source")))
        elif "template" in item:
            inputs.append(InputFile(item["name"], template=str(item["template"])))
        else:
            text = _read_bytes(base / item["template_file"], f"{where}.template_file").decode()
            inputs.append(InputFile(item["name"], template=text))
    return inputs


def _read_bytes(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None


def _check_relative(name: str, where: str) -> None:
    if name == "stdin":
        return
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not name.strip():
        raise ConfigError(f"{where}: must be a relative path inside the work dir, got {name!r}")


def _load_results(results: Any, source: str) -> dict[str, str]:
    if not isinstance(results, dict) or not results:
        raise ConfigError(f"{source}: [results] must map result names to stdout, stderr, exit_code or file:PATH")
    for name, src in results.items():
        if not NAME_RE.match(name):
            raise ConfigError(f"{source}: results.{name}: result names must match {NAME_RE.pattern}")
        if not isinstance(src, str):
            raise ConfigError(f"{source}: results.{name} must be a string")
        if src.startswith("file:"):
            _check_relative(src[5:], f"{source}: results.{name}")
        elif src not in RESULT_SOURCES:
            raise ConfigError(f"{source}: results.{name} must be stdout, stderr, exit_code or file:PATH, got {src!r}")
    return dict(results)


def _load_collect(rules: Any, sweep: Sweep, source: str) -> list[CollectRule]:
    if rules is None:
        return [CollectRule(mode="table", path=f"{sweep.name}-results.csv", format="csv")]
    if isinstance(rules, dict):
        rules = [rules]
    if not isinstance(rules, list):
        raise ConfigError(f"{source}: 'collect' must be a table or an array of tables")
    out = []
    for n, rule in enumerate(rules):
        where = f"{source}: collect[{n}]"
        extra = set(rule) - {"mode", "path", "result", "format"}
        if extra:
            raise ConfigError(f"{where}: unknown field {sorted(extra)[0]!r}")
        mode, path = rule.get("mode"), rule.get("path")
        if mode not in COLLECT_MODES:
            raise ConfigError(f"{where}.mode must be one of {', '.join(COLLECT_MODES)}, got {mode!r}")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.path is required")
        result = rule.get("result")
        if mode in ("concat", "blockwise"):
            result = result or next(iter(sweep.results))
        if result is not None and result not in sweep.results:
            raise ConfigError(f"{where}.result: no result named {result!r} (known: {', '.join(sweep.results)})")
        fmt = rule.get("format", "csv")
        if fmt not in TABLE_FORMATS:
            raise ConfigError(f"{where}.format must be csv or jsonl, got {fmt!r}")
        out.append(CollectRule(mode=mode, path=path, result=result, format=fmt))
    return out


def _check_templates(sweep: Sweep, source: str) -> None:
    known = sweep.param_names
    for row_no, row in enumerate(sweep.params[:1]):
        clash = set(row) & set(template.BUILTINS)
        if clash:
            raise ConfigError(f"{source}: parameter name {sorted(clash)[0]!r} is reserved")
    try:
        if sweep.command is not None:
            template.check(sweep.command, known, f"{source}: command")
        for n, arg in enumerate(sweep.argv or []):
            template.check(arg, known, f"{source}: argv[{n}]")
        for n, inp in enumerate(sweep.inputs):
            if inp.template is not None:
                template.check(inp.template, known, f"{source}: inputs[{n}].template")
        for name, src in sweep.results.items():
            template.check(src, known, f"{source}: results.{name}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

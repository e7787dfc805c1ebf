"""What a POST /sweeps describes: a TOML text or a spec object with the files it names, checked for what it runs.

Nothing of the master's own is read (every file comes with the request), and a sweep that would run code on
the master host (a validator) or ship executables (`workers`) is refused unless master.toml allows it with
http_allow_master_code, and then only to a token with the admin scope.
"""
from __future__ import annotations

import base64
import binascii
import json
import tempfile
import tomllib
import uuid
from pathlib import Path
from typing import Any

from master.web.errors import ApiError
from ticketfarm.errors import ConfigError
from ticketfarm.spec import Sweep, parse_spec

#: Fields of a submission besides the spec itself.
FIELDS = ("spec", "toml", "files", "status_callback_url", "status_callback_secret")
#: Spec fields whose code runs on the master host or is shipped by it: (field, what it does).
MASTER_CODE = (("validate", "runs a validator on the master host"),
               ("workers", "ships executables from the master to every slave"))
TOML_TYPES = ("application/toml", "text/toml", "text/plain")


def body_fields(content_type: str, raw: bytes) -> dict[str, Any]:
    """The submission's fields from its body: a JSON object, or a TOML spec text."""
    ctype = (content_type or "application/json").split(";")[0].strip().lower()
    if ctype in TOML_TYPES:
        try:
            return {"toml": raw.decode()}
        except UnicodeDecodeError:
            raise ApiError("bad_request", "TOML body is not UTF-8") from None
    if ctype != "application/json":
        raise ApiError("unsupported_media_type", f"send application/json or application/toml, not {ctype}")
    return json_object(raw)


def json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError("bad_request", f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError("bad_request", "request body must be a JSON object")
    return data


def parse_submission(data: dict[str, Any], allow_master_code: bool, admin: bool) -> tuple[Sweep, dict[str, str]]:
    """The sweep and its callback settings; every refusal names the field."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ApiError("bad_request", f"unknown field {unknown[0]!r}", field=unknown[0])
    spec = _spec_of(data)
    if "name" not in spec:  # the client need not invent a unique name: the job gets an id
        spec = {**spec, "name": f"job-{uuid.uuid4().hex[:16]}"}
    refuse_master_code(spec, allow_master_code, admin)  # before parsing: a refused validator is never read
    files = data.get("files", {})
    if not isinstance(files, dict):
        raise ApiError("bad_request", "field 'files' must map file names to contents", field="files")
    for key in ("status_callback_url", "status_callback_secret"):
        if key in data and not isinstance(data[key], str):
            raise ApiError("bad_request", f"field {key!r} must be a string", field=key)
    extra = {k: data[k] for k in ("status_callback_url", "status_callback_secret") if data.get(k)}
    with tempfile.TemporaryDirectory(prefix="ticketfarm-submit-") as tmp:
        base = Path(tmp)
        for name, content in files.items():
            _write_submitted_file(base, name, content)
        _check_file_references(spec, files)
        try:
            sweep = parse_spec(spec, base, "spec")
        except ConfigError as exc:
            message = str(exc).replace(f"{base}/", "")  # the client's file names, not the temporary dir
            raise ApiError("bad_request", message, **({"field": exc.field} if exc.field else {})) from None
    refuse_master_code(sweep, allow_master_code, admin)
    return sweep, extra


def refuse_master_code(spec: dict[str, Any] | Sweep, allowed: bool, admin: bool) -> None:
    """400 naming the field when a sweep would run code on the master (or ship it) and that is not allowed."""
    for name, what in MASTER_CODE:
        present = getattr(spec, name) if isinstance(spec, Sweep) else spec.get(name)
        if not present:
            continue
        if not allowed:
            raise ApiError("bad_request", f"field {name!r} {what}: sweeps submitted over HTTP may not carry it "
                                          "(http_allow_master_code = false in master.toml)", field=name)
        if not admin:
            raise ApiError("forbidden", f"field {name!r} {what}: only a token with the admin scope may submit it",
                           field=name)


def _spec_of(data: dict[str, Any]) -> dict[str, Any]:
    if ("spec" in data) == ("toml" in data):
        raise ApiError("bad_request", "exactly one of 'spec' (an object) or 'toml' (a string) is required",
                       field="spec")
    if "toml" in data:
        if not isinstance(data["toml"], str):
            raise ApiError("bad_request", "field 'toml' must be a string", field="toml")
        try:
            return tomllib.loads(data["toml"])
        except tomllib.TOMLDecodeError as exc:
            raise ApiError("bad_request", f"toml: {exc}", field="toml") from None
    if not isinstance(data["spec"], dict):
        raise ApiError("bad_request", "field 'spec' must be an object", field="spec")
    return data["spec"]


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and "\\" not in name and "\x00" not in name


def _write_submitted_file(base: Path, name: Any, content: Any) -> None:
    if not isinstance(name, str) or not _safe_name(name):
        raise ApiError("bad_request", f"files: unsafe file name {name!r}", field="files")
    if isinstance(content, str):
        data = content.encode()
    elif isinstance(content, dict) and isinstance(content.get("base64"), str):
        try:
            data = base64.b64decode(content["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("bad_request", f"files.{name}: not base64", field="files") from None
    else:
        raise ApiError("bad_request", f"files.{name} must be a string or {{\"base64\": ...}}", field="files")
    path = base / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _check_file_references(spec: dict[str, Any], files: dict[str, Any]) -> None:
    """Every file a spec names must come with the request: the master's own files are never read."""
    refs = []
    params = spec.get("parameters")
    if isinstance(params, dict):
        refs += [("parameters." + k, params[k]) for k in ("csv", "jsonl") if k in params]
    for n, item in enumerate(spec.get("inputs") or []):
        if isinstance(item, dict):
            refs += [(f"inputs[{n}].{k}", item[k]) for k in ("source", "template_file") if k in item]
    for where, name in refs:
        if isinstance(name, str) and name not in files:  # a name of the wrong type is parse_spec's to report
            raise ApiError("bad_request", f"{where}: file {name!r} must be sent in 'files'", field=where)

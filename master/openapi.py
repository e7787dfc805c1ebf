"""The OpenAPI 3 description of the HTTP API (served at /openapi.json; `python -m master.openapi` writes docs/)."""
from __future__ import annotations

import json
import sys
from typing import Any

API = "/api/v1"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad input (the message names the field)", 401: "Missing or invalid API token",
            404: "Unknown sweep, task, ticket or slave", 409: "Wrong state for this operation",
            413: "Request body too large", 415: "Unsupported media type",
            503: "The master's loop did not answer"}
    out = {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}
    out["500"] = {"$ref": "#/components/responses/E500"}
    return {k: v for k, v in out.items() if int(k) in text or k == "500"}


def _path_param(name: str, kind: str = "string", description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": kind}, "description": description}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


SWEEP = _path_param("sweep", description="Sweep name")
TASK = _path_param("task", "integer", "Task index (0-based, in parameter order)")
READ = [{}, {"bearer": []}, {"xkey": []}]
WRITE = [{"bearer": []}, {"xkey": []}]
FORMAT = {"type": "string", "enum": ["concat", "blockwise", "csv", "jsonl", "folders", "failed"], "default": "csv"}


def _op(summary: str, responses: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
        write: bool = False, body: dict[str, Any] | None = None, tag: str = "sweeps",
        open_: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    op["security"] = [] if open_ else (WRITE if write else READ)
    return op


def _paths() -> dict[str, Any]:
    ok = _json(_ref("Ok"))
    return {
        "/": {"get": _op("The dashboard: one HTML page, no external resources", {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            tag="ui", open_=True)},
        "/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"})}, tag="ui", open_=True)},
        "/metrics": {"get": _op("Prometheus metrics (text exposition format)", {
            "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401)}, tag="master")},
        f"{API}/info": {"get": _op("Master name, version, protocol, epoch, uptime", {
            "200": _json(_ref("Info")), **_errors(401)}, tag="master")},
        f"{API}/status": {"get": _op("Every sweep's progress and the slave summary (what pollers should call)", {
            "200": _json(_ref("Status")), **_errors(401)}, tag="master")},
        f"{API}/stats": {"get": _op("Statistics: sweeps, slaves, failed parameter sets, and the text report", {
            "200": _json(_ref("Stats")), **_errors(401)}, tag="master")},
        f"{API}/events": {"get": _op(
            "Server-sent events of sweep, task and ticket state changes", {
                "200": {"description": "text/event-stream; each event has id, event (its kind) and data (JSON Event)",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                **_errors(400, 401, 404)},
            params=[_query("after", {"type": "integer", "minimum": 0},
                           "Start after this event id (default: Last-Event-ID, else 0 with `sweep`, else now)"),
                    _query("sweep", {"type": "string"}, "Only this sweep's events"),
                    _query("until_end", {"type": "boolean"}, "Close the stream after the sweep finished or was cancelled")],
            tag="master")},
        f"{API}/sweeps": {
            "get": _op("All sweeps with counts, throughput and ETA", {
                "200": _json({"type": "object", "properties": {"sweeps": {"type": "array", "items": _ref("Sweep")}}}),
                **_errors(401)}),
            "post": _op("Submit a sweep (the CLI's TOML spec, as text or object, with the files it names)", {
                "201": _json(_ref("Submitted"), "Submitted"),
                "200": _json(_ref("Submitted"), "A sweep with this name and spec exists already"),
                **_errors(400, 401, 409, 413, 415, 503)}, write=True, body={
                "required": True, "content": {
                    "application/json": {"schema": _ref("Submission")},
                    "application/toml": {"schema": {"type": "string"}}}})},
        f"{API}/sweeps/{{sweep}}": {"get": _op("One sweep: counts, throughput, ETA, spec summary", {
            "200": _json(_ref("SweepDetail")), **_errors(401, 404)}, params=[SWEEP])},
        f"{API}/sweeps/{{sweep}}/cancel": {"post": _op("Cancel a sweep: queued tasks dropped, running tickets killed", {
            "200": ok, **_errors(401, 404, 409, 503)}, params=[SWEEP], write=True)},
        f"{API}/sweeps/{{sweep}}/pause": {"post": _op("Pause a sweep: no new tickets, running ones finish", {
            "200": ok, **_errors(401, 404, 409, 503)}, params=[SWEEP], write=True)},
        f"{API}/sweeps/{{sweep}}/resume": {"post": _op("Resume a paused sweep", {
            "200": ok, **_errors(401, 404, 409, 503)}, params=[SWEEP], write=True)},
        f"{API}/sweeps/{{sweep}}/tasks": {"get": _op("Tasks of a sweep, optionally of one state, paginated", {
            "200": _json(_ref("TaskPage")), **_errors(400, 401, 404)}, params=[
            SWEEP, _query("state", {"type": "string", "enum": ["queued", "paused", "running", "done", "failed", "cancelled"]},
                          "Only tasks in this state"),
            _query("offset", {"type": "integer", "minimum": 0, "default": 0}, "Skip this many tasks"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Page size")])},
        f"{API}/sweeps/{{sweep}}/tasks/{{task}}": {"get": _op("One task with its attempts and stored results", {
            "200": _json(_ref("TaskDetail")), **_errors(400, 401, 404)}, params=[SWEEP, TASK])},
        f"{API}/sweeps/{{sweep}}/tasks/{{task}}/cancel": {"post": _op(
            "Cancel one task (its running tickets are killed)", {"200": ok, **_errors(400, 401, 404, 409, 503)},
            params=[SWEEP, TASK], write=True)},
        f"{API}/sweeps/{{sweep}}/tasks/{{task}}/results/{{name}}": {"get": _op(
            "Download one stored result of a task (streamed; names of glob results contain '/')", {
                "200": {"description": "The bytes", "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                **_errors(400, 401, 404)},
            params=[SWEEP, TASK, _path_param("name", description="Result name, e.g. stdout or out/part-1.txt")])},
        f"{API}/sweeps/{{sweep}}/failures": {"get": _op("Failed parameter sets with reasons", {
            "200": _json({"type": "object", "properties": {"sweep": {"type": "string"}, "failures": {
                "type": "array", "items": _ref("Failure")}}}), **_errors(401, 404)}, params=[SWEEP])},
        f"{API}/sweeps/{{sweep}}/collect": {
            "get": _op("Download the collected output of the done tasks, in task order (streamed)", {
                "200": {"description": "The collected file", "content": {
                    "text/csv": {"schema": {"type": "string"}}, "application/x-ndjson": {"schema": {"type": "string"}},
                    "text/plain": {"schema": {"type": "string"}},
                    "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors(400, 401, 404)}, params=[
                SWEEP, _query("format", FORMAT, "concat, blockwise (a parameter header per task), csv or jsonl table, "
                                          "folders (a tar of <task>/params.json and result files), "
                                          "failed (the failed tasks' CSV)"),
                _query("result", {"type": "string"}, "Only this result (default: the first for concat/blockwise, all for tables)")]),
            "post": _op("Download the collected output and optionally remove the results from the master afterwards", {
                "200": {"description": "The collected file (results removed only once it was sent whole)",
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors(400, 401, 404, 409)}, params=[SWEEP], write=True, body={
                "content": {"application/json": {"schema": _ref("CollectRequest")}}})},
        f"{API}/sweeps/{{sweep}}/results": {"delete": _op("Remove a finished sweep's stored results", {
            "200": ok, **_errors(401, 404, 409, 503)}, params=[SWEEP], write=True)},
        f"{API}/tickets/{{ticket}}/progress": {"get": _op("Recent stdout/stderr of a running ticket", {
            "200": _json(_ref("Progress")), **_errors(400, 401, 404, 503)},
            params=[_path_param("ticket", "integer", "Ticket id")], tag="slaves")},
        f"{API}/slaves": {"get": _op("Slaves: platform, slots, busy, last heard, load/memory, ticket counts", {
            "200": _json({"type": "object", "properties": {"slaves": {"type": "array", "items": _ref("Slave")}}}),
            **_errors(401)}, tag="slaves")},
        f"{API}/slaves/{{slave}}/drain": {"post": _op("Drain a slave: it gets no new tickets, running ones finish", {
            "200": ok, **_errors(401, 404, 503)}, params=[_path_param("slave", description="Slave name")],
            write=True, tag="slaves")},
        f"{API}/slaves/{{slave}}/undrain": {"post": _op("Give a drained slave tickets again", {
            "200": ok, **_errors(401, 404, 503)}, params=[_path_param("slave", description="Slave name")],
            write=True, tag="slaves")},
        **_allocation_paths(ok),
    }


def _allocation_paths(ok: dict[str, Any]) -> dict[str, Any]:
    queue = [_path_param("queue", description="Allocation queue name")]
    return {
        f"{API}/allocations": {
            "get": _op("Allocation queues: settings, last refused submission, jobs with state, exit code, reason", {
                "200": _json(_obj({"queues": {"type": "array", "items": _ref("AllocationQueue")},
                                   "scheduler_calls": _obj({"submit": I, "cancel": I})})),
                **_errors(401, 503)}, tag="allocations"),
            "post": _op("Add an allocation queue (fields as in master.toml's [alloc.NAME], with name)", {
                "200": _json(_obj({"queue": S})), **_errors(400, 401, 409, 503)}, write=True, tag="allocations",
                body={"required": True, "content": {"application/json": {"schema": {"type": "object"}}}})},
        f"{API}/allocations/{{queue}}/pause": {"post": _op("Submit no more jobs from this queue", {
            "200": _json(_obj({"paused": B})), **_errors(401, 404, 503)}, params=queue, write=True,
            tag="allocations")},
        f"{API}/allocations/{{queue}}/resume": {"post": _op("Submit jobs from this queue again", {
            "200": _json(_obj({"paused": B})), **_errors(401, 404, 503)}, params=queue, write=True,
            tag="allocations")},
        f"{API}/allocations/{{queue}}": {"delete": _op("Cancel every job of the queue and remove it", {
            "200": ok, **_errors(401, 404, 503)}, params=queue, write=True, tag="allocations")},
    }


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
NULLN = {"type": "number", "nullable": True}
NULLS = {"type": "string", "nullable": True}


def _schemas() -> dict[str, Any]:
    sweep = _obj({
        "name": S, "state": {"type": "string", "enum": ["active", "paused", "finished", "cancelled"]},
        "priority": I, "total": I, "done": I, "running": I, "queued": I, "failed": I, "cancelled": I,
        "elapsed": N, "throughput": {**N, "description": "Done tasks per second"},
        "eta": {**NULLN, "description": "Seconds to the end at the current throughput"},
        "progress": {**N, "description": "Settled fraction, 0..1"}, "url": S, "created": N, "finished": NULLN,
    }, ["name", "state", "total", "done", "running", "queued", "failed"])
    return {
        "Error": _obj({"error": _obj({
            "code": {"type": "string", "enum": ["bad_request", "unauthorized", "not_found", "method_not_allowed",
                                                "conflict", "too_large", "unsupported_media_type", "internal",
                                                "unavailable"]},
            "message": S, "field": {**S, "description": "The request field at fault (400)"},
            "id": {**S, "description": "Id of the logged error (500)"}}, ["code", "message"])}, ["error"]),
        "Ok": _obj({"state": S, "draining": B}),
        "Info": _obj({"name": S, "version": S, "protocol": I, "epoch": I, "started": N, "uptime": N,
                      "endpoint": S, "http": S, "auth": _obj({"open_reads": B, "tokens": I})}),
        "Sweep": sweep,
        "SweepDetail": {"allOf": [_ref("Sweep"), _obj({"spec": {"type": "object"}, "callback": B})]},
        "Status": _obj({"time": N, "uptime": N, "sweeps": {"type": "array", "items": _ref("Sweep")},
                        "slaves": _obj({"alive": I, "draining": I, "gone": I, "slots": I, "busy": I}),
                        "last_event": I}),
        "Stats": _obj({"sweeps": {"type": "array", "items": _ref("Sweep")},
                       "slaves": {"type": "array", "items": _ref("Slave")},
                       "failures": {"type": "object", "additionalProperties": {
                           "type": "array", "items": _ref("Failure")}},
                       "report": {**S, "description": "The table `ticketfarm stats` prints"}}),
        "Task": _obj({"task": I, "params": {"type": "object"}, "state": S, "attempts": I,
                      "reason": {**S, "nullable": True}, "ticket": {**I, "nullable": True}, "finished": NULLN}),
        "TaskPage": _obj({"sweep": S, "state": {**S, "nullable": True}, "offset": I, "limit": I, "total": I,
                          "next": {**I, "nullable": True}, "tasks": {"type": "array", "items": _ref("Task")}}),
        "Attempt": _obj({"ticket": I, "slave": S, "attempt": I, "dispatched": N, "finished": NULLN, "state": S,
                         "exit_code": {**I, "nullable": True}, "reason": {**S, "nullable": True}, "elapsed": NULLN}),
        "TaskDetail": {"allOf": [_ref("Task"), _obj({
            "attempts_list": {"type": "array", "items": _ref("Attempt")},
            "results": {"type": "array", "items": _obj({"name": S, "size": I, "url": S})}})]},
        "Failure": _obj({"task": I, "params": {"type": "object"}, "reason": S}),
        "Slave": _obj({"name": S, "platform": S, "slots": I, "state": S, "running": I, "done": I, "failed": I,
                       "timed_out": I, "lost": I, "cancelled": I, "busy": {**N, "description": "Busy seconds"},
                       "load": NULLN, "memory": NULLN, "disk": NULLN, "version": S, "first_seen": N,
                       "last_seen": N, "connected": B, "draining": B, "last_heard": N, "seconds_since_heard": N}),
        "AllocationQueue": _obj({"name": S, "spec": {"type": "object"}, "paused": B, "error": NULLS, "errors": I,
                                 "retry_at": NULLN, "jobs": {"type": "array", "items": _ref("AllocationJob")}}),
        "AllocationJob": _obj({"id": I, "queue": S, "native_id": NULLS, "state": S, "slaves": I, "submitted": N,
                               "started": NULLN, "ended": NULLN, "exit_code": {**I, "nullable": True},
                               "reason": NULLS, "slaves_seen": {"type": "array", "items": S}}),
        "Progress": _obj({"ticket": I, "sweep": S, "task": I, "slave": S, "state": S, "output": S}),
        "Submission": _obj({
            "toml": {**S, "description": "The spec as TOML text"},
            "spec": {"type": "object", "description": "The spec as an object of the TOML's shape"},
            "files": {"type": "object", "description": "Files the spec names (CSV/JSONL parameters, inputs): "
                                                       "text, or {\"base64\": ...}",
                      "additionalProperties": {"oneOf": [S, _obj({"base64": S})]}},
            "status_callback_url": {**S, "description": "Receives a signed POST on every sweep state change"},
            "status_callback_secret": {**S, "description": "HMAC key for those POSTs (default: callback_secret)"}}),
        "Submitted": _obj({"sweep": S, "state": S, "tasks": I, "url": S}),
        "CollectRequest": _obj({"format": FORMAT, "result": S, "remove": B}),
        "Event": _obj({"id": I, "ts": N, "kind": S, "sweep": {**S, "nullable": True},
                       "task": {**I, "nullable": True}, "ticket": {**I, "nullable": True},
                       "detail": {"type": "object"}}),
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.0 document."""
    messages = {400: "Bad input", 401: "Missing or invalid API token", 404: "Not found",
                409: "Wrong state", 413: "Too large", 415: "Unsupported media type", 500: "Internal error (logged)",
                503: "Master unavailable"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "ticketfarm master HTTP API", "version": "1",
                 "description": "Status, statistics, events, collection and control of a ticketfarm master. "
                                "Errors are {\"error\": {\"code\", \"message\"}}. Mutating endpoints need a token "
                                "(Authorization: Bearer TOKEN, or X-Key: TOKEN); read endpoints too unless the "
                                "master is bound to loopback with http_open_reads."},
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": {f"E{c}": _json(_ref("Error"), m) for c, m in messages.items()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "xkey": {"type": "apiKey", "in": "header", "name": "X-Key"}},
        },
    }


def main() -> None:
    json.dump(document(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

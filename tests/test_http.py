"""The HTTP API against a real master process with real slaves: every endpoint, auth, SSE, callbacks, metrics."""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.httpcluster import API, CALLBACK_SECRET, ROOT, TOKEN, HttpCluster, env, module_cluster, spec
from ticketfarm import exitcodes



cluster = module_cluster("http")


# -- a callback receiver ------------------------------------------------------------------------------
class Receiver:
    """A tiny HTTP server that refuses the first POST (to exercise retries) and records the rest."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.refused = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.refused == 0:
                    outer.refused += 1
                    self.send_response(503)
                else:
                    outer.posts.append((dict(self.headers), body))
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def read_sse(url: str, out: list[dict[str, Any]], done: threading.Event) -> None:
    """A plain SSE client: parses id/event/data blocks until the server closes the stream."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        block: dict[str, str] = {}
        for raw in r:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in block:
                    out.append({"id": int(block["id"]), "event": block["event"], "data": json.loads(block["data"])})
                block = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                block[key] = value
    done.set()


# -- the whole life of a sweep ------------------------------------------------------------------------------
def test_sweep_lifecycle_events_callbacks_and_reads(cluster: HttpCluster) -> None:
    receiver = Receiver()
    try:
        events: list[dict[str, Any]] = []
        ended = threading.Event()
        s = spec("life", 12, command="if [ {x} = 7 ]; then echo bad >&2; exit 3; fi; echo value={x}",
                 max_attempts=1)
        r = cluster.submit(s, status_callback_url=receiver.url)
        assert r.status == 201, r.body
        assert r.json() == {"sweep": "life", "state": "submitted", "tasks": 12, "url": f"{API}/sweeps/life"}
        assert r.headers["Location"] == f"{API}/sweeps/life"
        threading.Thread(target=read_sse, args=(f"{cluster.url}{API}/events?sweep=life&until_end=1", events, ended),
                         daemon=True).start()
        assert ended.wait(30), "the event stream did not report the end of the sweep"
        kinds = [e["event"] for e in events]
        assert kinds[0] == "sweep_submitted" and kinds[-1] == "sweep_finished"
        assert "tickets_dispatched" in kinds and "tasks_done" in kinds and "task_failed" in kinds
        done = sorted(t for e in events if e["event"] == "tasks_done" for t in e["data"]["detail"]["tasks"])
        assert done == [i for i in range(12) if i != 7]
        assert [e["id"] for e in events] == sorted(e["id"] for e in events)

        # Same spec again: 200, not a new sweep; another spec under the same name: 409.
        assert cluster.submit(s).status == 200
        r = cluster.submit(spec("life", 3))
        assert r.status == 409 and r.error["code"] == "conflict"

        sweep = cluster.sweep("life")
        assert (sweep["state"], sweep["done"], sweep["failed"], sweep["total"]) == ("finished", 11, 1, 12)
        assert sweep["progress"] == 1.0 and sweep["eta"] == 0.0 and sweep["callback"] is True
        assert any(x["name"] == "life" for x in cluster.get(f"{API}/sweeps").json()["sweeps"])

        page = cluster.get(f"{API}/sweeps/life/tasks?state=done&limit=5").json()
        assert (page["total"], page["next"], [t["task"] for t in page["tasks"]]) == (11, 5, [0, 1, 2, 3, 4])
        last = cluster.get(f"{API}/sweeps/life/tasks?state=done&limit=5&offset=10").json()
        assert last["next"] is None and [t["task"] for t in last["tasks"]] == [11]
        failed = cluster.get(f"{API}/sweeps/life/tasks?state=failed").json()["tasks"]
        assert [t["task"] for t in failed] == [7] and "exit" in failed[0]["reason"].lower() or failed[0]["reason"]

        task = cluster.get(f"{API}/sweeps/life/tasks/3").json()
        assert task["state"] == "done" and task["params"] == {"x": 3}
        (attempt,) = task["attempts_list"]
        assert attempt["slave"] in ("s1", "s2") and attempt["exit_code"] == 0 and attempt["finished"] > attempt["dispatched"]
        (result,) = task["results"]
        body = cluster.get(result["url"])
        assert body.status == 200 and body.body == b"value=3\n"
        bad = cluster.get(f"{API}/sweeps/life/tasks/7").json()["attempts_list"][0]
        assert bad["exit_code"] == 3 and bad["state"] == "failed"

        failures = cluster.get(f"{API}/sweeps/life/failures").json()["failures"]
        assert [(f["task"], f["params"]) for f in failures] == [(7, {"x": 7})] and failures[0]["reason"]

        rows = list(csv.reader(io.StringIO(cluster.get(f"{API}/sweeps/life/collect?format=csv").body.decode())))
        assert rows[0] == ["task", "x", "stdout"] and rows[1] == ["0", "0", "value=0"] and len(rows) == 12
        jsonl = [json.loads(x) for x in cluster.get(f"{API}/sweeps/life/collect?format=jsonl").body.splitlines()]
        assert jsonl[2] == {"task": 2, "params": {"x": 2}, "results": {"stdout": "value=2"}}
        concat = cluster.get(f"{API}/sweeps/life/collect?format=concat")
        assert concat.body == b"".join(b"value=%d\n" % i for i in range(12) if i != 7)
        assert concat.headers["Transfer-Encoding"] == "chunked"
        blocks = cluster.get(f"{API}/sweeps/life/collect?format=blockwise").body.decode()
        assert blocks.startswith("# task=0 x=0\nvalue=0\n# task=1 x=1\n")

        stats = cluster.get(f"{API}/stats").json()
        assert "Sweeps" in stats["report"] and "life" in stats["report"]
        assert stats["failures"]["life"][0]["task"] == 7
        slaves = {x["name"]: x for x in cluster.get(f"{API}/slaves").json()["slaves"]}
        assert set(slaves) >= {"s1", "s2"}
        assert sum(x["done"] for x in slaves.values()) >= 11 and all(x["connected"] for x in slaves.values())
        assert slaves["s1"]["platform"] and slaves["s1"]["slots"] == 2 and slaves["s1"]["seconds_since_heard"] < 2

        # Callbacks: submitted and finished, in order, each signed with HMAC-SHA256 over "timestamp.body".
        cluster.wait_for(lambda: len(receiver.posts) >= 2, 10, "two callbacks")
        assert receiver.refused == 1
        states = []
        for headers, raw in receiver.posts:
            ts, sig = headers["X-Ticketfarm-Timestamp"], headers["X-Ticketfarm-Signature"]
            expected = "sha256=" + hmac.new(CALLBACK_SECRET.encode(), ts.encode() + b"." + raw,
                                            hashlib.sha256).hexdigest()
            assert hmac.compare_digest(sig, expected)
            payload = json.loads(raw)
            assert payload["sweep"] == "life" and str(payload["id"]) == headers["X-Ticketfarm-Event"]
            states.append(payload["state"])
        assert states == ["active", "finished"]
        assert json.loads(receiver.posts[-1][1])["counts"] == {"done": 11, "failed": 1}
    finally:
        receiver.close()


def test_read_errors(cluster: HttpCluster) -> None:
    def err(path: str, status: int, code: str, method: str = "GET") -> dict[str, Any]:
        r = cluster.request(method, path)
        assert r.status == status, (path, r.status, r.body)
        assert r.headers["Content-Type"] == "application/json"
        assert set(r.error) >= {"code", "message"} and r.error["code"] == code
        return r.error

    err("/nope", 404, "not_found")
    err(f"{API}/sweeps/ghost", 404, "not_found")
    err(f"{API}/sweeps/ghost/tasks", 404, "not_found")
    err(f"{API}/sweeps/ghost/collect", 404, "not_found")
    err(f"{API}/sweeps/ghost/failures", 404, "not_found")
    err(f"{API}/events?sweep=ghost", 404, "not_found")
    err(f"{API}/tickets/123/progress", 404, "not_found")
    err(f"{API}/tickets/abc/progress", 400, "bad_request")
    err(f"{API}/status", 405, "method_not_allowed", "DELETE")
    cluster.submit(spec("reads", 2))
    cluster.wait_state("reads", "finished")
    assert err(f"{API}/sweeps/reads/tasks?state=bogus", 400, "bad_request")["field"] == "state"
    assert err(f"{API}/sweeps/reads/tasks?limit=0", 400, "bad_request")["field"] == "limit"
    assert err(f"{API}/sweeps/reads/tasks?offset=x", 400, "bad_request")["field"] == "offset"
    assert err(f"{API}/sweeps/reads/tasks/abc", 400, "bad_request")["field"] == "task"
    err(f"{API}/sweeps/reads/tasks/99", 404, "not_found")
    err(f"{API}/sweeps/reads/tasks/0/results/nothing", 404, "not_found")
    assert err(f"{API}/sweeps/reads/collect?format=xml", 400, "bad_request")["field"] == "format"
    assert err(f"{API}/sweeps/reads/collect?format=csv&result=zzz", 400, "bad_request")["field"] == "result"
    assert err(f"{API}/events?until_end=1", 400, "bad_request")["field"] == "until_end"


# -- auth --------------------------------------------------------------------------------------------------
def test_token_refused_and_accepted(cluster: HttpCluster) -> None:
    s = spec("auth", 2)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Key": "wrong"}, {"Authorization": "Basic abc"}):
        r = cluster.request("POST", f"{API}/sweeps", {"spec": s}, headers=headers)
        assert r.status == 401 and r.error["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # A wrong token is refused on reads too, though reads need none on loopback.
    assert cluster.get(f"{API}/status", headers={"X-Key": "wrong"}).status == 401
    assert cluster.get(f"{API}/status").status == 200
    assert cluster.get(f"{API}/status", headers={"X-Key": TOKEN}).status == 200
    for path in ("/sweeps/auth/cancel", "/sweeps/auth/pause", "/sweeps/auth/resume", "/sweeps/auth/tasks/0/cancel",
                 "/slaves/s1/drain", "/slaves/s1/undrain", "/sweeps/auth/collect"):
        assert cluster.post(API + path, token=None).status == 401, path
    assert cluster.request("DELETE", f"{API}/sweeps/auth/results").status == 401
    r = cluster.request("POST", f"{API}/sweeps", {"spec": s}, headers={"X-Key": TOKEN})
    assert r.status == 201, r.body


def test_submit_validation_names_the_field(cluster: HttpCluster) -> None:
    def bad(body: Any, field: str | None, status: int = 400, **kw: Any) -> str:
        r = cluster.post(f"{API}/sweeps", body, **kw)
        assert r.status == status, r.body
        if field:
            assert r.error.get("field") == field, r.error
        return r.error["message"]

    good = spec("valid", 3)
    assert "name" in bad({"spec": {**good, "name": 7}}, "name")  # a missing name is assigned (test_http_seeds)
    bad({"spec": {**good, "colour": "red"}}, None)
    bad({"spec": {**good, "timeout": "soon"}}, "timeout")
    bad({"spec": {**good, "name": "../etc"}}, "name")
    bad({"spec": good, "extra": 1}, "extra")
    bad({"toml": "name = ["}, "toml")
    bad({"spec": good, "toml": "x"}, "spec")
    bad({}, "spec")
    bad(b"{not json", None)
    bad(b"[1, 2]", None)
    bad({"spec": {**good, "parameters": {"csv": "/etc/passwd"}}}, "parameters.csv")
    bad({"spec": {**good, "parameters": {"csv": "p.csv"}}, "files": {"../p.csv": "x\n1\n"}}, "files")
    bad({"spec": good, "status_callback_url": "ftp://x"}, None)
    bad(b"x", None, status=415, headers={"Content-Type": "application/xml"})
    big = cluster.request("POST", f"{API}/sweeps", b"x", token=TOKEN,
                          headers={"Content-Type": "application/json", "Content-Length": str(10**9)})
    assert big.status in (413, 400) or big.status == 413
    # The same spec as TOML text and with a CSV file sent along.
    csv_spec = {"name": "withcsv", "command": "echo {a}-{b}", "parameters": {"csv": "p.csv", "delimiter": "|"}}
    bad({"spec": csv_spec, "files": {"p.csv": "a|b\n1|2\n3\n"}}, None)
    r = cluster.post(f"{API}/sweeps", {"spec": csv_spec, "files": {"p.csv": "a|b\n1|2\n3|4\n"}})
    assert r.status == 201 and r.json()["tasks"] == 2
    r = cluster.request("POST", f"{API}/sweeps", b'name = "astoml"\ncommand = "echo {x}"\n[parameters]\ngrid = {x = [1]}\n',
                        token=TOKEN, headers={"Content-Type": "application/toml"})
    assert r.status == 201, r.body
    cluster.wait_state("withcsv", "finished")
    assert cluster.get(f"{API}/sweeps/withcsv/collect?format=concat").body == b"1-2\n3-4\n"


def test_bad_spec_answers_400_with_the_field_the_error_carries(cluster: HttpCluster) -> None:
    good = spec("fields", 2)
    cases = [
        ({**good, "colour": "red"}, {}, "colour"),
        ({**good, "max_attempts": 0}, {}, "max_attempts"),
        ({**good, "parameters": {"grid": {"x": {"range": [0, 5, 0]}}}}, {}, "parameters.grid.x.range"),
        ({**good, "parameters": {"csv": "p.csv"}}, {"p.csv": "x,y\n1,2\n3\n"}, "parameters.csv"),  # names p.csv:3
        ({**good, "inputs": [{"name": "a", "template": "t"}, {"name": "b", "template": "{nope}"}]}, {},
         "inputs[1].template"),
        ({**good, "inputs": [{"name": "a", "source": ["x"]}]}, {}, "inputs[0].source"),
        ({**good, "results": {"size": "stdin"}}, {}, "results.size"),
        ({**good, "collect": [{"mode": "table", "path": "o"}, {"mode": "table"}]}, {}, "collect[1].path"),
        ({**good, "collect": {"mode": "concat", "path": "o", "result": ["x"]}}, {}, "collect[0].result"),
        # (workers and validators run code beyond the sweep's own slots: over HTTP they are refused as a whole,
        # see test_http_auth.py)
    ]
    for body, files, field in cases:
        r = cluster.post(f"{API}/sweeps", {"spec": body, "files": files})
        assert r.status == 400 and r.error["code"] == "bad_request", r.body
        assert r.error["field"] == field, r.error
        message = r.error["message"]
        assert message.startswith("spec: ") or message.startswith("p.csv:3: "), message  # not the master's temp dir
        assert field in message or field == "parameters.csv", message
    assert cluster.get(f"{API}/sweeps/fields").status == 404


# -- mutations --------------------------------------------------------------------------------------------
def test_pause_resume_cancel_and_progress(cluster: HttpCluster) -> None:
    s = spec("slow", 40, command="echo started {x}; sleep 0.4; echo end")
    assert cluster.submit(s).status == 201
    cluster.wait_for(lambda: cluster.sweep("slow")["running"] > 0, what="running tickets")
    running = cluster.get(f"{API}/sweeps/slow/tasks?state=running").json()["tasks"]
    ticket = running[0]["ticket"]
    cluster.wait_for(lambda: "started" in cluster.get(f"{API}/tickets/{ticket}/progress").json()["output"]
                     or cluster.get(f"{API}/tickets/{ticket}/progress").json()["state"] != "running",
                     what="progress output")
    progress = cluster.get(f"{API}/tickets/{ticket}/progress").json()
    assert progress["sweep"] == "slow" and progress["slave"] in ("s1", "s2")

    r = cluster.post(f"{API}/sweeps/slow/pause")
    assert r.status == 200 and r.json()["state"] == "paused"
    assert cluster.post(f"{API}/sweeps/slow/pause").status == 200  # idempotent
    cluster.wait_for(lambda: cluster.sweep("slow")["running"] == 0, what="running tickets to finish")
    queued = cluster.sweep("slow")["queued"]
    time.sleep(0.5)
    assert cluster.sweep("slow")["queued"] == queued and cluster.sweep("slow")["state"] == "paused"
    r = cluster.post(f"{API}/sweeps/slow/resume")
    assert r.status == 200 and r.json()["state"] == "active"
    cluster.wait_for(lambda: cluster.sweep("slow")["queued"] < queued, what="dispatch after resume")

    r = cluster.post(f"{API}/sweeps/slow/tasks/39/cancel")
    assert r.status == 200, r.body
    assert cluster.get(f"{API}/sweeps/slow/tasks/39").json()["state"] == "cancelled"
    assert cluster.post(f"{API}/sweeps/slow/tasks/39/cancel").status == 409
    assert cluster.post(f"{API}/sweeps/slow/tasks/999/cancel").status == 404
    assert cluster.post(f"{API}/sweeps/slow/tasks/x/cancel").status == 400

    r = cluster.post(f"{API}/sweeps/slow/cancel")
    assert r.status == 200 and r.json()["state"] == "cancelled"
    sweep = cluster.sweep("slow")
    assert sweep["state"] == "cancelled" and sweep["running"] == 0 and sweep["queued"] == 0
    for op in ("cancel", "pause", "resume"):
        r = cluster.post(f"{API}/sweeps/slow/{op}")
        assert r.status == 409 and r.error["code"] == "conflict", op
        assert cluster.post(f"{API}/sweeps/ghost/{op}").status == 404


def test_drain_slave(cluster: HttpCluster) -> None:
    assert cluster.post(f"{API}/slaves/ghost/drain").status == 404
    r = cluster.post(f"{API}/slaves/s1/drain")
    assert r.status == 200 and r.json()["draining"] is True
    slaves = {x["name"]: x for x in cluster.get(f"{API}/slaves").json()["slaves"]}
    assert slaves["s1"]["draining"] is True
    before = slaves["s1"]["done"]
    cluster.submit(spec("drained", 10))
    cluster.wait_state("drained", "finished")
    slots = {a["slave"] for t in range(10)
             for a in cluster.get(f"{API}/sweeps/drained/tasks/{t}").json()["attempts_list"]}
    assert slots == {"s2"}
    assert cluster.get(f"{API}/status").json()["slaves"]["draining"] == 1
    assert cluster.post(f"{API}/slaves/s1/undrain").json()["draining"] is False
    cluster.submit(spec("undrained", 16, command="sleep 0.05; echo {x}"))
    cluster.wait_state("undrained", "finished")
    after = {x["name"]: x for x in cluster.get(f"{API}/slaves").json()["slaves"]}["s1"]["done"]
    assert after > before


def test_collect_and_remove(cluster: HttpCluster) -> None:
    cluster.submit(spec("gather", 4, command="sleep 0.2; echo {x}"))
    r = cluster.post(f"{API}/sweeps/gather/collect", {"format": "concat", "remove": True})
    assert r.status == 409  # not finished yet: results stay
    assert cluster.request("DELETE", f"{API}/sweeps/gather/results", token=TOKEN).status == 409
    cluster.wait_state("gather", "finished")
    assert cluster.post(f"{API}/sweeps/gather/collect", {"remove": "yes"}).status == 400
    r = cluster.post(f"{API}/sweeps/gather/collect", {"format": "concat", "remove": True})
    assert r.status == 200 and r.body == b"0\n1\n2\n3\n"
    cluster.wait_for(lambda: cluster.get(f"{API}/sweeps/gather/tasks/0").json()["results"] == [],
                     what="results removed")
    # A second collect is told the results are gone (issue 14: it was a 200 with nothing in it).
    gone = cluster.get(f"{API}/sweeps/gather/collect?format=concat")
    assert gone.status == 410 and gone.error["code"] == "gone" and "removed" in gone.error["message"]
    assert gone.headers["Content-Type"] == "application/json"
    assert cluster.post(f"{API}/sweeps/gather/collect", {"format": "csv", "remove": True}).status == 410
    assert cluster.get(f"{API}/sweeps/gather/collect?format=failed").status == 200
    assert cluster.sweep("gather")["results_removed"] > 0
    r = cluster.request("DELETE", f"{API}/sweeps/gather/results", token=TOKEN)
    assert r.status == 200
    assert cluster.request("DELETE", f"{API}/sweeps/ghost/results", token=TOKEN).status == 404


# -- metrics, OpenAPI, info ----------------------------------------------------------------------------------------
def test_metrics_parse(cluster: HttpCluster) -> None:
    cluster.submit(spec("metered", 5))
    cluster.wait_state("metered", "finished")
    r = cluster.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("ticketfarm_tasks", (("state", "done"), ("sweep", "metered")))] == 5
    assert samples[("ticketfarm_tickets_dispatched_total", ())] >= 5
    assert samples[("ticketfarm_slaves", ())] == 2
    promise = {"ticketfarm_reassignments", "ticketfarm_tickets_lost", "ticketfarm_duplicate_results_suppressed"}
    assert promise <= set(families)  # labelled by cause: no sample before the first lost ticket
    assert samples[("ticketfarm_dispatch_latency_seconds_count", ())] >= 1
    assert families["ticketfarm_dispatch_latency_seconds"].type == "histogram"


def test_openapi_is_generated_from_the_served_app_and_validates(cluster: HttpCluster) -> None:
    from openapi_spec_validator import validate

    from master.web.openapi import document

    served = cluster.get("/openapi.json").json()
    assert served["openapi"].startswith("3.")
    validate(served)
    assert served == json.loads((ROOT / "docs" / "openapi.json").read_text()) == document()
    operations = [(m.upper(), p, op) for p, ops in served["paths"].items() for m, op in ops.items()]
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids)) == len(operations) >= 24
    # Every documented path answers with something other than "no such endpoint" or "method not allowed".
    for method, path, _ in operations:
        concrete = re.sub(r"\{\w+\}", "0", path) + ("?sweep=ghost" if path.endswith("/events") else "")
        r = cluster.request(method, concrete, body={} if method == "POST" else None)
        assert not (r.status == 404 and "no endpoint" in r.body.decode()), (method, path)
        assert r.status != 405, (method, path)


def test_info_and_dashboard_page(cluster: HttpCluster) -> None:
    info = cluster.get(f"{API}/info").json()
    assert info["name"] == "ticketfarm" and info["protocol"] == 1 and info["uptime"] > 0
    assert info["endpoint"] == cluster.endpoint and info["http"] == cluster.url
    page = cluster.get("/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.body.decode()
    assert "<script" in html and not re.search(r"""(src|href)=["']https?://""", html)


# -- the CLI through the API ------------------------------------------------------------------------------------------
def test_cli_uses_the_http_api(cluster: HttpCluster, tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "cli.toml").write_text(
        'name = "viacli"\ncommand = "echo {a}+{b}"\n[parameters]\ncsv = "p.csv"\n'
        '[[collect]]\nmode = "concat"\npath = "all.txt"\n[[collect]]\nmode = "table"\npath = "t.csv"\n')

    def cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
        extra = ["--token", token] if token else []
        return subprocess.run([sys.executable, "-m", "ticketfarm", "--state", str(tmp_path / "nostate"),
                               "--http", cluster.url, *extra, *args], env=env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=30)

    r = cli("submit", str(tmp_path / "cli.toml"), token=None)
    assert r.returncode == exitcodes.REFUSED.code and "401" in r.stderr and "pass --token TOKEN" in r.stderr
    r = cli("submit", str(tmp_path / "cli.toml"))
    assert r.returncode == 0 and "viacli: submitted (2 tasks)" in r.stdout, r.stderr
    cluster.wait_state("viacli", "finished")
    r = cli("status")
    assert r.returncode == 0 and re.search(r"viacli\s+finished\s+2\s+2", r.stdout), r.stdout
    r = cli("stats")
    assert r.returncode == 0 and "Slaves" in r.stdout and "viacli" in r.stdout
    r = cli("tasks", "viacli", "--format", "json")
    tasks = json.loads(r.stdout)["tasks"]
    assert [(t["task"], t["state"], t["exit_code"]) for t in tasks] == [(0, "done", 0), (1, "done", 0)], r.stderr
    assert all(t["slave"] and t["elapsed"] is not None for t in tasks)
    out = tmp_path / "out"
    r = cli("collect", "viacli", "--out", str(out), "--remove")
    assert r.returncode == 0, r.stderr
    assert (out / "all.txt").read_text() == "1+2\n3+4\n"
    assert (out / "t.csv").read_text().splitlines() == ["task,a,b,stdout", "0,1,2,1+2", "1,3,4,3+4"]
    assert cluster.get(f"{API}/sweeps/viacli/tasks/0").json()["results"] == []
    r = cli("cancel", "viacli")
    assert r.returncode == exitcodes.REFUSED.code and "409" in r.stderr
    assert "`ticketfarm status` shows each sweep's state" in r.stderr


# -- in-process: refusal of a remote bind without a token, and 500 with an error id -----------------------------------
def test_remote_bind_without_token_is_refused(tmp_path: Path) -> None:
    from master.config import MasterConfig
    from master.server import Master
    from master.web.context import check_http_config
    from master.web.tokens import TokenSet, add_token
    from ticketfarm.errors import ConfigError

    config = MasterConfig(bind="tcp://127.0.0.1:*", http_bind="0.0.0.0:0")
    with pytest.raises(ConfigError, match="not loopback") as exc:
        Master(config, tmp_path)
    assert exc.value.field == "http_bind"
    add_token(tmp_path, "remote", ["read"])
    check_http_config(config, TokenSet(tmp_path))  # with a token it may serve beyond this machine


def test_internal_error_answers_500_with_an_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from master.config import MasterConfig
    from master.web import views
    from master.web.app import create_app
    from master.web.context import MasterInfo, WebContext
    from master.web.link import MasterLink
    from master.web.tokens import TokenSet

    ctx = WebContext(MasterConfig(http_bind="127.0.0.1:0"), tmp_path, MasterInfo("tcp://x", 1, time.time()),
                     MasterLink("tcp://127.0.0.1:9", None), TokenSet(tmp_path))

    def boom(ctx: Any) -> Any:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(views, "uptime", boom)
    try:
        r = TestClient(create_app(ctx), raise_server_exceptions=False).get(f"{API}/info")
    finally:
        ctx.link.close()
    err = r.json()["error"]
    assert r.status_code == 500 and err["code"] == "internal" and re.fullmatch(r"[0-9a-f]{12}", err["id"])
    assert err["id"] in err["message"] and r.headers["Content-Type"] == "application/json"


# -- python sweeps are seen like command sweeps --------------------------------------------------------------
def test_a_python_sweep_is_visible_over_http_like_a_command_sweep(cluster: HttpCluster) -> None:
    from tests import fixtures_tasks as tasks
    from ticketfarm import Cluster

    with Cluster(address=cluster.endpoint, keys=cluster.state / "keys") as client:
        handle = client.sweep(tasks.square, range(30), name="py-visible")
        assert list(handle.results(timeout=30)) == [x * x for x in range(30)]
    sweep = cluster.wait_state("py-visible", "finished")
    assert (sweep["done"], sweep["failed"], sweep["total"], sweep["progress"]) == (30, 0, 30, 1.0)
    task = cluster.get(f"{API}/sweeps/py-visible/tasks/4").json()
    assert task["state"] == "done" and task["params"]["fn"]
    (attempt,) = task["attempts_list"]
    assert attempt["slave"] in ("s1", "s2") and attempt["state"] == "done"
    events: list[dict[str, Any]] = []
    ended = threading.Event()
    read_sse(f"{cluster.url}{API}/events?sweep=py-visible&until_end=1", events, ended)
    dispatched = sorted(t[1] for e in events if e["event"] == "tickets_dispatched" for t in e["data"]["detail"]["tickets"])
    done = sorted(t for e in events if e["event"] == "tasks_done" for t in e["data"]["detail"]["tasks"])
    assert dispatched == done == list(range(30))
    assert events[-1]["event"] == "sweep_finished"


def test_the_answer_cache_rebuilds_once_serves_the_old_answer_meanwhile_and_forgets_on_change(tmp_path: Path) -> None:
    from master.config import MasterConfig
    from master.web.context import MasterInfo, WebContext
    from master.web.link import MasterLink
    from master.web.tokens import TokenSet

    ctx = WebContext(MasterConfig(http_bind="127.0.0.1:0", http_cache_ttl=0.2), tmp_path,
                     MasterInfo("tcp://x", 1, time.time()), MasterLink("tcp://127.0.0.1:9", None), TokenSet(tmp_path))
    try:
        assert ctx.fresh("k") is None and ctx.cached("k", lambda: "v1") == "v1" and ctx.fresh("k") == "v1"
        time.sleep(0.25)
        assert ctx.fresh("k") is None  # stale: this caller rebuilds it ...
        assert ctx.fresh("k") == "v1"  # ... and every other poller meanwhile gets the old answer, not a queue
        assert ctx.cached("k", lambda: "v2") == "v2" and ctx.fresh("k") == "v2"

        def changed_meanwhile() -> str:
            ctx.invalidate()  # a change lands while the answer is being built
            return "v3"

        time.sleep(0.25)
        assert ctx.cached("k", changed_meanwhile) == "v3"
        assert ctx.fresh("k") is None  # v3 may predate the change: it is not kept
        ctx.cached("k", lambda: "v4")
        ctx.invalidate()
        assert ctx.fresh("k") is None
    finally:
        ctx.link.close()

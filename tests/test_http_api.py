"""The HTTP process against its own OpenAPI document, on a real master: JSON errors for every status, documented
media types and bodies, consistent counts, running apart from prefetched, metrics of both processes."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator
from prometheus_client.parser import text_string_to_metric_families

from tests.httpcluster import API, TOKEN, HttpCluster, env, module_cluster, spec



cluster = module_cluster("api")


@pytest.fixture(scope="module")
def document(cluster: HttpCluster) -> dict[str, Any]:
    return cluster.get("/openapi.json").json()


def check(document: dict[str, Any], path: str, method: str, status: int, body: bytes, ctype: str) -> None:
    """The answer's media type is one the document lists for that status, and a JSON body fits its schema."""
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, (method, path, status)
    content = responses[str(status)]["content"]
    media = ctype.split(";")[0].strip()
    assert media in content, (method, path, status, media, list(content))
    if media == "application/json":
        schema = {**content[media]["schema"], "components": document["components"]}
        OAS31Validator(schema).validate(json.loads(body))


@pytest.mark.parametrize("method", ["PATCH", "PUT", "OPTIONS", "DELETE"])
def test_every_method_and_path_not_served_answers_json(cluster: HttpCluster, method: str) -> None:
    r = cluster.request(method, f"{API}/status")
    assert r.status == 405 and r.headers["Content-Type"] == "application/json", r.body
    assert r.error["code"] == "method_not_allowed" and "GET" in r.error["message"]
    r = cluster.request(method, "/no/such/path")
    assert r.status == 404 and r.headers["Content-Type"] == "application/json"
    assert r.error["code"] == "not_found"


def test_head_is_answered_like_get_without_a_body(cluster: HttpCluster) -> None:
    r = cluster.request("HEAD", f"{API}/status")
    assert r.status == 200 and r.body == b"" and r.headers["Content-Type"] == "application/json"


def test_answers_have_the_documented_media_types_and_bodies(cluster: HttpCluster,
                                                            document: dict[str, Any]) -> None:
    cmd = "if [ {x} = 2 ]; then exit 4; fi; printf v{x}"
    assert cluster.submit(spec("doc", 4, command=cmd, max_attempts=1)).status == 201
    cluster.wait_state("doc", "finished")
    reads = [("/api/v1/info", {}), ("/api/v1/status", {}), ("/api/v1/stats", {}), ("/api/v1/sweeps", {}),
             ("/api/v1/slaves", {}), ("/api/v1/sweeps/{sweep}", {"sweep": "doc"}),
             ("/api/v1/sweeps/{sweep}/tasks", {"sweep": "doc"}), ("/api/v1/sweeps/{sweep}/failures", {"sweep": "doc"}),
             ("/api/v1/sweeps/{sweep}/tasks/{task}", {"sweep": "doc", "task": "1"}),
             ("/api/v1/sweeps/{sweep}/tasks/{task}/results/{name}", {"sweep": "doc", "task": "1", "name": "stdout"}),
             ("/api/v1/sweeps/{sweep}", {"sweep": "ghost"}), ("/api/v1/sweeps/{sweep}/tasks/{task}",
                                                              {"sweep": "doc", "task": "x"}),
             ("/metrics", {}), ("/", {})]
    for template, params in reads:
        r = cluster.get(template.format(**params))
        check(document, template, "get", r.status, r.body, r.headers["Content-Type"])
    for fmt in ("concat", "blockwise", "csv", "jsonl", "folders", "failed"):
        r = cluster.get(f"{API}/sweeps/doc/collect?format={fmt}")
        assert r.status == 200, (fmt, r.body)
        check(document, "/api/v1/sweeps/{sweep}/collect", "get", 200, r.body, r.headers["Content-Type"])
    for body, status in (({"spec": spec("doc", 4, command=cmd, max_attempts=1)}, 200), ({"spec": {}}, 400)):
        r = cluster.post(f"{API}/sweeps", body)
        assert r.status == status
        check(document, "/api/v1/sweeps", "post", r.status, r.body, r.headers["Content-Type"])
    r = cluster.post(f"{API}/sweeps/doc/pause")
    check(document, "/api/v1/sweeps/{sweep}/pause", "post", r.status, r.body, r.headers["Content-Type"])
    kinds = document["components"]["schemas"]["Event"]["properties"]["kind"]["enum"]
    assert {"worker_fetched", "tickets_dispatched", "tasks_done", "sweep_finished", "results_removed"} <= set(kinds)


def test_stats_agrees_with_status_and_slaves(cluster: HttpCluster) -> None:
    assert cluster.submit(spec("agree", 3)).status == 201
    cluster.wait_state("agree", "finished")
    time.sleep(0.6)  # past http_cache_ttl: three fresh answers
    status, stats, slaves = (cluster.get(f"{API}/{p}").json() for p in ("status", "stats", "slaves"))
    assert stats["slave_counts"] == status["slaves"]
    by_name = {s["name"]: s for s in slaves["slaves"]}
    assert [s["name"] for s in stats["slaves"]] == list(by_name)
    for row in stats["slaves"]:
        assert set(row) == set(by_name[row["name"]])
        assert {k: row[k] for k in ("done", "failed", "slots", "state", "connected")} == \
            {k: by_name[row["name"]][k] for k in ("done", "failed", "slots", "state", "connected")}
    assert [s["name"] for s in stats["sweeps"]] == [s["name"] for s in status["sweeps"]]
    assert set(stats["sweeps"][0]) == set(status["sweeps"][0]) and {"uptime", "time", "last_event"} <= set(stats)


def test_running_counts_only_started_tickets_not_prefetched_ones(cluster: HttpCluster) -> None:
    # 2 slaves x 2 slots, each holding one more ticket ready (prefetch = 1): 6 out, 4 running.
    assert cluster.submit(spec("held", 12, command="sleep 3")).status == 201
    seen: list[tuple[int, int, int]] = []

    def six_out() -> bool:
        s = cluster.get(f"{API}/status").json()
        sweep = next(x for x in s["sweeps"] if x["name"] == "held")
        seen.append((sweep["running"], sweep["prefetched"], s["slaves"]["busy"]))
        return sweep["running"] + sweep["prefetched"] == 6 and sweep["prefetched"] == 2

    cluster.wait_for(six_out, 10, "4 running and 2 prefetched tickets")
    assert all(running <= 4 and busy <= 4 for running, _, busy in seen), seen
    slaves = cluster.get(f"{API}/slaves").json()["slaves"]
    assert sorted((s["running"], s["prefetched"]) for s in slaves if s["connected"]) == [(2, 1), (2, 1)]
    assert cluster.post(f"{API}/sweeps/held/cancel").status == 200


def test_metrics_of_both_processes_with_request_durations_and_bounded_series(tmp_path: Any) -> None:
    c = HttpCluster(tmp_path / "state", n=1, extra_config="http_metrics_keep = 1.0\n")
    try:
        assert c.submit(spec("old", 2)).status == 201
        c.wait_state("old", "finished")
        c.get(f"{API}/status")

        now = metric_samples(c)
        assert now[("process_resident_memory_bytes", ())] > 0  # the master's
        assert now[("ticketfarm_http_process_resident_memory_bytes", ())] > 0  # the HTTP process's
        key = ("ticketfarm_http_request_duration_seconds_count", (("method", "GET"), ("route", "/api/v1/status")))
        assert now[key] >= 1
        assert now[("ticketfarm_tasks", (("state", "done"), ("sweep", "old")))] == 2
        time.sleep(1.2)  # past http_metrics_keep: the ended sweep's series go, the totals keep it
        later = metric_samples(c)
        assert not [k for k in later if k[0] == "ticketfarm_tasks" and ("sweep", "old") in k[1]]
        assert later[("ticketfarm_tasks_all", (("state", "done"),))] == 2
        assert later[("ticketfarm_tickets_dispatched_total", ())] >= 2
    finally:
        c.close()


def metric_samples(cluster: HttpCluster) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = cluster.get("/metrics").body.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_forgotten_sweeps_series_leave_metrics_at_once(cluster: HttpCluster) -> None:
    assert cluster.submit(spec("forgotten", 3)).status == 201
    cluster.wait_state("forgotten", "finished")
    before = metric_samples(cluster)
    assert before[("ticketfarm_tasks", (("state", "done"), ("sweep", "forgotten")))] == 3
    forget = subprocess.run([sys.executable, "-m", "ticketfarm", "--state", str(cluster.state), "forget", "forgotten",
                             "--yes"], env=env(), capture_output=True, text=True, timeout=60)
    assert forget.returncode == 0, forget.stderr
    after = metric_samples(cluster)  # well inside http_metrics_keep (an hour): gone because the sweep is
    assert not [k for k in after if k[0] == "ticketfarm_tasks" and ("sweep", "forgotten") in k[1]]
    done = ("ticketfarm_tasks_all", (("state", "done"),))
    assert after.get(done, 0) == before[done] - 3


def test_a_cached_poll_is_served_before_routing_only_to_a_token_that_may_read(tmp_path: Any) -> None:
    c = HttpCluster(tmp_path / "state", n=0, extra_config="http_cache_ttl = 60.0\n")
    try:
        first = c.get(f"{API}/status", token=TOKEN)
        assert first.status == 200  # cached now, for a minute
        for headers in ({"Authorization": "Bearer wrong-token"}, {"X-Key": "wrong-token"},
                        {"Authorization": "Basic dXNlcjpwdw=="}):
            refused = c.get(f"{API}/status", headers=headers)
            assert refused.status == 401 and refused.error["code"] == "unauthorized", headers
        assert c.get(f"{API}/status").body == first.body  # reads are open on loopback
        assert c.get(f"{API}/slaves").status == 200  # another answer built (asking the master) keeps this one
        again = c.get(f"{API}/status", token=TOKEN)
        assert again.body == first.body and again.headers["Content-Type"] == "application/json"
        assert again.headers["Cache-Control"] == "no-store"
        head = c.request("HEAD", f"{API}/status", token=TOKEN)
        assert head.status == 200 and head.body == b"" and int(head.headers["Content-Length"]) == len(first.body)
        assert c.submit(spec("fresh", 1)).status == 201  # a change empties the cache
        assert [s["name"] for s in c.get(f"{API}/status", token=TOKEN).json()["sweeps"]] == ["fresh"]
        text = c.get("/metrics", token=TOKEN).body.decode()
        counted = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "ticketfarm_http_request_duration_seconds_count"
                   and s.labels == {"route": "/api/v1/status", "method": "GET"}]
        assert counted and counted[0] >= 5
    finally:
        c.close()


def test_binary_results_survive_a_table_collect(cluster: HttpCluster) -> None:
    png = b"\x89PNG\x00\xff"
    command = "printf '\\211PNG\\000\\377'"
    assert cluster.submit(spec("binary", 1, command=command)).status == 201
    cluster.wait_state("binary", "finished")
    line = json.loads(cluster.get(f"{API}/sweeps/binary/collect?format=jsonl").body)
    assert base64.b64decode(line["results"]["stdout"]["base64"]) == png
    row = cluster.get(f"{API}/sweeps/binary/collect?format=csv").body.decode().splitlines()[1]
    assert base64.b64decode(row.split(",")[-1].removeprefix("base64:")) == png


def test_the_http_process_is_its_own_and_restarted_by_the_master_if_it_dies(cluster: HttpCluster) -> None:
    pid = cluster.get(f"{API}/info").json()  # it answers; now find it among the master's children
    assert pid["http"] == cluster.url
    children = [int(p) for p in open(f"/proc/{cluster.master.pid}/task/{cluster.master.pid}/children").read().split()]
    http = [p for p in children if b"master.web" in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(http) == 1 and http[0] != cluster.master.pid
    os.kill(http[0], signal.SIGKILL)
    cluster.wait_for(lambda: cluster.get(f"{API}/status").status == 200, 20, "the HTTP process back")
    assert cluster.post(f"{API}/sweeps", {"spec": spec("after-restart", 1)}, token=TOKEN).status == 201

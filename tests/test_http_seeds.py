"""The seed job servers' users over HTTP alone: REX (submit with a key, progress, websocket completion,
collect-and-remove, a restart keeps what was not collected), joblauncher (POST with prestaged input files,
poststaged output files and a callback → 201 + Location, job status, DELETE), shutdown."""
from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from master.store import Store
from tests.httpcluster import API, TOKEN, HttpCluster, module_cluster, spec
from tests.test_callbacks import SECRET, Receiver



cluster = module_cluster("seeds")


def ws_url(cluster: HttpCluster, query: str) -> str:
    return cluster.url.replace("http://", "ws://") + f"{API}/events/ws?{query}"


async def ws_messages(url: str, headers: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """Every message of one websocket until the server closes it, and the close code."""
    async with connect(url, additional_headers=headers, open_timeout=10) as ws:
        messages = []
        try:
            while True:
                messages.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            return messages, ws.close_code


def test_rex_submit_with_key_progress_and_websocket_completion(cluster: HttpCluster) -> None:
    r = cluster.post(f"{API}/sweeps", {"spec": spec("rex", 3, command="echo started {x}; sleep 0.3; echo x={x}")},
                     token=None, headers={"X-Key": TOKEN})
    assert r.status == 201, r.body
    cluster.wait_for(lambda: cluster.sweep("rex")["running"] > 0 or cluster.sweep("rex")["state"] == "finished",
                     what="progress")
    events, code = asyncio.run(asyncio.wait_for(ws_messages(
        ws_url(cluster, "sweep=rex&until_end=1"), {"Authorization": f"Bearer {TOKEN}"}), 30))
    assert code == 1000
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "sweep_submitted" and kinds[-1] == "sweep_finished", kinds
    assert all(e["sweep"] == "rex" for e in events)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    # the same event objects as the SSE stream and the store
    sse = cluster.get(f"{API}/events?sweep=rex&until_end=1", timeout=30).body.decode()
    sse_ids = [int(line[4:]) for line in sse.splitlines() if line.startswith("id: ")]
    assert sse_ids == [e["id"] for e in events]
    assert cluster.sweep("rex")["done"] == 3


def test_rex_collect_and_remove_is_gone_after_and_a_restart_keeps_what_was_not_collected(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = {"X-Key": TOKEN}
    c = HttpCluster(state, n=1)
    try:
        for name in ("taken", "kept"):
            assert c.post(f"{API}/sweeps", {"spec": spec(name, 3)}, token=None, headers=key).status == 201
        for name in ("taken", "kept"):
            c.wait_state(name, "finished")
        kept = c.get(f"{API}/sweeps/kept/collect?format=csv").body
        r = c.post(f"{API}/sweeps/taken/collect", {"format": "csv", "remove": True}, token=None, headers=key)
        assert r.status == 200 and r.body.decode().splitlines()[1:] == ["0,0,x=0", "1,1,x=1", "2,2,x=2"]
        c.wait_for(lambda: c.sweep("taken")["results_removed"] is not None, what="the results removed")
        again = c.post(f"{API}/sweeps/taken/collect", {"format": "csv", "remove": True}, token=None, headers=key)
        assert again.status == 410 and again.error["code"] == "gone"
        assert "removed after collection" in again.error["message"]  # a reason, not an empty table
    finally:
        c.close()
    restarted = HttpCluster(state, n=1)
    try:
        assert restarted.get(f"{API}/sweeps/kept/collect?format=csv").body == kept
        assert restarted.get(f"{API}/sweeps/kept/tasks/2/results/stdout").body == b"x=2\n"
        gone = restarted.get(f"{API}/sweeps/taken/collect?format=csv")
        assert gone.status == 410 and "removed after collection" in gone.error["message"]
    finally:
        restarted.close()


def test_websocket_refusals_are_json_with_policy_close(cluster: HttpCluster) -> None:
    messages, code = asyncio.run(ws_messages(ws_url(cluster, "sweep=ghost")))
    assert code == 1008 and messages[0]["error"]["code"] == "not_found"
    messages, code = asyncio.run(ws_messages(ws_url(cluster, "until_end=1")))
    assert code == 1008 and messages[0]["error"]["field"] == "until_end"
    messages, code = asyncio.run(ws_messages(ws_url(cluster, "token=wrong")))
    assert code == 1008 and messages[0]["error"]["code"] == "unauthorized"


def test_websocket_follows_new_events_until_the_client_leaves(cluster: HttpCluster) -> None:
    async def follow() -> list[dict[str, Any]]:
        async with connect(ws_url(cluster, f"token={TOKEN}"), open_timeout=10) as ws:
            await asyncio.to_thread(cluster.submit, spec("follow", 2))
            seen: list[dict[str, Any]] = []
            while not any(e["kind"] == "sweep_finished" for e in seen):
                seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return seen

    seen = asyncio.run(follow())
    assert seen[0]["kind"] == "sweep_submitted" and {e["sweep"] for e in seen} == {"follow"}


def test_joblauncher_post_without_name_or_parameters_is_one_job_at_its_location(cluster: HttpCluster) -> None:
    r = cluster.submit({"command": "echo hello from one job", "timeout": 20})
    assert r.status == 201, r.body
    location = r.headers["Location"]
    name = r.json()["sweep"]
    assert location == f"{API}/sweeps/{name}" and r.json()["tasks"] == 1 and name.startswith("job-")
    assert cluster.submit({"command": "echo hello from one job", "timeout": 20}).json()["sweep"] != name
    cluster.wait_for(lambda: cluster.get(location).json()["state"] == "finished", what="the job to finish")
    job = cluster.get(location).json()
    assert job["total"] == 1 and job["done"] == 1 and job["spec"]["parameters"] == []
    assert cluster.get(f"{location}/collect?format=concat").body == b"hello from one job\n"
    assert cluster.get(f"{location}/collect?format=csv").body.decode().splitlines()[1:] == ["0,hello from one job"]


def test_joblauncher_post_with_prestaged_and_poststaged_files_and_a_callback(cluster: HttpCluster) -> None:
    """Prestaged: files sent with the POST become the job's inputs; poststaged: files the job writes are its
    results, fetched one by one (or as a tar with format=folders); the callback hears the job end."""
    blob = bytes(range(256)) * 4
    receiver = Receiver(204)
    try:
        r = cluster.submit({"command": "tr a-z A-Z < in.txt > out.txt && cp data.bin out.bin && wc -c < data.bin",
                            "timeout": 20,
                            "inputs": [{"name": "in.txt", "source": "in.txt"},
                                       {"name": "data.bin", "source": "data.bin"}],
                            "results": {"text": "file:out.txt", "blob": "file:out.bin", "size": "stdout"}},
                           files={"in.txt": "hello joblauncher\n", "data.bin": {"base64": base64.b64encode(blob).decode()}},
                           status_callback_url=receiver.url, status_callback_secret=SECRET)
        assert r.status == 201, r.body
        location = r.headers["Location"]
        cluster.wait_for(lambda: cluster.get(f"{location}/status").json()["state"] == "DONE", what="the job done")
        status = cluster.get(f"{location}/status").json()
        assert status["exit_code"] == 0 and status["tasks"][0]["state"] == "DONE"
        assert cluster.get(f"{location}/tasks/0/results/text").body == b"HELLO JOBLAUNCHER\n"
        assert cluster.get(f"{location}/tasks/0/results/blob").body == blob
        assert cluster.get(f"{location}/collect?format=csv").body.decode().splitlines()[1].endswith(",1024")
        cluster.wait_for(lambda: any(p["state"] == "finished" for _, p in receiver.posts), what="the callback")
        ends = [p for _, p in receiver.posts if p["state"] == "finished"]
        assert ends[0]["sweep"] == r.json()["sweep"] and ends[0]["counts"]["done"] == 1

        deleted = cluster.request("DELETE", location, token=TOKEN)
        assert deleted.status == 200 and deleted.json()["results_removed"] is True
        assert cluster.get(f"{location}/tasks/0/results/blob").status == 410
        assert cluster.get(f"{location}/status").json()["state"] == "DONE"
    finally:
        receiver.close()


def test_joblauncher_status_gives_each_task_state_and_exit_code(cluster: HttpCluster) -> None:
    s = spec("codes", 3, command='echo x={x}; exit $(( {x} == 1 ? 3 : 0 ))', max_attempts=1)
    location = cluster.submit(s).headers["Location"]
    cluster.wait_state("codes", "finished")
    status = cluster.get(f"{location}/status").json()
    assert status["state"] == "FAILED" and status["exit_code"] is None and status["total"] == 3
    assert [(t["state"], t["exit_code"]) for t in status["tasks"]] == [("DONE", 0), ("FAILED", 3), ("DONE", 0)]
    assert status["counts"] == {"QUEUED": 0, "RUNNING": 0, "DONE": 2, "FAILED": 1, "KILLED": 0}
    page = cluster.get(f"{location}/status?offset=1&limit=1").json()
    assert [t["task"] for t in page["tasks"]] == [1] and page["next"] == 2
    assert cluster.get(f"{API}/sweeps/ghost/status").status == 404

    r = cluster.request("DELETE", location, token=TOKEN)
    assert r.status == 200 and r.json() == {"sweep": "codes", "state": "finished", "cancelled": False,
                                            "results_removed": True}
    assert cluster.get(f"{location}/collect?format=concat").status == 410
    assert cluster.get(f"{location}/status").json()["state"] == "FAILED"  # the record stays


def test_joblauncher_delete_cancels_a_running_job_and_removes_its_outputs(cluster: HttpCluster) -> None:
    r = cluster.submit({"command": "echo partial; sleep 60", "timeout": 120})
    assert r.status == 201
    location = r.headers["Location"]
    cluster.wait_for(lambda: cluster.get(f"{location}/status").json()["state"] == "RUNNING"
                     and cluster.sweep(r.json()["sweep"])["running"] == 1, what="the job to run")
    assert cluster.request("DELETE", location).status == 401
    deleted = cluster.request("DELETE", location, token=TOKEN)
    assert deleted.status == 200 and deleted.json()["cancelled"] is True and deleted.json()["state"] == "cancelled"
    status = cluster.get(f"{location}/status").json()
    assert status["state"] == "KILLED" and status["tasks"][0]["state"] == "KILLED"
    assert cluster.get(f"{location}/collect?format=concat").status == 410
    cluster.wait_for(lambda: cluster.sweep(r.json()["sweep"])["running"] == 0, what="the ticket killed")
    assert cluster.request("DELETE", location, token=TOKEN).status == 200  # deleting again changes nothing
    assert cluster.request("DELETE", f"{API}/sweeps/ghost", token=TOKEN).status == 404


def test_shutdown_over_http_stops_the_master_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    c = HttpCluster(state, n=1)
    try:
        c.slaves.append(c.start_slave("leaver", 2, "--exit-on-shutdown"))
        c.wait_for(lambda: len([s for s in c.get(f"{API}/slaves").json()["slaves"] if s["connected"]]) == 2,
                   what="the second slave")
        assert c.submit(spec("halfway", 16, command="sleep 0.2; echo x={x}")).status == 201
        c.wait_for(lambda: c.sweep("halfway")["done"] >= 3, what="some tasks done")
        assert c.post(f"{API}/shutdown", token=None).status == 401
        done_before = c.sweep("halfway")["done"]
        r = c.post(f"{API}/shutdown")
        assert r.status == 202 and r.json() == {"state": "stopping"}
        assert c.master.wait(timeout=15) == 0
        assert c.slaves[-1].wait(timeout=15) == 0  # told: a slave that exits on the master's shutdown did
    finally:
        c.close()
    store = Store(state / "state.db", readonly=True)
    try:
        assert store.task_counts("halfway").get("done", 0) >= done_before  # every acknowledged result is stored
    finally:
        store.close()
    again = HttpCluster(state, n=1)  # the same state: the sweep goes on where it stopped
    try:
        again.wait_state("halfway", "finished")
        lines = again.get(f"{API}/sweeps/halfway/collect?format=concat").body.decode().splitlines()
        assert lines == [f"x={x}" for x in range(16)]
    finally:
        again.close()

"""pRouter's users over HTTP alone: info, agents, a job pinned to a chosen agent, files uploaded into its sandbox,
its own HTTP server and websocket reached through the API, a file it wrote downloaded, shutdown."""
from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.httpcluster import TOKEN, HttpCluster, spec

API = "/api/v1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB = (Path(__file__).parent / "prouter_job.py").read_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = HttpCluster(tmp_path_factory.mktemp("prouter") / "state", n=2)
    yield c
    c.close()


def job_spec(**extra: Any) -> dict[str, Any]:
    return {"argv": [sys.executable, "job.py"], "timeout": 60, "max_attempts": 1,
            "inputs": [{"name": "job.py", "source": "job.py"}],
            "results": {"out": "file:out.txt", "stdout": "stdout"}, **extra}


def ws_url(cluster: HttpCluster, path: str) -> str:
    return cluster.url.replace("http://", "ws://") + path


def attempts_slaves(cluster: HttpCluster, name: str, task: int = 0) -> list[str]:
    return [a["slave"] for a in cluster.get(f"{API}/sweeps/{name}/tasks/{task}").json()["attempts_list"]]


def test_a_pinned_sweep_runs_only_on_its_slaves(cluster: HttpCluster) -> None:
    assert cluster.submit(spec("pin-one", 6, command="sleep 0.05; echo {x}", slaves=["s2"])).status == 201
    assert cluster.submit(spec("pin-both", 4, slaves=["s1", "s2"])).status == 201
    cluster.wait_state("pin-one", "finished")
    cluster.wait_state("pin-both", "finished")
    assert {s for t in range(6) for s in attempts_slaves(cluster, "pin-one", t)} == {"s2"}
    assert {s for t in range(4) for s in attempts_slaves(cluster, "pin-both", t)} <= {"s1", "s2"}
    detail = cluster.sweep("pin-one")
    assert detail["spec"]["slaves"] == ["s2"] and detail["pin"] == {"slaves": ["s2"], "connected": ["s2"],
                                                                    "waiting": None}
    assert cluster.sweep("pin-both")["done"] == 4


def test_a_pin_naming_no_known_slave_says_why_it_waits(cluster: HttpCluster) -> None:
    r = cluster.submit({"command": "echo never", "timeout": 10, "slaves": ["h9"]})
    assert r.status == 201, r.body
    name = r.json()["sweep"]
    pin = cluster.get(r.headers["Location"]).json()["pin"]
    assert pin == {"slaves": ["h9"], "connected": [],
                   "waiting": "none of its slaves takes tickets: never seen: h9"}
    kinds = [e for e in _events(cluster, name) if e["kind"] == "pin_unknown"]
    assert kinds and kinds[0]["detail"]["slaves"] == ["h9"] and "h9" in kinds[0]["detail"]["reason"]
    assert cluster.get(f"{API}/sweeps/{name}/status").json()["state"] == "QUEUED"
    bad = cluster.submit({"command": "echo x", "slaves": "s1"})
    assert bad.status == 400 and bad.error["field"] == "slaves"
    assert cluster.request("DELETE", r.headers["Location"], token=TOKEN).json()["cancelled"] is True


def _events(cluster: HttpCluster, sweep: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with connect(ws_url(cluster, f"{API}/events/ws?sweep={sweep}&after=0&token={TOKEN}")) as ws:
            while True:
                try:
                    out.append(json.loads(await asyncio.wait_for(ws.recv(), 1.0)))
                except TimeoutError:
                    return out
    return asyncio.run(read())


def test_prouter_flow_over_http_alone(cluster: HttpCluster) -> None:
    http = httpx.Client(base_url=cluster.url, headers=AUTH, timeout=30, trust_env=False)
    info = http.get(f"{API}/info").json()
    assert info["name"] == "ticketfarm"
    agents = {s["name"] for s in http.get(f"{API}/slaves").json()["slaves"] if s["connected"]}
    assert agents == {"s1", "s2"}

    # A job on a chosen agent: s2, drained first so the job stays queued while a file is uploaded into it.
    assert http.post(f"{API}/slaves/s2/drain").status_code == 200
    r = http.post(f"{API}/sweeps", json={"spec": job_spec(slaves=["s2"]), "files": {"job.py": JOB}})
    assert r.status_code == 201, r.text
    job = r.headers["Location"]
    time.sleep(0.5)  # several dispatch passes: s1 is free, yet never given the pinned job
    assert http.get(f"{job}/status").json()["state"] == "QUEUED"
    assert http.get(job).json()["pin"]["waiting"] == "none of its slaves takes tickets: draining: s2"
    put = http.put(f"{job}/tasks/0/sandbox/in/data.txt", content=b"uploaded while queued")
    assert put.status_code == 201 and put.json()["placed"] == "staged", put.text
    assert [f["path"] for f in http.get(f"{job}/tasks/0/sandbox").json()["files"]] == ["in/data.txt"]
    assert http.post(f"{API}/slaves/s2/undrain").status_code == 200

    # Running: reach its own HTTP server (502 with the reason until it announced its port and listens).
    relay = f"{job}/tasks/0/http"
    cluster.wait_for(lambda: http.get(f"{relay}/hello").status_code == 200, timeout=60, what="the job's server")
    assert attempts_slaves(cluster, r.json()["sweep"]) == ["s2"]
    answer = http.post(f"{relay}/echo/it?a=1&b=two", content=b"payload", headers={"X-Custom": "yes"})
    assert answer.status_code == 200 and answer.headers["x-job"] == "prouter"
    assert answer.headers.get_list("set-cookie") == ["a=1", "b=2"]
    echoed = answer.json()
    assert (echoed["method"], echoed["path"], echoed["query"], echoed["body"]) == ("POST", "/echo/it", "a=1&b=two",
                                                                                    "payload")
    assert echoed["headers"]["x-custom"] == "yes" and "authorization" not in echoed["headers"]
    assert http.get(f"{relay}/x?file=in/data.txt").json()["file"] == "uploaded while queued"
    missing = http.delete(f"{relay}/missing")
    assert missing.status_code == 404 and missing.json()["method"] == "DELETE"  # the job's own 404, relayed
    assert http.get(f"{relay}/hello", headers={"Authorization": ""}).status_code == 401

    # Upload into the running job: written into its live work dir.
    live = http.put(f"{job}/tasks/0/sandbox/live.txt", content=b"uploaded while running")
    assert live.status_code == 201 and live.json()["placed"] == "work dir"
    assert http.get(f"{relay}/x?file=live.txt").json()["file"] == "uploaded while running"

    # Its websocket, both ways, with its own close code.
    async def talk() -> tuple[list[Any], int | None, str | None]:
        async with connect(ws_url(cluster, f"{relay}/ws/path?q=1&token={TOKEN}"), open_timeout=20) as ws:
            got = [await ws.recv()]
            await ws.send("hi")
            got.append(await ws.recv())
            await ws.send(b"\x00\x01\x02")
            got.append(await ws.recv())
            await ws.send("bye")
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed:
                pass
            return got, ws.close_code, ws.close_reason

    got, code, reason = asyncio.run(talk())
    assert got == ["hello /ws/path q=1", "echo:hi", b"\x02\x01\x00"] and (code, reason) == (4000, "bye from the job")

    # Its files while it runs: listed (never the symlink out, never the slave's own), downloaded, path-checked.
    files = {f["path"]: f for f in http.get(f"{job}/tasks/0/sandbox").json()["files"]}
    assert {"job.py", "in/data.txt", "live.txt", "progress.txt", ".ticketfarm/http-port"} <= set(files)
    assert not any(p.startswith(("escape", ".tf-")) for p in files)
    assert http.get(f"{job}/tasks/0/sandbox/progress.txt").content == b"started\n"
    assert http.get(f"{job}/tasks/0/sandbox/job.py").text == JOB
    escape = http.get(f"{job}/tasks/0/sandbox/escape/hostname")
    assert escape.status_code == 400 and "leaves the work dir" in escape.json()["error"]["message"]
    assert http.put(f"{job}/tasks/0/sandbox/escape/x", content=b"x").status_code == 400
    dotdot = http.put(f"{job}/tasks/0/sandbox/a/%2E%2E/%2E%2E/x", content=b"x")
    assert dotdot.status_code == 400 and dotdot.json()["error"]["field"] == "path"
    assert http.get(f"{job}/tasks/0/sandbox/nothing-here").status_code == 404
    big = http.put(f"{job}/tasks/0/sandbox/big.bin", content=b"x" * (4 * 1024 * 1024 + 1))
    assert big.status_code == 413 and "largest sandbox file" in big.json()["error"]["message"]

    measure_relay_latency(http, relay, files[".ticketfarm/http-port"]["url"])

    # Done when asked; then what it wrote stays, the live routes say why they cannot answer.
    assert http.post(f"{relay}/stop").status_code == 200
    cluster.wait_for(lambda: http.get(f"{job}/status").json()["state"] == "DONE", what="the job to end")
    kept = http.get(f"{job}/tasks/0/sandbox").json()
    assert kept["where"] == "results" and [f["path"] for f in kept["files"]] == ["out.txt"]
    out = http.get(f"{job}/tasks/0/sandbox/out.txt")
    assert out.status_code == 200 and out.content == b"written by the job: uploaded while queued"
    gone = http.get(f"{relay}/hello")
    assert gone.status_code == 409 and "not running" in gone.json()["error"]["message"]
    assert http.put(f"{job}/tasks/0/sandbox/late.txt", content=b"x").status_code == 409
    assert http.get(f"{job}/tasks/0/sandbox/progress.txt").status_code == 404

    async def refused() -> int:
        try:
            async with connect(ws_url(cluster, f"{relay}/ws?token={TOKEN}")):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code
    assert asyncio.run(refused()) == 409


def measure_relay_latency(http: httpx.Client, relay: str, port_url: str, n: int = 40) -> None:
    """Round trips of a small GET through the API (API → master → slave → job) and straight to the job."""
    port = int(http.get(port_url).text)
    direct = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False)

    def timed(client: httpx.Client, path: str) -> float:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            assert client.get(path).status_code == 200
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    shim, straight = timed(http, f"{relay}/hello"), timed(direct, "/hello")
    print(f"\nrelay round trip (median of {n}): through the API {shim:.2f} ms, direct {straight:.2f} ms")
    assert shim < 1000


def test_a_slow_task_times_out_and_a_slave_that_leaves_ends_its_relays_with_the_reason(tmp_path: Path) -> None:
    c = HttpCluster(tmp_path / "state", n=1, extra_config="relay_timeout = 1.5\n")
    try:
        http = httpx.Client(base_url=c.url, headers=AUTH, timeout=30, trust_env=False)
        r = http.post(f"{API}/sweeps", json={"spec": job_spec(), "files": {"job.py": JOB}})
        relay = f"{r.headers['Location']}/tasks/0/http"
        c.wait_for(lambda: http.get(f"{relay}/hello").status_code == 200, timeout=60, what="the job's server")
        slow = http.get(f"{relay}/slow")
        assert slow.status_code == 504 and "did not answer relay_http within 1.5s" in slow.json()["error"]["message"]

        async def killed_meanwhile() -> tuple[int | None, str | None]:
            async with connect(ws_url(c, f"{relay}/ws?token={TOKEN}"), open_timeout=20) as ws:
                await ws.recv()
                c.slaves[0].kill()  # no goodbye: the master finds it silent
                try:
                    await asyncio.wait_for(ws.recv(), 20)
                except ConnectionClosed:
                    pass
                return ws.close_code, ws.close_reason

        code, reason = asyncio.run(killed_meanwhile())
        assert code == 1011 and reason == "slave s1 disconnected"
        gone = http.get(f"{relay}/hello")
        assert gone.status_code == 409 and "not running" in gone.json()["error"]["message"]
    finally:
        c.close()


def test_staged_uploads_outlive_a_master_restart_and_go_with_their_sweep(tmp_path: Path) -> None:
    from master.sandbox import Staging
    from master.scheduler import Ticket
    from ticketfarm.errors import TaskUnreachable

    staging = Staging(tmp_path, task_bytes=10)
    staging.put("s", 3, "in/a.txt", b"12345")
    staging.put("s", 3, "in/a.txt", b"123456")  # replaced, not added up
    with pytest.raises(TaskUnreachable, match="sandbox_task_bytes") as refused:
        staging.put("s", 3, "b.txt", b"12345")
    assert refused.value.code == "too_large"
    ticket = Ticket(1, "s", 3, "h1", 1, 0.0, 0.0)
    again = Staging(tmp_path, task_bytes=10)
    assert again.of(ticket) == [("in/a.txt", b"123456")] and again.of(Ticket(2, "s", 4, "h1", 1, 0.0, 0.0)) == []
    again.drop_sweep("s")
    assert again.of(ticket) == [] and not (tmp_path / "sandbox" / "s").exists()


def test_shutdown_over_http(tmp_path: Path) -> None:
    c = HttpCluster(tmp_path / "state", n=1)
    try:
        assert c.post(f"{API}/shutdown").status == 202
        assert c.master.wait(timeout=15) == 0
    finally:
        c.close()

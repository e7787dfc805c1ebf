"""HTTP API auth against a real master: nothing submitted over HTTP runs on the master host, named tokens live."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.httpcluster import ROOT, TOKEN, HttpCluster, env, spec

API = "/api/v1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = HttpCluster(tmp_path_factory.mktemp("auth") / "state", n=1)
    yield c
    c.close()


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ticketfarm", "--state", str(state), *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def new_token(state: Path, *args: str) -> str:
    r = cli(state, "token", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_a_validator_or_workers_submitted_over_http_is_refused_naming_the_field(cluster: HttpCluster) -> None:
    pwned = cluster.state / "pwned"
    shell = f"ls {cluster.state / 'keys'} > {pwned}"
    cases = [
        ({"spec": spec("v-cmd", 2, validate=shell)}, "validate"),
        ({"spec": spec("v-table", 2, validate={"command": shell})}, "validate"),
        ({"spec": spec("v-py", 2, validate={"python": "os:system"})}, "validate"),
        ({"spec": spec("v-file", 2, validate={"python": "v.py:check"}), "files": {"v.py": "def check(p, r): 1"}},
         "validate"),
        ({"spec": spec("w", 2, command="{worker}", workers={"linux-x86_64": "w.sh"}),
          "files": {"w.sh": "#!/bin/sh\ntrue\n"}}, "workers"),
        ({"toml": f'name = "v-toml"\ncommand = "true"\nvalidate = "{shell}"\n[parameters]\ngrid = {{x = [1]}}\n'},
         "validate"),
    ]
    for body, field in cases:
        r = cluster.post(f"{API}/sweeps", body)
        assert r.status == 400, r.body
        assert r.error["field"] == field and "http_allow_master_code" in r.error["message"], r.error
    assert not pwned.exists()
    names = {s["name"] for s in cluster.get(f"{API}/sweeps").json()["sweeps"]}
    assert not names & {"v-cmd", "v-table", "v-py", "v-file", "w", "v-toml"}


def test_named_tokens_have_scopes_and_are_added_and_revoked_without_a_restart(cluster: HttpCluster) -> None:
    reader = new_token(cluster.state, "add", "reader", "--scope", "read")
    submitter = new_token(cluster.state, "add", "ci")
    assert cli(cluster.state, "token", "add", "ci").returncode != 0  # a name is not silently replaced
    listed = cli(cluster.state, "token", "list").stdout
    assert "reader" in listed and "read,submit" in listed and reader not in listed
    assert reader not in (cluster.state / "http-tokens.json").read_text()

    assert cluster.get(f"{API}/status", headers={"X-Key": reader}).status == 200
    r = cluster.post(f"{API}/sweeps", {"spec": spec("by-reader", 1)}, token=reader)
    assert r.status == 403 and r.error["code"] == "forbidden" and "submit" in r.error["message"]
    assert cluster.post(f"{API}/sweeps", {"spec": spec("by-ci", 1)}, token=submitter).status == 201
    r = cluster.post(f"{API}/slaves/s1/drain", token=submitter)
    assert r.status == 403 and "admin" in r.error["message"]

    assert cli(cluster.state, "token", "revoke", "ci").returncode == 0
    cluster.wait_for(lambda: cluster.get(f"{API}/status", headers={"X-Key": submitter}).status == 401, 5,
                     "the revoked token refused")
    r = cluster.post(f"{API}/sweeps", {"spec": spec("by-revoked", 1)}, token=submitter)
    assert r.status == 401 and r.error["code"] == "unauthorized"
    assert cluster.get(f"{API}/status", headers={"X-Key": reader}).status == 200
    assert cluster.post(f"{API}/sweeps", {"spec": spec("by-config", 1)}).status == 201  # master.toml's token


def test_token_write_replaces_the_default_token_and_the_old_one_stops_working(cluster: HttpCluster) -> None:
    first = new_token(cluster.state, "--write")
    assert (cluster.state / "http.token").read_text().strip() == first
    cluster.wait_for(lambda: cluster.get(f"{API}/status", headers={"X-Key": first}).status == 200, 5,
                     "the written token accepted")
    second = new_token(cluster.state, "--write")
    assert second != first and (cluster.state / "http.token").read_text().strip() == second
    cluster.wait_for(lambda: cluster.get(f"{API}/status", headers={"X-Key": first}).status == 401, 5,
                     "the replaced token refused")
    assert cluster.get(f"{API}/status", headers={"X-Key": second}).status == 200
    assert (cluster.state / "http.token").stat().st_mode & 0o777 == 0o600
    assert (cluster.state / "http-tokens.json").stat().st_mode & 0o777 == 0o600


def test_allowed_master_code_still_needs_an_admin_token(tmp_path: Path) -> None:
    c = HttpCluster(tmp_path / "state", n=0, extra_config="http_allow_master_code = true\n")
    try:
        submitter = new_token(c.state, "add", "ci", "--scope", "submit")
        validated = spec("validated", 1, validate="test -s {results[stdout]}")
        r = c.post(f"{API}/sweeps", {"spec": validated}, token=submitter)
        assert r.status == 403 and r.error["field"] == "validate"
        assert c.post(f"{API}/sweeps", {"spec": validated}, token=TOKEN).status == 201
    finally:
        c.close()


def test_the_api_runs_on_its_own_with_ticketfarm_http(master: Any, tmp_path: Path) -> None:
    """`ticketfarm http` beside a master that serves no HTTP itself: a client of it like the CLI."""
    import json
    import urllib.request

    from tests.conftest import free_port, wait_for

    token = new_token(master.state, "add", "ops")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(master.state), "http",
                             "--bind", f"127.0.0.1:{port}"], env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{port}"

        def info() -> dict[str, Any] | None:
            try:
                with opener.open(url + f"{API}/info", timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                return None

        answer = wait_for(info, 20, "the HTTP process")
        assert answer["endpoint"] == master.endpoint and answer["epoch"] >= 1 and answer["started"] is None
        body = json.dumps({"spec": spec("alone", 1)}).encode()
        request = urllib.request.Request(url + f"{API}/sweeps", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        with opener.open(request, timeout=10) as r:
            assert r.status == 201
        assert master.control("status")["sweeps"][0]["name"] == "alone"
    finally:
        proc.terminate()
        proc.wait(10)

"""Slaves from a real one-node Slurm (scripts/slurm-single-node.sh): submission, scancel, walltime, restart, refusal."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from master.store import Store
from tests.conftest import REPO, MasterProcess, free_port, run_cli, wait_for, write_spec
from tests.walkthrough import Shell, commands, walkthroughs

SCRIPT = REPO / "scripts" / "slurm-single-node.sh"
#: CPUs the test node offers (more than the machine has: slurm.conf's config_overrides allows it): one job of
#: README's queue (2 slaves x 4 slots); tests that make jobs pend count on there being no more.
CPUS = 8
#: The scheduler commands, logged by the shims on PATH: how many calls a sweep costs.
SHIMMED = ("sbatch", "squeue", "scancel")


def controller_port() -> int:
    """A port for slurmctld with the next one free for slurmd, below the kernel's ephemeral range (which outgoing
    connections take from at any moment)."""
    for _ in range(200):
        port = random.randrange(20000, 30000, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no two free ports for slurmctld and slurmd")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """One Slurm cluster for the module (munged, slurmctld, slurmd); every command it runs is counted."""
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("needs root and Debian's slurm-wlm and munge packages (.ci/run installs them)")
    state = Path(f"/tmp/tfslurm-{os.getpid()}")  # munge and slurmstepd put sockets in it: keep it short
    port = controller_port()
    env = {**os.environ, "SLURM_TEST_DIR": str(state), "SLURM_TEST_CPUS": str(CPUS), "SLURM_TEST_PORT": str(port)}
    shims = tmp_path_factory.mktemp("shims")
    calls = shims / "calls.log"
    for name in SHIMMED:
        shim = shims / name
        shim.write_text(f'#!/bin/sh\necho {name} >> {calls}\nexec {shutil.which(name)} "$@"\n')
        shim.chmod(0o755)
    up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=60)
    if up.returncode != 0:  # the logs are in the message: leave no state dir behind
        subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, timeout=60)
    assert up.returncode == 0, up.stdout + up.stderr
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    os.environ["PATH"] = f"{shims}{os.pathsep}{os.environ['PATH']}"
    try:
        yield calls
    finally:
        for key, value in saved.items():
            os.environ[key] = value if value is not None else ""
        subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, timeout=60)


@pytest.fixture
def cluster(slurm: Path, tmp_path: Path):
    """Masters started by a test are stopped, and every job it left is cancelled, when it ends."""
    masters: list[MasterProcess] = []

    def start(queue: str = "", **extra: Any) -> MasterProcess:
        config = "alloc_poll_interval = 0.3\nalloc_backoff = 1.0\n" + "".join(f"{k} = {v}\n" for k, v in extra.items())
        if queue:
            config += f'[alloc.q]\nslave_command = "{sys.executable} -m slave"\n{queue}'
        m = MasterProcess(tmp_path / "state", f"tcp://127.0.0.1:{free_port()}", config).start()
        masters.append(m)
        return m

    yield start
    for m in masters:
        m.stop()
    subprocess.run(["scancel", "--me"], capture_output=True)
    wait_for(lambda: not squeue(), 30, "the test's jobs to end")


def squeue(states: str = "PD,R,CG") -> list[str]:
    out = subprocess.run(["squeue", "-h", "-t", states, "-o", "%i %t"], capture_output=True, text=True).stdout
    return out.split("\n")[:-1]


def alloc(master: MasterProcess, action: str, **fields: Any) -> dict[str, Any]:
    reply = master.control("alloc", action=action, **fields)
    assert reply["ok"], reply
    return reply


def jobs(master: MasterProcess) -> list[dict[str, Any]]:
    return alloc(master, "list")["queues"][0]["jobs"]


def ticket_rows(master: MasterProcess, sweep: str) -> list[tuple[Any, ...]]:
    store = Store(master.state / "state.db", readonly=True)
    try:
        return store.db.execute("SELECT task, slave, state, dispatched, finished FROM tickets WHERE sweep = ?",
                                (sweep,)).fetchall()
    finally:
        store.close()


def done_once(master: MasterProcess, sweep: str, tasks: int) -> list[tuple[Any, ...]]:
    """The sweep's tickets, after checking that every task has exactly one done ticket."""
    rows = ticket_rows(master, sweep)
    done = sorted(task for task, _, state, _, _ in rows if state == "done")
    assert done == list(range(tasks)), [r for r in rows if r[0] not in done or done.count(r[0]) > 1]
    return rows


def sweep_spec(tmp_path: Path, name: str, tasks: int, command: str, timeout: float = 30, attempts: int = 3) -> Path:
    return write_spec(tmp_path, f"""
        name = "{name}"
        command = "{command}"
        timeout = {timeout}
        max_attempts = {attempts}
        [parameters.grid]
        n = {{range = [{tasks}]}}
    """, f"{name}.toml")


def test_200_tasks_complete_on_slaves_that_exist_only_as_slurm_jobs(cluster, slurm: Path, tmp_path: Path) -> None:
    master = cluster()
    added = run_cli("--state", str(master.state), "alloc", "add", "q", "--walltime", "2m", "--slaves-per-job", "2",
                    "--slots", "2", "--idle-timeout", "1", "--handback", "10", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    calls_before = len(slurm.read_text().split()) if slurm.exists() else 0
    spec = sweep_spec(tmp_path, "sweep200", 200, f"echo {{n}} >> {tmp_path}/runs.log; echo {{n}}")
    submitted = time.time()
    master.submit(spec)
    master.wait_finished("sweep200", 90)
    rows = done_once(master, "sweep200", 200)
    assert sorted(int(x) for x in (tmp_path / "runs.log").read_text().split()) == list(range(200))  # each ran once
    assert all(slave.startswith("q-j") for _, slave, _, _, _ in rows)  # no slave but those of Slurm jobs
    first = min(finished for _, _, state, _, finished in rows if state == "done")
    # Idle slaves leave: every job ends by itself, having run its slaves.
    wait_for(lambda: all(j["ended"] for j in jobs(master)), 30, "the jobs to end once their slaves idle")
    ran = [j for j in jobs(master) if j["state"] == "completed"]
    assert ran and all(j["exit_code"] == 0 for j in ran)
    listed = run_cli("--state", str(master.state), "alloc", "list", cwd=tmp_path)
    assert listed.returncode == 0 and f"job {ran[0]['id']} ({ran[0]['native_id']}) completed" in listed.stdout
    calls = slurm.read_text().split()[calls_before:]
    print(f"\nsubmit -> first result through Slurm: {first - submitted:.2f}s; scheduler calls for the sweep: "
          + ", ".join(f"{calls.count(c)} {c}" for c in SHIMMED) + f"; jobs {len(jobs(master))}")


def test_job_scancelled_mid_run_its_tickets_are_requeued_and_a_new_job_finishes(cluster, tmp_path: Path) -> None:
    master = cluster("slots_per_slave = 2\nmax_running = 1\nmax_pending = 1\nidle_timeout = 1.0\nhandback = 5.0\n")
    master.submit(sweep_spec(tmp_path, "cancelled", 40, "sleep 0.2; echo {n}"))
    first = wait_for(lambda: next((j for j in jobs(master) if j["state"] == "running" and j["slaves_seen"]), None),
                     30, "a job whose slave connected")
    wait_for(lambda: (master.sweep_status("cancelled") or {}).get("done", 0) >= 4, 30, "some tasks done")
    subprocess.run(["scancel", first["native_id"]], check=True)
    try:
        master.wait_finished("cancelled", 120)
    except AssertionError as exc:  # say where it stuck: the jobs and the tickets not done
        stuck = [r for r in ticket_rows(master, "cancelled") if r[2] != "done"]
        raise AssertionError(f"{exc}; jobs {jobs(master)}; tickets not done {stuck[-10:]}") from None
    rows = done_once(master, "cancelled", 40)
    # its slave was lost, or (SIGTERM from scancel) said goodbye in order and gave its tickets back
    assert any(state in ("lost", "interrupted") and slave.startswith(f"q-j{first['id']}-")
               for _, slave, state, _, _ in rows)
    assert any(slave.startswith("q-j") and not slave.startswith(f"q-j{first['id']}-") for _, slave, _, _, _ in rows)
    by_id = {j["id"]: j for j in jobs(master)}
    assert by_id[first["id"]]["state"] == "cancelled" and len(by_id) >= 2


def test_walltime_shorter_than_the_sweep_slaves_hand_back_before_the_kill(cluster, tmp_path: Path) -> None:
    master = cluster("walltime = 8.0\nhandback = 2.0\nslots_per_slave = 2\nmax_running = 3\nmax_pending = 3\n"
                     "idle_timeout = 1.0\n")
    # One attempt only: a ticket handed back is not counted, one killed by the walltime would fail its task.
    # A slave takes tickets until 8 - 2 - 2.5 s after its job started: more work than one wave of jobs does.
    master.submit(sweep_spec(tmp_path, "walltime", 40, "sleep 0.5; echo {n}", timeout=2.5, attempts=1))
    master.wait_finished("walltime", 120)
    rows = done_once(master, "walltime", 40)
    states = {state for _, _, state, _, _ in rows}
    assert states == {"done", "returned"}, states  # handed back unstarted; nothing lost, nothing killed mid-run
    ended = wait_for(lambda: (js := jobs(master)) and all(j["ended"] for j in js) and js, 30, "every job to end")
    assert len({j["id"] for j in ended}) >= 2  # the sweep outlasted one allocation
    assert all(j["state"] in ("completed", "cancelled") for j in ended), ended  # none reached its time limit
    for job in (j for j in ended if j["started"]):
        end = job["started"] + 8.0
        last = max((f for _, s, _, _, f in rows if s.startswith(f"q-j{job['id']}-") and f), default=0)
        assert last <= end, (job, last - end)


def test_master_sigkilled_with_jobs_pending_and_running_finds_them_again(cluster, slurm: Path, tmp_path: Path) -> None:
    # Three CPUs per slave: two jobs fit on the node, the third waits.
    queue = "slots_per_slave = 3\nmax_running = 3\nmax_pending = 1\nidle_timeout = 1.0\nhandback = 5.0\n"
    master = cluster(queue)
    master.submit(sweep_spec(tmp_path, "restart", 60, "sleep 0.3; echo {n}"))
    wait_for(lambda: sorted(j["state"] for j in jobs(master)) == ["pending", "running", "running"]
             and all(j["slaves_seen"] for j in jobs(master) if j["state"] == "running"), 30,
             "2 jobs running (their slaves connected), 1 pending")
    before = {j["id"]: j["native_id"] for j in jobs(master)}
    sbatch_before = slurm.read_text().split().count("sbatch")
    master.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    master.proc.wait()  # type: ignore[union-attr]
    stored = run_cli("--state", str(master.state), "alloc", "list", cwd=tmp_path)  # the store, while it is down
    assert "as last stored" in stored.stderr and all(f"({n}) " in stored.stdout for n in before.values())
    master.start()
    master.wait_finished("restart", 60)
    done_once(master, "restart", 60)
    after = {j["id"]: j["native_id"] for j in jobs(master)}
    assert after == before  # no job submitted twice, none forgotten
    assert slurm.read_text().split().count("sbatch") == sbatch_before
    log = (master.state / "master.log").read_text()
    assert log.count("alloc_job_reattached") == 3
    restarted = log.rindex("alloc_job_reattached")
    running = [i for i, n in before.items() if n and any(f"q-j{i}-" in line for line in log[restarted:].splitlines()
                                                         if "slave_joined" in line)]
    assert len(running) >= 2  # the slaves of the running jobs came back to the new master


def test_sbatch_refusing_a_bad_partition_is_shown_and_retried_with_backoff(cluster, tmp_path: Path) -> None:
    master = cluster('partition = "nope"\n')
    master.submit(sweep_spec(tmp_path, "refused", 5, "echo {n}"))
    wait_for(lambda: alloc(master, "list")["queues"][0]["errors"] >= 2, 10, "a second refusal")
    time.sleep(3.0)
    reply = alloc(master, "list")
    queue = reply["queues"][0]
    assert "invalid partition" in queue["error"].lower() and queue["jobs"] == []
    assert 2 <= queue["errors"] <= 3 and reply["scheduler_calls"]["submit"] == queue["errors"]  # 1 s, 2 s, 4 s apart
    listed = run_cli("--state", str(master.state), "alloc", "list", cwd=tmp_path)
    assert "submission refused" in listed.stdout and "invalid partition" in listed.stdout.lower()
    assert run_cli("--state", str(master.state), "alloc", "pause", "q", cwd=tmp_path).returncode == 0
    paused = alloc(master, "list")["queues"][0]
    time.sleep(4.5)
    assert alloc(master, "list")["queues"][0]["errors"] == paused["errors"]  # paused: no more tries
    assert run_cli("--state", str(master.state), "alloc", "remove", "q", cwd=tmp_path).returncode == 0
    assert alloc(master, "list")["queues"] == []
    assert not (master.state / "authorized" / "slaves" / "alloc-q.key").exists()


def test_jobs_whose_slaves_never_connect_back_off_instead_of_looping(cluster, tmp_path: Path) -> None:
    master = cluster(f'master_address = "tcp://127.0.0.1:{free_port()}"\nidle_timeout = 1.0\nhandback = 5.0\n'
                     "max_pending = 1\nmax_running = 1\n")
    master.submit(sweep_spec(tmp_path, "nobody", 3, "echo {n}"))
    queue = wait_for(lambda: (q := alloc(master, "list")["queues"][0])["error"] and q, 30, "the queue's error")
    assert "before any of its slaves connected" in queue["error"] and queue["errors"] == 1
    assert [j["state"] for j in queue["jobs"]] == ["completed"]
    time.sleep(2.5)  # the first retry comes 1 s later; the second, after another failure, 2 s after that
    assert len(alloc(master, "list")["queues"][0]["jobs"]) <= 2


def test_a_walltime_too_short_for_every_queued_task_submits_nothing(cluster, tmp_path: Path) -> None:
    master = cluster("walltime = 100.0\nhandback = 60.0\n")
    master.submit(sweep_spec(tmp_path, "long", 3, "echo {n}", timeout=40))
    queue = wait_for(lambda: (q := alloc(master, "list")["queues"][0])["error"] and q, 10, "the queue's error")
    assert queue["error"].startswith("walltime too short") and "40s" in queue["error"]
    time.sleep(1.0)
    reply = alloc(master, "list")
    assert reply["scheduler_calls"]["submit"] == 0 and reply["queues"][0]["jobs"] == []


def test_queue_empties_pending_jobs_are_cancelled_and_idle_slaves_leave(cluster, tmp_path: Path) -> None:
    port = free_port()
    master = cluster("slots_per_slave = 4\nmax_running = 3\nmax_pending = 2\nidle_timeout = 1.0\nhandback = 5.0\n",
                     http_bind=f'"127.0.0.1:{port}"')
    master.submit(sweep_spec(tmp_path, "empties", 30, "sleep 0.2; echo {n}"))
    master.wait_finished("empties", 60)
    done_once(master, "empties", 30)
    ended = wait_for(lambda: (js := jobs(master)) and all(j["ended"] for j in js) and js, 30, "every job to end")
    states = sorted(j["state"] for j in ended)
    assert "cancelled" in states and "completed" in states, states  # the waiting one cancelled, the others left
    assert master.control("live_slaves")["slaves"] == {}
    assert not squeue()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/allocations", timeout=5) as response:
        served = json.load(response)["queues"][0]
    assert served["name"] == "q" and [j["state"] for j in served["jobs"]] == [j["state"] for j in ended]


def test_a_script_from_slurm_script_submitted_by_hand_runs_slaves(cluster, tmp_path: Path) -> None:
    master = cluster()
    made = run_cli("--state", str(master.state), "slurm-script", "--walltime", "5m", "--slaves-per-job", "2",
                   "--slots", "2", "--idle-timeout", "1", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "#SBATCH --ntasks=2" in made.stdout and "#SBATCH --time=0:05:00" in made.stdout
    secret = (master.state / "keys" / "alloc" / "alloc-manual.key_secret").read_text()
    secret_key = next(line.split('"')[1] for line in secret.splitlines() if "secret-key" in line)
    assert secret_key not in made.stdout  # the script names the key's file, never the key
    assert (master.state / "alloc" / "manual" / "slave.toml").stat().st_mode & 0o077 == 0
    (tmp_path / "job.sh").write_text(made.stdout)
    subprocess.run(["sbatch", "-o", str(tmp_path / "job.out"), str(tmp_path / "job.sh")], check=True,
                   capture_output=True)
    master.submit(sweep_spec(tmp_path, "by_hand", 20, "echo {n}"))
    master.wait_finished("by_hand", 60)
    rows = done_once(master, "by_hand", 20)
    assert {slave.rsplit("-", 2)[0] for _, slave, _, _, _ in rows} == {"manual"}
    def joined_names() -> set[str]:
        return {line.split("slave=")[1].split()[0] for line in (master.state / "master.log").read_text().splitlines()
                if "slave_joined" in line}
    # a short sweep can end before the second rank's slave joins: wait for it rather than race it
    wait_for(lambda: len(joined_names()) >= 2, 30, "both ranks joined")
    joined = joined_names()
    assert len(joined) == 2 and {name.rsplit("-", 1)[1] for name in joined} == {"0", "1"}  # one name per rank
    wait_for(lambda: not squeue(), 30, "the hand-submitted job to end once its slaves idle")


# -- units: queue settings, walltime arithmetic (no scheduler needed) ---------------------------------
def test_queue_settings_name_the_offending_field() -> None:
    from master.batch import QueueSpec
    from ticketfarm.errors import ConfigError

    spec = QueueSpec.parse({"name": "gpu", "walltime": 600, "extra_args": ["--qos=debug"]}, "t")
    assert spec.walltime == 600.0 and spec.slots_per_job == 1 and spec.rank() == "0"
    for bad, field in (({"name": "a b"}, "name"), ({"name": "q", "slots_per_slave": 0}, "slots_per_slave"),
                       ({"name": "q", "walltime": 30, "handback": 60}, "walltime"),
                       ({"name": "q", "extra_args": ["-x"]}, "extra_args"), ({"name": "q", "nodes": 2}, "nodes"),
                       ({"name": "q", "walltime": "1h"}, "walltime")):
        with pytest.raises(ConfigError) as info:
            QueueSpec.parse(bad, "t")
        assert info.value.field == field


def test_walltime_forms_and_what_a_slave_near_its_end_still_takes() -> None:
    from slave.walltime import Walltime
    from ticketfarm.cli_alloc import walltime

    assert [walltime(t) for t in ("90", "90m", "2h", "1:30:00", "1-00:00:00", "05:00")] == \
        [90, 5400, 7200, 5400, 86400, 300]
    w = Walltime(end=1000.0, handback=100.0, idle_exit=5.0)
    assert w.fits(60, now=800) and not w.fits(60, now=850) and w.over(900) and not w.over(899)
    assert Walltime().fits(10**9) and not Walltime().over(10**12)
    assert not w.idle_too_long(True, 10) and not w.idle_too_long(True, 14) and w.idle_too_long(True, 15)
    assert not w.idle_too_long(False, 16) and not w.idle_too_long(True, 17)


def test_alloc_tables_added_below_the_default_master_toml_are_read(tmp_path: Path) -> None:
    from master.config import load_master_config, write_default_master_config
    from ticketfarm.errors import ConfigError

    path = write_default_master_config(tmp_path)
    base = path.read_text()
    path.write_text(base + '[alloc.gpu]\npartition = "gpu"\nwalltime = 7200\nextra_args = ["--qos=debug"]\n')
    queue = load_master_config(tmp_path).alloc["gpu"]
    assert (queue.name, queue.partition, queue.walltime, queue.extra_args) == ("gpu", "gpu", 7200.0, ["--qos=debug"])
    path.write_text(base + "[alloc.gpu]\nslots = 4\n")
    with pytest.raises(ConfigError, match=r"\[alloc.gpu\]: unknown field 'slots'"):
        load_master_config(tmp_path)


def test_the_readme_walkthrough_runs_a_sweep_on_slurm_slaves(cluster, tmp_path: Path) -> None:
    """README's three lines, with this node's partition: the sweep runs on slaves that Slurm jobs started."""
    master = cluster()
    home = tmp_path / "home"
    home.mkdir()
    shell = Shell(home, subs={"--partition gpu": "--partition debug"}, env={"TICKETFARM_STATE": str(master.state)})
    add, run, listed = commands(walkthroughs(REPO / "README.md")["slurm"])
    (home / "sweep.toml").write_text('name = "onslurm"\ncommand = "echo {n}"\n[parameters.grid]\n'
                                     'n = {range = [20]}\n[results]\nout = "stdout"\n')
    try:
        added = shell.run(add)
        assert added.returncode == 0, added.stdout + added.stderr
        ran = shell.run(run, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr + shell.run(listed).stdout
        rows = done_once(master, "onslurm", 20)
        assert all(slave.startswith("gpu-j") for _, slave, _, _, _ in rows)
        shown = shell.run(listed)
        assert shown.returncode == 0 and re.search(r"job \d+ \(\d+\) (running|completed)", shown.stdout), shown.stdout
    finally:
        shell.close()

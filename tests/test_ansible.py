"""Ansible rollout onto 3 SSH test hosts (network namespaces): deploy, idempotence, --check,
supervisor restarts, a 3-host sweep, a cut link, rolling restart, remove, ansible-lint.

The tests run in file order and share one set of hosts and one master: each
step starts from the state the previous one left (as a user would go).
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
TESTHOSTS = ROOT / "scripts" / "testhosts.sh"
HOSTS = ["h1", "h2", "h3"]
#: test subnet and name prefix, distinct from testhosts.sh's defaults so a
#: developer's own hosts (`scripts/testhosts.sh up`) do not collide
NET = "10.231.18"
TAG = "tft"
HEARTBEAT = 0.3
LIVENESS = 5
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
#: seconds each deploy step took, printed at the end of the session (docs/DEPLOY.md quotes them)
TIMINGS: dict[str, float] = {}


def _why_not() -> str | None:
    """Why this machine cannot run the test hosts, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "test hosts need root (ip netns add, sshd); run as root, as CI does"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "ansible-playbook"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 openssh-client; pip install ansible-core)"
    if not Path("/usr/sbin/sshd").exists():
        return "/usr/sbin/sshd not found (apt-get install openssh-server)"
    probe = f"{TAG}-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


WHY_NOT = _why_not()


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One ansible-playbook (or ticketfarm deploy) run: exit code, output, recap per host."""

    rc: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def changed(self) -> dict[str, int]:
        return {host: r["changed"] for host, r in self.recap.items()}

    def ok(self) -> bool:
        return self.rc == 0 and all(r["failed"] == 0 and r["unreachable"] == 0 for r in self.recap.values())


@dataclass
class Hosts:
    """The hosts made by scripts/testhosts.sh, and how to reach them."""

    dir: Path
    env: dict[str, str]
    vars_file: Path
    wheelhouse: Path
    master_endpoint: str
    master_state: Path

    def sh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(TESTHOSTS), *args], env=self.env, capture_output=True, text=True,
                              check=check, timeout=60)

    def ssh(self, host: str, command: str) -> str:
        return self.sh("ssh", host, command).stdout

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.ini"

    def root(self, host: str) -> Path:
        return self.dir / "hosts" / host / "root"

    def home(self, host: str) -> Path:
        return self.root(host) / "opt" / "ticketfarm"

    def work_root(self, host: str) -> Path:
        return self.root(host) / "var" / "lib" / "ticketfarm"

    def pid(self, host: str, which: str) -> int | None:
        try:
            pid = int((self.home(host) / "run" / f"{which}.pid").read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def processes_of(self, host: str) -> list[int]:
        """Pids of every process whose command line names a path under the host's root (installs, work dirs)."""
        mark = str(self.root(host)) + "/"
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if mark in cmdline:
                found.append(int(proc.name))
        return found

    def netns_of(self, pid: int) -> str:
        return os.readlink(f"/proc/{pid}/ns/net")

    def host_netns(self, host: str) -> str:
        """The network namespace of the host's sshd, which every SSH session inherits."""
        return os.readlink(f"/proc/{int((self.dir / 'hosts' / host / 'sshd.pid').read_text())}/ns/net")

    def playbook(self, name: str, *extra: str) -> Run:
        cmd = ["ansible-playbook", "-i", str(self.inventory), str(ROOT / "playbooks" / name),
               "-e", f"@{self.vars_file}", *extra]
        return self._run(cmd)

    def deploy(self, *args: str) -> Run:
        """`ticketfarm deploy` (ticketfarm/deploy.py through the CLI)."""
        cmd = [sys.executable, "-m", "ticketfarm", "deploy", "-i", str(self.inventory),
               "--wheelhouse", str(self.wheelhouse), "-e", f"@{self.vars_file}", *args]
        return self._run(cmd)

    def _run(self, cmd: list[str]) -> Run:
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300)
        run = Run(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)
        for m in RECAP.finditer(proc.stdout):
            run.recap[m.group(1)] = {"ok": int(m.group(2)), "changed": int(m.group(3)),
                                     "unreachable": int(m.group(4)), "failed": int(m.group(5))}
        return run


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """3 SSH test hosts, torn down whatever happens."""
    if WHY_NOT:
        pytest.skip(f"ansible test hosts: {WHY_NOT}")
    base = tmp_path_factory.mktemp("ansible")
    hdir = base / "hosts"
    env = dict(os.environ, TH_DIR=str(hdir), TH_COUNT=str(len(HOSTS)), TH_NET=NET, TH_TAG=TAG,
               ANSIBLE_CONFIG=str(hdir / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_DEPRECATION_WARNINGS="0", PYTHONPATH=str(ROOT))
    if subprocess.run(["ip", "link", "show", f"{TAG}br"], capture_output=True).returncode == 0:
        # left over by a run that was killed before its teardown: same names, so remove it
        subprocess.run([str(TESTHOSTS), "down"], env=env, capture_output=True, timeout=120)
    up = subprocess.run([str(TESTHOSTS), "up"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, f"testhosts.sh up failed:\n{up.stdout}{up.stderr}"
        port = free_port(f"{NET}.1")
        endpoint = f"tcp://{NET}.1:{port}"
        wheelhouse = base / "wheelhouse"
        # the master's state dir on the controller: the playbooks make and authorise the keys there
        master_state = base / "master-state"
        vars_file = base / "vars.yml"
        vars_file.write_text(textwrap.dedent(f"""\
            ticketfarm_master: "{endpoint}"
            ticketfarm_wheelhouse: "{wheelhouse}"
            ticketfarm_keys_state: "{master_state}"
            ticketfarm_slave_heartbeat_interval: {HEARTBEAT}
            ticketfarm_slave_liveness: {LIVENESS}
            ticketfarm_slave_extra_config: {{reconnect_min: 0.2, reconnect_max: 1.0}}
            """))
        yield Hosts(hdir, env, vars_file, wheelhouse, endpoint, master_state)
    finally:
        down = subprocess.run([str(TESTHOSTS), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        if TIMINGS:
            print("\nansible timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


@dataclass
class Master:
    """`ticketfarm master` in the root namespace, bound to the test bridge's address."""

    state: Path
    endpoint: str
    proc: subprocess.Popen[bytes]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ticketfarm", "--state", str(self.state), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def slaves(self) -> dict[str, dict[str, str]]:
        """`ticketfarm slaves` as {name: {column: value}}."""
        return self._table(self.cli("slaves").stdout.splitlines())

    def slave_stats(self) -> dict[str, dict[str, str]]:
        """The "Slaves" table of `ticketfarm stats` as {name: {column: value}}."""
        out = self.cli("stats").stdout.splitlines()
        start = out.index("Slaves") + 1
        return self._table(out[start:])

    @staticmethod
    def _table(lines: list[str]) -> dict[str, dict[str, str]]:
        rows = []
        for line in lines:
            if not line.strip():
                break
            rows.append(re.split(r"\s{2,}", line.strip()))
        if len(rows) < 3:
            return {}
        return {row[0]: dict(zip(rows[0], row)) for row in rows[2:]}

    def alive(self) -> set[str]:
        return {name for name, row in self.slaves().items() if row.get("state") == "alive"}


@pytest.fixture(scope="module")
def master(hosts: Hosts, tmp_path_factory: pytest.TempPathFactory) -> Any:
    state = hosts.master_state
    state.mkdir(exist_ok=True)
    (state / "master.toml").write_text(
        f'bind = "{hosts.master_endpoint}"\nheartbeat_interval = {HEARTBEAT}\nliveness = {LIVENESS}\n'
        'deadline_grace = 3.0\ndurability = "normal"\n')
    log = open(state / "master.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(state), "--log-level", "info",
                             "master"], cwd=ROOT, stdout=log, stderr=log)
    m = Master(state, hosts.master_endpoint, proc)
    try:
        wait_for(lambda: m.cli("status", timeout=10).returncode == 0, 15, "the master to answer")
        yield m
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def sweep_spec(path: Path, name: str, tasks: int, command: str) -> Path:
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        command = "{command}"
        timeout = 30
        max_attempts = 3
        [parameters.grid]
        x = {{range = [0, {tasks}]}}
        [results]
        out = "stdout"
        """))
    return path


def results_by_host(csv_path: Path) -> dict[int, str]:
    """x -> host that produced the collected result; asserts each x appears exactly once."""
    seen: dict[int, str] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            x = int(row["x"])
            lines = row["out"].split()
            assert x not in seen, f"task x={x} collected twice"
            assert lines[0] == str(x), row
            seen[x] = lines[1]
    return seen


# -- ticketfarm/deploy.py without hosts -----------------------------------------------------


def _fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    import zipfile
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_wheelhouse_sync_changes_only_on_new_contents(tmp_path: Path) -> None:
    from ticketfarm import deploy
    built, dest = tmp_path / "built", tmp_path / "dest"
    built.mkdir(), dest.mkdir()
    _fake_wheel(built / "ticketfarm-0.1.0-py3-none-any.whl", {"a.py": b"1"})
    _fake_wheel(dest / "old-1.0-py3-none-any.whl", {"x": b""})
    assert deploy._sync_wheels(built, dest) is True            # copied, stale wheel dropped
    assert sorted(p.name for p in dest.glob("*.whl")) == ["ticketfarm-0.1.0-py3-none-any.whl"]
    assert deploy._write_bundle(dest) is True
    bundle = (dest / "wheels.tar").read_bytes()
    _fake_wheel(built / "ticketfarm-0.1.0-py3-none-any.whl", {"a.py": b"1"})   # rebuilt, same contents
    assert deploy._sync_wheels(built, dest) is False
    assert deploy._write_bundle(dest) is False and (dest / "wheels.tar").read_bytes() == bundle
    _fake_wheel(built / "ticketfarm-0.1.0-py3-none-any.whl", {"a.py": b"2"})
    assert deploy._sync_wheels(built, dest) is True and deploy._write_bundle(dest) is True


def test_deploy_command_line() -> None:
    import argparse

    from ticketfarm import deploy
    parser = argparse.ArgumentParser()
    deploy.add_deploy_parser(parser.add_subparsers())
    args = parser.parse_args(["deploy", "-i", "inv", "--action", "restart", "--check", "-e", "a=1"])
    assert args.func is deploy.deploy and args.action == "restart" and args.extra_vars == ["a=1"]
    cmd = deploy.playbook_command(ROOT, "inv", "remove", check=True, limit="h1", extra=["a=1"])
    assert cmd == ["ansible-playbook", "-i", "inv", str(ROOT / "playbooks" / "slaves-remove.yml"),
                   "--check", "--diff", "--limit", "h1", "-e", "a=1"]
    assert all((ROOT / "playbooks" / name).is_file() for name in deploy.PLAYBOOKS.values())
    assert deploy.find_source(ROOT / "playbooks") == ROOT


# -- deploy ---------------------------------------------------------------------------


def test_deploy_installs_and_starts_a_slave_on_every_host(hosts: Hosts) -> None:
    run = hosts.playbook("slaves.yml")
    TIMINGS["first deploy"] = run.seconds
    assert run.ok(), run.output
    assert set(run.recap) >= set(HOSTS), run.output
    assert all(run.changed()[h] > 0 for h in HOSTS), run.changed()
    for h in HOSTS:
        sup, slave = hosts.pid(h, "supervisor"), hosts.pid(h, "slave")
        assert sup and slave, f"{h}: supervisor/slave not running\n{run.output}"
        # the slave runs inside the host (its network namespace), not on the controller
        assert hosts.netns_of(slave) == hosts.host_netns(h)
        config = (hosts.home(h) / "slave.toml").read_text()
        assert f'name = "{h}"' in config and hosts.master_endpoint in config
        assert f'work_root = "{hosts.work_root(h)}"' in config
        assert "running" in hosts.ssh(h, f"{hosts.home(h)}/bin/ticketfarm-slavectl status")
        # CURVE: the host holds the master's public key and its own secret key, nothing more, all 0600
        key_dir = hosts.home(h) / "keys"
        assert sorted(p.name for p in key_dir.iterdir()) == ["master.key", "slave.key_secret"]
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in key_dir.iterdir())
        assert (key_dir / "slave.key_secret").read_bytes() == \
            (hosts.master_state / "keys" / "slaves" / f"{h}.key_secret").read_bytes()
        assert (hosts.master_state / "authorized" / "slaves" / f"{h}.key").exists()
        assert 'secret_key = "' in config and "insecure" not in config


def test_second_run_changes_nothing(hosts: Hosts) -> None:
    before = {h: hosts.pid(h, "slave") for h in HOSTS}
    run = hosts.playbook("slaves.yml")
    TIMINGS["second deploy (no change)"] = run.seconds
    assert run.ok(), run.output
    assert run.changed() == {**{h: 0 for h in HOSTS}, "localhost": 0}, run.output
    assert {h: hosts.pid(h, "slave") for h in HOSTS} == before, "a slave was restarted"


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in path.rglob("*") if p.is_file() and "log" not in p.parts}


def test_check_mode_reports_and_changes_nothing(hosts: Hosts) -> None:
    trees = {h: _tree(hosts.home(h)) for h in HOSTS}
    pids = {h: hosts.pid(h, "slave") for h in HOSTS}
    # through `ticketfarm deploy --check` (which adds --diff), with one variable
    # changed: the config change is reported on every host and made on none
    run = hosts.deploy("--check", "-e", "ticketfarm_slave_slots=3")
    TIMINGS["--check"] = run.seconds
    assert run.ok(), run.output
    assert all(run.changed()[h] == 1 for h in HOSTS), run.output
    assert run.output.count("+slots = 3") == len(HOSTS), run.output
    assert {h: _tree(hosts.home(h)) for h in HOSTS} == trees
    assert {h: hosts.pid(h, "slave") for h in HOSTS} == pids


# -- the cluster at work ----------------------------------------------------------------


def test_sweep_of_300_tasks_runs_each_once_across_all_hosts(hosts: Hosts, master: Master,
                                                            tmp_path: Path) -> None:
    wait_for(lambda: master.alive() >= set(HOSTS), 20, "all 3 slaves to register")
    spec = sweep_spec(tmp_path / "many.toml", "many", 300, "echo {x}; hostname")
    run = master.cli("run", str(spec), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    by_host = results_by_host(tmp_path / "out" / "many-results.csv")
    assert sorted(by_host) == list(range(300))
    assert set(by_host.values()) == set(HOSTS), "every host should have run tasks"
    slaves = master.slave_stats()
    assert set(slaves) == set(HOSTS), slaves
    for h in HOSTS:
        assert int(slaves[h]["done"]) == sum(1 for v in by_host.values() if v == h), slaves


def test_killed_slave_is_restarted_by_the_supervisor(hosts: Hosts, master: Master) -> None:
    h = "h3"
    old, sup = hosts.pid(h, "slave"), hosts.pid(h, "supervisor")
    assert old and sup
    hosts.ssh(h, f"kill -KILL {old}")
    new = wait_for(lambda: (p := hosts.pid(h, "slave")) and p != old and p, 10, "a new slave on h3")
    assert hosts.pid(h, "supervisor") == sup
    assert hosts.netns_of(new) == hosts.host_netns(h)
    log = (hosts.home(h) / "log" / "slave.log").read_text()
    assert "slave exited with status 137" in log
    wait_for(lambda: h in master.alive(), 20, "the restarted slave to rejoin")


def test_cut_link_reassigns_tickets_and_the_slave_reconnects(hosts: Hosts, master: Master,
                                                             tmp_path: Path) -> None:
    wait_for(lambda: master.alive() >= set(HOSTS), 20, "all 3 slaves alive")
    cut = "h2"
    spec = sweep_spec(tmp_path / "cut.toml", "cut", 150, "sleep 0.1; echo {x}; hostname")
    run = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(master.state), "run", str(spec),
                            "--out", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        # cut once h2 is busy: its running tickets must come back to the others
        wait_for(lambda: list(hosts.work_root(cut).glob("cut/*")), 20, "h2 to run tickets of the sweep",
                 every=0.02)
        hosts.sh("cut", cut)
        cut_at = time.monotonic()
        wait_for(lambda: cut not in master.alive(), LIVENESS * HEARTBEAT + 10, "the master to drop h2")
        declared_dead = time.monotonic() - cut_at
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        hosts.sh("heal", cut)
    assert run.returncode == 0, out
    assert declared_dead >= HEARTBEAT * (LIVENESS - 1), declared_dead
    by_host = results_by_host(tmp_path / "out" / "cut-results.csv")
    assert sorted(by_host) == list(range(150))
    assert int(master.slave_stats()[cut]["lost"]) > 0, "h2's running tickets should be counted lost"

    # link back: the slave finds the master by itself and gets work again
    wait_for(lambda: cut in master.alive(), 20, "h2 to reconnect")
    spec = sweep_spec(tmp_path / "after.toml", "after", 60, "sleep 0.05; echo {x}; hostname")
    again = master.cli("run", str(spec), "--out", str(tmp_path / "out"))
    assert again.returncode == 0, again.stdout + again.stderr
    after = results_by_host(tmp_path / "out" / "after-results.csv")
    assert sorted(after) == list(range(60))
    assert cut in after.values(), "the reconnected slave got no work"


# -- lifecycle --------------------------------------------------------------------------


def test_rolling_restart_one_host_at_a_time(hosts: Hosts, master: Master) -> None:
    before = {h: hosts.pid(h, "slave") for h in HOSTS}
    run = hosts.deploy("--action", "restart")
    assert run.ok(), run.output
    # serial: 1 -> one play batch per host, each restarting that host
    assert run.output.count("PLAY [Upgrade and restart ticketfarm slaves") == len(HOSTS), run.output
    after = {h: hosts.pid(h, "slave") for h in HOSTS}
    assert all(after[h] and after[h] != before[h] for h in HOSTS), (before, after)
    wait_for(lambda: master.alive() >= set(HOSTS), 20, "restarted slaves to rejoin")


def test_stop_and_start(hosts: Hosts) -> None:
    run = hosts.deploy("--action", "stop")
    assert run.ok() and all(run.changed()[h] == 1 for h in HOSTS), run.output
    assert all(hosts.processes_of(h) == [] for h in HOSTS)
    run = hosts.deploy("--action", "start")
    assert run.ok() and all(run.changed()[h] == 1 for h in HOSTS), run.output
    assert all(hosts.pid(h, "slave") for h in HOSTS)
    run = hosts.deploy("--action", "start")
    assert run.ok() and all(run.changed()[h] == 0 for h in HOSTS), run.output


def test_remove_leaves_nothing_behind(hosts: Hosts) -> None:
    run = hosts.deploy("--action", "remove")
    assert run.ok(), run.output
    for h in HOSTS:
        assert hosts.processes_of(h) == [], f"{h}: processes left"
        assert not hosts.home(h).exists(), f"{h}: venv/config left"
        assert not hosts.work_root(h).exists(), f"{h}: work dirs left"
        assert list(hosts.root(h).rglob("*.service")) == []
    assert not Path("/etc/systemd/system/ticketfarm-slave.service").exists()
    run = hosts.deploy("--action", "remove")
    assert run.ok() and all(run.changed()[h] == 0 for h in HOSTS), run.output


def test_master_playbook_installs_a_running_master_and_removes_it(hosts: Hosts, tmp_path: Path) -> None:
    # h1 doubles as the `master` group; the master binds h1's own address
    group = tmp_path / "master-group.ini"
    group.write_text("[master]\nh1\n")
    endpoint = f"tcp://{NET}.11:{free_port(f'{NET}.1')}"
    extra = ("-i", str(group), "-e", f"ticketfarm_master_bind={endpoint}")
    run = hosts.playbook("master.yml", *extra)
    assert run.ok() and run.changed()["h1"] > 0, run.output
    state = hosts.root("h1") / "var" / "lib" / "ticketfarm-master"
    assert endpoint in (state / "master.toml").read_text()
    status = subprocess.run([sys.executable, "-m", "ticketfarm", "--master", endpoint, "--state", str(state),
                             "status"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    again = hosts.playbook("master.yml", *extra)
    assert again.ok() and again.changed()["h1"] == 0, again.output
    gone = hosts.playbook("master-remove.yml", *extra, "-e", "ticketfarm_master_remove_state=true")
    assert gone.ok(), gone.output
    assert not (hosts.root("h1") / "opt" / "ticketfarm-master").exists() and not state.exists()
    assert hosts.processes_of("h1") == []


# -- lint ----------------------------------------------------------------------------------


def test_ansible_lint_production_profile() -> None:
    lint = shutil.which("ansible-lint")
    if lint is None:
        pytest.skip("ansible-lint not installed (pip install ansible-lint)")
    run = subprocess.run([lint, "--profile", "production", "--nocolor", "playbooks/"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

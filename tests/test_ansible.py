"""Ansible rollout onto 3 SSH test hosts (network namespaces), following docs/DEPLOY.md's walkthrough
block by block, plus what the page promises around it: refused keys, wrong keys dirs, misspelt
variables, drained restarts, supervisor restarts, a cut link, ansible-lint.

The walkthrough's blocks run as the page has them; only the test-host dir, the subnet and the /tmp/tf/
paths are replaced by this test's own (and TH_TAG set, so the namespaces do not clash with a
developer's own test hosts). The tests run in file order and share the hosts and the master: each
step starts from the state the previous one left, as a user following the page would.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.testhosts import ROOT, TESTHOSTS, Run, processes_naming, run, why_not
from tests.walkthrough import walkthroughs

DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"
HOSTS = ["h1", "h2", "h3"]
#: test subnet and name prefix, distinct from testhosts.sh's defaults (the page's) and other tests
NET = "10.231.19"
TAG = "tfa"
#: the master's default heartbeat and liveness (the walkthrough's master.toml sets only bind)
HEARTBEAT, LIVENESS = 1.0, 5
#: seconds each deploy step took, printed at the end of the module (docs/DEPLOY.md quotes them)
TIMINGS: dict[str, float] = {}
WHY_NOT = why_not(TAG)


class Walk:
    """docs/DEPLOY.md's walkthrough on this test's hosts: each block runs in bash, exports carry over."""

    def __init__(self, base: Path):
        self.base = base
        self.hdir = base / "testhosts"
        self.tf = base / "tf"
        self.env_file = base / "walk.env"
        self.env_file.write_text("")
        shim = base / "bin"
        shim.mkdir()
        # `ticketfarm` as the page uses it, but from this checkout whatever is installed
        (shim / "ticketfarm").write_text(f"#!/bin/sh\nexec {sys.executable} -m ticketfarm \"$@\"\n")
        (shim / "ticketfarm").chmod(0o755)
        self.env = dict(os.environ, TH_DIR=str(self.hdir), TH_NET=NET, TH_TAG=TAG, TH_COUNT=str(len(HOSTS)),
                        PATH=f"{shim}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), ANSIBLE_NOCOLOR="1",
                        ANSIBLE_FORCE_COLOR="0", ANSIBLE_DEPRECATION_WARNINGS="0")
        self.env.pop("TICKETFARM_STATE", None)
        self.blocks = {name: self.substitute(body) for name, body in walkthroughs(DEPLOY_MD).items()}

    def substitute(self, text: str) -> str:
        return (text.replace("/tmp/ticketfarm-testhosts", str(self.hdir)).replace("/tmp/tf/", f"{self.tf}/")
                .replace("10.231.17.", f"{NET}."))

    def step(self, name: str) -> Run:
        """Run one block of the page; the exported variables are kept for the next one."""
        script = f"set -euo pipefail\n. {self.env_file}\n{self.blocks[name]}\nexport -p > {self.env_file}\n"
        return self.run(["bash", "-c", script], timing=name)

    def exported(self) -> dict[str, str]:
        """The walkthrough shell's exported variables (ANSIBLE_CONFIG, TICKETFARM_STATE) over the base env."""
        env = dict(self.env)
        for m in re.finditer(r'^declare -x (\w+)="(.*)"$', self.env_file.read_text(), re.M):
            env[m.group(1)] = m.group(2).replace('\\"', '"').replace("\\\\", "\\")
        return env

    def run(self, cmd: list[str], timing: str | None = None, cwd: Path = ROOT, unset: tuple[str, ...] = ()) -> Run:
        result = run(cmd, {k: v for k, v in self.exported().items() if k not in unset}, cwd)
        if timing:
            TIMINGS[timing] = result.seconds
        return result

    def playbook(self, name: str, *extra: str) -> Run:
        return self.run(["ansible-playbook", str(ROOT / "playbooks" / name), *extra])

    def ticketfarm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ticketfarm", *args], cwd=ROOT, env=self.exported(),
                              capture_output=True, text=True, timeout=120)

    def registered(self, endpoint: str, keys_state: Path) -> dict[str, bool]:
        """Which test hosts' slaves the master at `endpoint` has connected, asked with the keys dir's client key."""
        out = subprocess.run([sys.executable, "-m", "ticketfarm.rollout", "--master", endpoint, "--keys-state",
                              str(keys_state), "wait", *HOSTS, "--timeout", "0"], cwd=ROOT, env=self.exported(),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return {h: s["registered"] for h, s in json.loads(out.stdout)["slaves"].items()}

    def controller_master(self) -> list[int]:
        """The pid of the master the walkthrough started on the controller, while it runs (its pid file, checked
        against the process's environment so a reused pid is left alone)."""
        try:
            pid = int((self.tf / "master.pid").read_text())
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (OSError, ValueError):
            return []
        return [pid] if f"TICKETFARM_STATE={self.tf}/".encode() in environ else []

    # -- the hosts, as the tests look at them ------------------------------------------------
    def root(self, host: str) -> Path:
        return self.hdir / "hosts" / host / "root"

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
        """Pids of every process whose command line names a path under the host's root."""
        return processes_naming(str(self.root(host)) + "/")

    def host_netns(self, host: str) -> str:
        """The network namespace of the host's sshd, which every SSH session inherits."""
        return os.readlink(f"/proc/{int((self.hdir / 'hosts' / host / 'sshd.pid').read_text())}/ns/net")

    def sh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(TESTHOSTS), *args], env=self.env, capture_output=True, text=True,
                              check=True, timeout=60)


@pytest.fixture(scope="module")
def walk() -> Any:
    """The walkthrough's first step (3 test hosts); hosts and every process the walkthrough started go at the end."""
    if WHY_NOT:
        pytest.skip(f"ansible test hosts: {WHY_NOT}")
    # not under pytest's 0700 tmp dirs: the slaves' service user must reach the hosts' files
    base = Path(tempfile.mkdtemp(prefix="tf-ansible-"))
    base.chmod(0o755)
    w = Walk(base)
    if subprocess.run(["ip", "link", "show", f"{TAG}br"], capture_output=True).returncode == 0:
        # left over by a run killed before its teardown: same names, so remove it
        subprocess.run([str(TESTHOSTS), "down"], env=w.env, capture_output=True, timeout=120)
    try:
        up = w.step("hosts")
        assert up.rc == 0, f"the walkthrough's `hosts` step failed:\n{up.output}"
        yield w
    finally:
        # the master the walkthrough started on the controller (nohup ... &), and whatever names our paths
        for pid in [*w.controller_master(), *processes_naming(f"{w.base}/")]:
            os.kill(pid, signal.SIGTERM)
        down = subprocess.run([str(TESTHOSTS), "down"], env=w.env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        wait_for(lambda: not processes_naming(f"{w.base}/") and not w.controller_master(), 15,
                 "the walkthrough's processes to exit")
        shutil.rmtree(base)
        if TIMINGS:
            print("\nansible timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


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


def results_by_host(csv_path: Path, key: str = "x") -> dict[int, str]:
    """Parameter -> host that produced the collected result; asserts each appears exactly once."""
    seen: dict[int, str] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            x = int(row[key])
            lines = row["out"].split()
            assert x not in seen, f"task {key}={x} collected twice"
            seen[x] = lines[-1]
    return seen


def slave_table(text: str) -> dict[str, dict[str, str]]:
    """A table printed by `ticketfarm slaves` (or the Slaves part of `stats`) as {name: {column: value}}."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            if rows:
                break
            continue
        rows.append(re.split(r"\s{2,}", line.strip()))
    return {row[0]: dict(zip(rows[0], row)) for row in rows[2:]} if len(rows) >= 3 else {}


def alive(w: Walk) -> set[str]:
    return {n for n, row in slave_table(w.ticketfarm("slaves").stdout).items() if row.get("state") == "alive"}


def lost(w: Walk) -> dict[str, int]:
    out = w.ticketfarm("stats").stdout.splitlines()
    return {n: int(row["lost"]) for n, row in slave_table("\n".join(out[out.index("Slaves") + 1:])).items()}


# -- ticketfarm/deploy.py and the page, without hosts ----------------------------------------


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


def test_wheelhouse_takes_the_package_files_only(tmp_path: Path) -> None:
    from ticketfarm import deploy
    src = tmp_path / "checkout"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pyproject.toml").write_text('[project]\nname = "x"\nreadme = "README.md"\n'
                                        '[tool.setuptools]\npackages = ["pkg", "pkg.sub"]\n')
    (src / "README.md").write_text("x")
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "sub" / "m.py").write_text("")
    digest = deploy.source_digest(src)
    for junk in (".ticketfarm/keys/master.key_secret", "results/x.csv", "wheelhouse/a.whl",
                 "pkg/__pycache__/m.cpython-311.pyc", "tests/test_x.py"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("secret")
    assert [str(p) for p in deploy.package_files(src)] == ["README.md", "pkg/__init__.py", "pkg/sub/m.py",
                                                           "pyproject.toml"]
    assert deploy.source_digest(src) == digest                  # a new key or result rebuilds nothing
    (src / "pkg" / "sub" / "m.py").write_text("changed")
    assert deploy.source_digest(src) != digest
    # a package the list forgets would be missing from the wheel: an error naming it, before any host
    (src / "pkg" / "new").mkdir()
    (src / "pkg" / "new" / "__init__.py").write_text("")
    with pytest.raises(deploy.DeployError, match=r"pkg.new not in \[tool.setuptools\] packages"):
        deploy.package_files(src)
    (src / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(deploy.DeployError, match=r"pyproject.toml: \[tool.setuptools\] packages"):
        deploy.package_files(src)


def test_deploy_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from ticketfarm import deploy
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, default=Path(".ticketfarm"))
    deploy.add_deploy_parser(parser.add_subparsers())
    args = parser.parse_args(["deploy", "-i", "inv", "--action", "restart", "--check", "-e", "a=1"])
    assert args.func is deploy.deploy and args.action == "restart" and args.extra_vars == ["a=1"]
    cmd = deploy.playbook_command(ROOT, "inv", "remove", check=True, limit="h1", extra=["a=1"])
    assert cmd == ["ansible-playbook", "-i", "inv", str(ROOT / "playbooks" / "slaves-remove.yml"),
                   "--check", "--diff", "--limit", "h1", "-e", "a=1"]
    assert all((ROOT / "playbooks" / name).is_file() for name in deploy.PLAYBOOKS.values())
    assert deploy.find_source(ROOT / "playbooks") == ROOT
    # the CLI's bare default is not a keys dir: never passed on; an explicit --state or $TICKETFARM_STATE is
    monkeypatch.delenv("TICKETFARM_STATE", raising=False)
    assert deploy.chosen_state(parser.parse_args(["deploy", "-i", "inv"])) is None
    assert deploy.chosen_state(parser.parse_args(["--state", "/srv/m", "deploy", "-i", "inv"])) == Path("/srv/m")
    monkeypatch.setenv("TICKETFARM_STATE", ".ticketfarm")
    assert deploy.chosen_state(parser.parse_args(["deploy", "-i", "inv"])) == Path(".ticketfarm").resolve()


def test_the_page_has_every_walkthrough_step() -> None:
    assert list(walkthroughs(DEPLOY_MD)) == [
        "hosts", "master", "first-deploy", "second-run", "sweep", "rolling-restart", "stop-start", "remove-host",
        "master-on-host", "master-on-host-again", "remove-all"]


# -- the walkthrough: master on the controller ------------------------------------------------


def test_first_deploy_registers_every_slave(walk: Walk) -> None:
    master = walk.step("master")
    assert master.rc == 0, master.output
    run = walk.step("first-deploy")
    assert run.ok(), run.output
    assert set(run.recap) == set(HOSTS) and all(run.changed()[h] > 0 for h in HOSTS), run.output
    # the play itself checked registration; the page's `ticketfarm slaves` shows it too
    table = re.search(r"^slave\s+platform", run.stdout, re.M)
    assert table and {n for n, row in slave_table(run.stdout[table.start():]).items()
                      if row.get("state") == "alive"} == set(HOSTS), run.output
    assert "peer_refused" not in (walk.tf / "master.log").read_text()
    state = walk.tf / "master"
    for h in HOSTS:
        slave = walk.pid(h, "slave")
        assert slave and walk.pid(h, "supervisor"), f"{h}: supervisor/slave not running\n{run.output}"
        # the slave runs inside the host (its network namespace), as the unprivileged service user
        assert os.readlink(f"/proc/{slave}/ns/net") == walk.host_netns(h)
        uid = Path(f"/proc/{slave}").stat().st_uid
        assert uid != 0 and subprocess.run(["id", "-nu", str(uid)], capture_output=True, text=True).stdout.strip() \
            == "ticketfarm"
        config = (walk.home(h) / "slave.toml").read_text()
        assert f'name = "{h}"' in config and f"tcp://{NET}.1:5555" in config
        assert f'work_root = "{walk.work_root(h)}"' in config and 'secret_key = "' in config
        # CURVE: the host holds the master's public key and its own secret key, nothing more, the user's, 0600
        key_dir = walk.home(h) / "keys"
        assert sorted(p.name for p in key_dir.iterdir()) == ["master.key", "slave.key_secret"]
        assert all(p.stat().st_mode & 0o777 == 0o600 and p.stat().st_uid == uid for p in key_dir.iterdir())
        assert (key_dir / "slave.key_secret").read_bytes() == \
            (state / "keys" / "slaves" / f"{h}.key_secret").read_bytes()
        assert (key_dir / "master.key").read_bytes() == (state / "keys" / "master.key").read_bytes()


def test_second_run_changes_nothing(walk: Walk) -> None:
    before = {h: walk.pid(h, "slave") for h in HOSTS}
    run = walk.step("second-run")
    assert run.ok(), run.output
    assert run.changed() == {h: 0 for h in HOSTS}, run.output
    assert {h: walk.pid(h, "slave") for h in HOSTS} == before, "a slave was restarted"


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in path.rglob("*") if p.is_file() and "log" not in p.parts}


def test_check_mode_reports_and_changes_nothing(walk: Walk) -> None:
    trees = {h: _tree(walk.home(h)) for h in HOSTS}
    pids = {h: walk.pid(h, "slave") for h in HOSTS}
    # through `ticketfarm deploy --check` (which adds --diff), with one variable changed:
    # the config change is reported on every host and made on none
    inventory = str(walk.hdir / "inventory.ini")
    run = walk.run([sys.executable, "-m", "ticketfarm", "deploy", "-i", inventory, "--check",
                    "-e", "ticketfarm_slave_slots=3"], timing="--check")
    assert run.ok(), run.output
    assert all(run.changed()[h] == 1 for h in HOSTS), run.output
    assert run.output.count("+slots = 3") == len(HOSTS), run.output
    assert {h: _tree(walk.home(h)) for h in HOSTS} == trees
    assert {h: walk.pid(h, "slave") for h in HOSTS} == pids


def test_a_misspelt_or_mistyped_variable_is_an_error(walk: Walk) -> None:
    run = walk.playbook("slaves.yml", "-e", "ticketfarm_slave_slot=3")
    assert run.rc != 0 and "no ticketfarm role reads ticketfarm_slave_slot" in run.output, run.output
    run = walk.playbook("slaves.yml", "-e", "ticketfarm_slave_service_manager=sytemd")
    assert run.rc != 0 and "ticketfarm_slave_service_manager" in run.output and "sytemd" in run.output, run.output
    assert alive(walk) == set(HOSTS)


def test_a_keys_dir_that_is_not_the_masters_is_refused(walk: Walk, tmp_path: Path) -> None:
    from ticketfarm import keys
    master_keys = {h: (walk.home(h) / "keys" / "master.key").read_bytes() for h in HOSTS}
    pids = {h: walk.pid(h, "slave") for h in HOSTS}
    inventory = str(walk.hdir / "inventory.ini")
    # `ticketfarm deploy` outside the checkout, no --state, no TICKETFARM_STATE: no keys dir, no new keys
    run = walk.run([sys.executable, "-m", "ticketfarm", "deploy", "-i", inventory], cwd=tmp_path,
                   unset=("TICKETFARM_STATE",))
    assert run.rc != 0 and "set ticketfarm_keys_state to the master's state dir" in run.output, run.output
    assert not (tmp_path / ".ticketfarm").exists()
    # a dir without master keys: an error, not new keys
    empty = tmp_path / "empty"
    run = walk.playbook("slaves.yml", "-e", f"ticketfarm_keys_state={empty}")
    assert run.rc != 0 and f"{empty}/keys/master.key_secret does not exist" in run.output, run.output
    assert not empty.exists()
    # other keys than the running master's: refused before anything is pushed
    other = tmp_path / "other"
    keys.init_state_keys(other)
    run = walk.playbook("slaves.yml", "-e", f"ticketfarm_keys_state={other}")
    assert run.rc != 0 and f"does not complete a CURVE handshake with {other}/keys/master.key" in run.output
    # the master's keys, copied elsewhere: the slaves would be authorised where the master never looks
    copy = tmp_path / "copy"
    shutil.copytree(walk.tf / "master" / "keys", copy / "keys")
    run = walk.playbook("slaves.yml", "-e", f"ticketfarm_keys_state={copy}")
    assert run.rc != 0 and f"keeps its state in {walk.tf / 'master'}, but the playbooks would authorise " \
        f"the slaves' keys in {copy}" in run.output, run.output
    assert {h: (walk.home(h) / "keys" / "master.key").read_bytes() for h in HOSTS} == master_keys
    assert {h: walk.pid(h, "slave") for h in HOSTS} == pids and alive(walk) == set(HOSTS)


# -- the cluster at work ----------------------------------------------------------------------


def test_sweep_reads_data_staged_on_the_hosts(walk: Walk) -> None:
    run = walk.step("sweep")
    assert run.rc == 0, run.output
    by_host = results_by_host(walk.tf / "results" / "sizes-results.csv", key="kb")
    assert sorted(by_host) == list(range(1, 61))
    assert set(by_host.values()) == set(HOSTS), "every host should have run tasks"
    with open(walk.tf / "results" / "sizes-results.csv", newline="") as fh:
        assert all(int(row["out"].split()[0]) == int(row["kb"]) * 1024 for row in csv.DictReader(fh))


def test_a_refused_key_fails_the_play_with_the_masters_reason(walk: Walk) -> None:
    from ticketfarm import keys
    slaves = walk.tf / "master" / "keys" / "slaves"
    saved = {p.name: p.read_bytes() for p in slaves.glob("h2.key*")}
    keys.write_keypair(slaves, "h2", {"slave-names": "h2"})    # a keypair the master never authorised
    try:
        run = walk.playbook("slaves.yml", "--limit", "h2", "-e", "ticketfarm_slave_register_timeout=8")
        assert run.rc != 0 and run.failed() == {"h2"}, run.output
        assert "refused the key of slave h2 (key not authorised" in run.output, run.output
        assert "master_refused_key" in run.output, "the slave's log should say its key was refused"
    finally:
        for name, data in saved.items():
            (slaves / name).write_bytes(data)
    run = walk.playbook("slaves.yml", "--limit", "h2")
    assert run.ok(), run.output
    assert alive(walk) == set(HOSTS)


def test_killed_slave_is_restarted_by_the_supervisor(walk: Walk) -> None:
    h = "h3"
    old, sup = walk.pid(h, "slave"), walk.pid(h, "supervisor")
    assert old and sup
    walk.sh("ssh", h, f"kill -KILL {old}")
    new = wait_for(lambda: (p := walk.pid(h, "slave")) and p != old and p, 10, "a new slave on h3")
    assert walk.pid(h, "supervisor") == sup
    assert os.readlink(f"/proc/{new}/ns/net") == walk.host_netns(h)
    assert "slave exited with status 137" in (walk.home(h) / "log" / "slave.log").read_text()
    wait_for(lambda: h in alive(walk), 20, "the restarted slave to rejoin")


def test_cut_link_reassigns_tickets_and_the_slave_reconnects(walk: Walk, tmp_path: Path) -> None:
    cut = "h2"
    spec = sweep_spec(tmp_path / "cut.toml", "cut", 150, "sleep 0.1; echo {x}; hostname")
    run = subprocess.Popen([sys.executable, "-m", "ticketfarm", "run", str(spec), "--out", str(tmp_path / "out")],
                           cwd=ROOT, env=walk.exported(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # cut once h2 is busy: its running tickets must come back to the others
        wait_for(lambda: list(walk.work_root(cut).glob("cut/*")), 20, "h2 to run tickets of the sweep", every=0.02)
        walk.sh("cut", cut)
        cut_at = time.monotonic()
        wait_for(lambda: cut not in alive(walk), LIVENESS * HEARTBEAT + 10, "the master to drop h2")
        declared_dead = time.monotonic() - cut_at
        out, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        walk.sh("heal", cut)
    assert run.returncode == 0, out
    assert declared_dead >= HEARTBEAT * (LIVENESS - 1), declared_dead
    assert sorted(results_by_host(tmp_path / "out" / "cut-results.csv")) == list(range(150))
    assert lost(walk)[cut] > 0, "h2's running tickets should be counted lost"
    # link back: the slave finds the master by itself
    wait_for(lambda: cut in alive(walk), 30, "h2 to reconnect")


# -- the walkthrough: lifecycle --------------------------------------------------------------


def test_rolling_restart_drains_each_host_in_turn(walk: Walk, tmp_path: Path) -> None:
    wait_for(lambda: alive(walk) == set(HOSTS), 30, "all slaves alive")
    before, lost_before = {h: walk.pid(h, "slave") for h in HOSTS}, lost(walk)
    spec = sweep_spec(tmp_path / "roll.toml", "roll", 60, "sleep 0.5; echo {x}; hostname")
    sweep = subprocess.Popen([sys.executable, "-m", "ticketfarm", "run", str(spec), "--out", str(tmp_path / "out")],
                             cwd=ROOT, env=walk.exported(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        wait_for(lambda: all(list(walk.work_root(h).glob("roll/*")) for h in HOSTS), 20, "every host busy",
                 every=0.05)
        run = walk.step("rolling-restart")
        out, _ = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert run.ok(), run.output
    # serial 1: one batch per host, each drained before its restart
    assert run.output.count("PLAY [Upgrade and restart ticketfarm slaves") == len(HOSTS), run.output
    assert run.output.count("RUNNING HANDLER [ticketfarm_slave : Drain the slave]") == len(HOSTS), run.output
    after = {h: walk.pid(h, "slave") for h in HOSTS}
    assert all(after[h] and after[h] != before[h] for h in HOSTS), (before, after)
    assert sweep.returncode == 0, out
    assert sorted(results_by_host(tmp_path / "out" / "roll-results.csv")) == list(range(60))
    assert lost(walk) == lost_before, "a drained restart killed running tickets"
    assert alive(walk) == set(HOSTS)


def test_stop_and_start(walk: Walk) -> None:
    run = walk.step("stop-start")
    assert run.rc == 0, run.output
    stop, start = run.output.split("PLAY [Start ticketfarm slaves]")
    assert {h: int(c) for h, c in re.findall(r"^(h\d)\s+:\s+ok=\d+\s+changed=(\d+)", stop, re.M)} == \
        {h: 1 for h in HOSTS}, stop
    assert {h: int(c) for h, c in re.findall(r"^(h\d)\s+:\s+ok=\d+\s+changed=(\d+)", start, re.M)} == \
        {h: 1 for h in HOSTS}, start
    assert all(walk.pid(h, "slave") for h in HOSTS) and alive(walk) == set(HOSTS)
    run = walk.playbook("slaves-start.yml")
    assert run.ok() and run.changed() == {h: 0 for h in HOSTS}, run.output


def test_removing_a_host_revokes_its_key(walk: Walk) -> None:
    run = walk.step("remove-host")
    assert run.rc == 0, run.output
    h = "h3"
    assert walk.processes_of(h) == [] and not walk.home(h).exists() and not walk.work_root(h).exists()
    state = walk.tf / "master"
    assert not (state / "authorized" / "slaves" / f"{h}.key").exists()
    assert not list((state / "keys" / "slaves").glob(f"{h}.key*"))
    listed = run.stdout[run.stdout.rindex("PLAY RECAP"):]
    assert re.search(r"^slave\s+h1\s", listed, re.M) and not re.search(r"^slave\s+h3\s", listed, re.M), listed
    assert alive(walk) == {"h1", "h2"}
    again = walk.playbook("slaves-remove.yml", "--limit", h)
    assert again.ok() and again.changed() == {h: 0}, again.output


# -- the walkthrough: master on a host ----------------------------------------------------------


def test_master_on_a_host_registers_every_slave_on_the_first_run(walk: Walk) -> None:
    run = walk.step("master-on-host")
    TIMINGS["first deploy, master on h1 (site.yml)"] = run.seconds
    assert run.ok(), run.output
    assert set(run.recap) == set(HOSTS), run.output
    keys_state = walk.tf / "keys"
    assert walk.registered(f"tcp://{NET}.11:5555", keys_state) == {h: True for h in HOSTS}
    master_state = walk.root("h1") / "var" / "lib" / "ticketfarm-master"
    assert (master_state / "keys" / "master.key").read_bytes() == (keys_state / "keys" / "master.key").read_bytes()
    assert sorted(p.name for p in (master_state / "authorized" / "slaves").glob("h*.key")) == \
        [f"{h}.key" for h in HOSTS]
    for h in HOSTS:
        assert (walk.home(h) / "keys" / "master.key").read_bytes() == \
            (keys_state / "keys" / "master.key").read_bytes()


def test_master_on_a_host_second_run_changes_nothing(walk: Walk) -> None:
    run = walk.step("master-on-host-again")
    TIMINGS["second run, master on h1 (site.yml)"] = run.seconds
    assert run.ok(), run.output
    assert run.changed() == {h: 0 for h in HOSTS}, run.output


def test_remove_all_leaves_nothing_behind(walk: Walk) -> None:
    run = walk.step("remove-all")
    assert run.rc == 0, run.output
    for h in HOSTS:
        assert not walk.home(h).exists() and not walk.work_root(h).exists(), h
        assert list(walk.root(h).rglob("*.service")) == []
    assert not (walk.root("h1") / "opt" / "ticketfarm-master").exists()
    assert not (walk.root("h1") / "var" / "lib" / "ticketfarm-master").exists()
    assert list((walk.tf / "keys" / "authorized" / "slaves").glob("h*.key")) == []
    assert not Path("/etc/systemd/system/ticketfarm-slave.service").exists()
    assert not walk.hdir.exists(), "testhosts.sh down should have removed the hosts"


# -- lint ----------------------------------------------------------------------------------


def test_ansible_lint_production_profile() -> None:
    lint = shutil.which("ansible-lint")
    if lint is None:
        pytest.skip("ansible-lint not installed (pip install ansible-lint)")
    run = subprocess.run([lint, "--profile", "production", "--nocolor", "playbooks/"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr

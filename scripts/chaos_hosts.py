"""The slaves of a chaos run (scripts/chaos.py): deployed by the playbooks onto test hosts (network namespaces with
sshd, scripts/testhosts.sh), or started on loopback (`--local`); their links, their small work disk, their logs.

Deployed slaves are what an operator runs: `playbooks/slaves.yml` installs a venv built from this checkout on each
host and starts the slave under its supervisor (`ticketfarm-slavectl`), which restarts it when it dies. The chaos
signals the daemon processes themselves (their pid files), as the OOM killer or an operator's `kill -9` would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.testhosts import ROOT as REPO
from tests.testhosts import TESTHOSTS, run
from ticketfarm import keys

#: Size of the small work disk (tmpfs) of slave 1, the one the `disk_full` fault fills.
SMALL_DISK = "2m"


class Hosts:
    """Test hosts from scripts/testhosts.sh, one per slave, on a test /24 and with a bridge name no other run on
    this machine uses."""

    def __init__(self, root: Path, count: int):
        taken = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        free = next(k for k in range(70, 100) if f" 10.231.{k}.1/" not in taken and f"cx{k}br" not in taken)
        self.net, self.tag, self.count = f"10.231.{free}", f"cx{free}", count
        self.dir = root / "hosts"
        # TH_KEEP: `down` keeps the hosts' files, the slaves' logs among them (read by the check after it)
        self.env = dict(os.environ, TH_DIR=str(self.dir), TH_COUNT=str(count), TH_NET=self.net, TH_TAG=self.tag,
                        TH_KEEP="1")
        self.sh("up")

    def sh(self, *args: str) -> None:
        subprocess.run([str(TESTHOSTS), *args], env=self.env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def root(self, i: int) -> Path:
        return self.dir / "hosts" / f"h{i}" / "root"

    def inside(self, i: int, *cmd: str) -> subprocess.CompletedProcess[bytes]:
        """Run a command in host i's network and mount namespaces (where its sshd, and so its slave, lives)."""
        pid = (self.dir / "hosts" / f"h{i}" / "sshd.pid").read_text().strip()
        return subprocess.run(["nsenter", "-t", pid, "-n", "-m", "-u", "--", *cmd], capture_output=True)

    def cut(self, i: int, down: bool) -> None:
        self.sh("cut" if down else "heal", f"h{i}")

    def loss(self, i: int, on: bool) -> None:
        args = ["replace", "dev", f"{self.tag}v-h{i}", "root", "netem", "loss", "30%"] if on else \
            ["del", "dev", f"{self.tag}v-h{i}", "root"]
        subprocess.run(["tc", "qdisc", *args], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def down(self) -> None:
        self.sh("down")


class LocalSlaves:
    """Slave processes on loopback, started by this script (`--local`, or no test hosts on this machine)."""

    def __init__(self, root: Path, count: int, endpoint: str, state: Path, heartbeat: float):
        self.root, self.count, self.endpoint, self.state, self.heartbeat = root, count, endpoint, state, heartbeat
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def deploy(self) -> float:
        started = time.monotonic()
        for i in range(1, self.count + 1):
            self.start(i)
        return time.monotonic() - started

    def start(self, i: int) -> None:
        kdir = keys.keys_dir(self.state)
        cmd = [sys.executable, "-m", "slave", "--master", self.endpoint, "--name", f"slave-{i}", "--slots", "2",
               "--work-root", str(self.root / "work" / f"slave-{i}"), "--heartbeat", str(self.heartbeat),
               "--master-key", str(kdir / "master.key"), "--secret-key", str(kdir / "slave.key_secret"),
               "--log-level", "debug"]
        with open(self.root / f"slave-{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def pid(self, i: int) -> int | None:
        proc = self.procs.get(i)
        return proc.pid if proc is not None and proc.poll() is None else None

    def reap(self, i: int) -> None:
        self.procs[i].wait()

    def logs(self) -> list[Path]:
        return sorted(self.root.glob("slave-*.log"))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class DeployedSlaves:
    """Slaves installed and started on the test hosts by playbooks/slaves.yml, kept up by their supervisor."""

    def __init__(self, hosts: Hosts, endpoint: str, state: Path, heartbeat: float, liveness: int):
        self.hosts, self.count = hosts, hosts.count
        self.env = dict(os.environ, ANSIBLE_CONFIG=str(hosts.dir / "ansible.cfg"), TICKETFARM_STATE=str(state),
                        ANSIBLE_NOCOLOR="1", ANSIBLE_DEPRECATION_WARNINGS="0")
        self.extra = {"ticketfarm_master": endpoint, "ticketfarm_slave_heartbeat_interval": heartbeat,
                      "ticketfarm_slave_liveness": liveness, "ticketfarm_slave_slots": 2,
                      "ticketfarm_slave_log_level": "debug", "ticketfarm_slave_log_max_kb": 1 << 20,
                      "ticketfarm_slave_restart_delay": 1, "ticketfarm_slave_stop_timeout": 5,
                      # as root: the service user could not reach a run dir under a 0700 temporary dir
                      "ticketfarm_slave_user": ""}

    def home(self, i: int) -> Path:
        return self.hosts.root(i) / "opt" / "ticketfarm"

    def work_root(self, i: int) -> Path:
        return self.hosts.root(i) / "var" / "lib" / "ticketfarm"

    def deploy(self) -> float:
        """Slave 1's work root on a small tmpfs (in its host's mount namespace), then the playbook; its seconds."""
        disk = str(self.work_root(1))
        mounted = self.hosts.inside(1, "sh", "-c", f"mkdir -p {disk} && mount -t tmpfs -o size={SMALL_DISK} tmpfs "
                                    f"{disk}")
        if mounted.returncode:
            raise RuntimeError(f"cannot mount the small work disk: {mounted.stderr.decode()}")
        result = run(["ansible-playbook", str(REPO / "playbooks" / "slaves.yml"), "-e", json.dumps(self.extra)],
                     self.env)
        if not result.ok():
            raise RuntimeError(f"playbooks/slaves.yml failed:\n{result.output[-4000:]}")
        return result.seconds

    def ctl(self, i: int, action: str) -> None:
        self.hosts.inside(i, str(self.home(i) / "bin" / "ticketfarm-slavectl"), action)

    def start(self, i: int) -> None:
        """Back up now, if its supervisor has not restarted it yet (it backs off while a slave keeps dying)."""
        if self.pid(i) is None:
            self.ctl(i, "restart")

    def pid(self, i: int) -> int | None:
        """The slave daemon's pid (from its supervisor's pid file), while it runs."""
        try:
            pid = int((self.home(i) / "run" / "slave.pid").read_text())
            if str(self.home(i)) in " ".join(psutil.Process(pid).cmdline()) and \
                    psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return pid
        except (OSError, ValueError, psutil.Error):
            pass
        return None

    def reap(self, i: int) -> None:
        """Its supervisor waits for it."""

    def logs(self) -> list[Path]:
        return sorted(log for i in range(1, self.count + 1) for log in (self.home(i) / "log").glob("slave.log*"))

    def fill_disk(self, full: bool) -> None:
        """Fill slave 1's work disk to the last byte (its workers and its outbox then fail with ENOSPC), or free it."""
        filler = str(self.work_root(1) / ".chaos-filler")
        cmd = ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"] if full else ["rm", "-f", filler]
        self.hosts.inside(1, *cmd)

    def stop_all(self) -> None:
        for i in range(1, self.count + 1):
            if (pid := self.pid(i)) is not None:
                os.kill(pid, signal.SIGCONT)
            self.ctl(i, "stop")
        self.hosts.inside(1, "umount", "-l", str(self.work_root(1)))


def workers(pid: int | None) -> list[psutil.Process]:
    """The running workers of the slave `pid` (its children but the watchdog)."""
    try:
        children = psutil.Process(pid).children() if pid else []
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if "slave.watchdog" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue  # exited meanwhile
    return found

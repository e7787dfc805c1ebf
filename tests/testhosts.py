"""Test hosts (scripts/testhosts.sh: network namespaces with sshd) and Ansible runs on them, shared by
tests/test_ansible.py and scripts/chaos.py: can this machine run them, a playbook run and its recap, the
processes left naming a path."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTHOSTS = ROOT / "scripts" / "testhosts.sh"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def why_not(tag: str) -> str | None:
    """Why this machine cannot run test hosts with Ansible, or None when it can (`tag`: a netns name prefix)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "test hosts need root (ip netns add, sshd); run as root, as CI does"
    for tool in ("ip", "unshare", "nsenter", "setpriv", "ssh", "ssh-keygen", "ansible-playbook"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 util-linux openssh-client; pip install ansible-core)"
    if not Path("/usr/sbin/sshd").exists():
        return "/usr/sbin/sshd not found (apt-get install openssh-server)"
    probe = f"{tag}-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


@dataclass
class Run:
    """One command run (a walkthrough block, ansible-playbook, ticketfarm deploy): exit code, output, recap."""

    rc: int
    output: str
    seconds: float
    stdout: str = ""
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def changed(self) -> dict[str, int]:
        return {host: r["changed"] for host, r in self.recap.items()}

    def ok(self) -> bool:
        return self.rc == 0 and all(r["failed"] == 0 and r["unreachable"] == 0 for r in self.recap.values())

    def failed(self) -> set[str]:
        return {host for host, r in self.recap.items() if r["failed"]}


def run(cmd: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 600) -> Run:
    """Run a command (ansible-playbook, a walkthrough block) and read the play recap from its output."""
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    result = Run(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started, proc.stdout)
    for m in RECAP.finditer(proc.stdout):
        result.recap[m.group(1)] = {"ok": int(m.group(2)), "changed": int(m.group(3)),
                                    "unreachable": int(m.group(4)), "failed": int(m.group(5))}
    return result


def processes_naming(mark: str) -> list[int]:
    """Pids of the processes (but this one) whose command line contains `mark`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mark in cmdline and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found

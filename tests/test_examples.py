"""The shipped examples run as a user would run them, and give real results."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
from pathlib import Path

from tests.conftest import free_port, run_cli, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_compress_example_collects_a_size_per_parameter_set(tmp_path: Path) -> None:
    result = run_cli("--state", "st", "run", str(EXAMPLES / "compress.toml"), "--local", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "ticketfarm-results" / "compress-sizes.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(EXAMPLES / "compress.csv", newline="") as fh:
        params = list(csv.DictReader(fh, delimiter="|"))
    assert [{k: r[k] for k in ("tool", "level", "kind", "kb")} for r in rows] == params
    by = {(r["tool"], r["level"], r["kind"]): int(r["compressed_bytes"]) for r in rows}
    assert all(int(r["input_bytes"]) == 512 * 1024 for r in rows)
    assert by[("gzip", "9", "text")] < by[("gzip", "1", "text")]      # higher level, smaller output
    assert by[("gzip", "9", "repeat")] < by[("gzip", "9", "random")]  # repetitive data compresses
    blocks = (tmp_path / "ticketfarm-results" / "compress-blocks.txt").read_text()
    assert blocks.count("# task=") == len(params)


README = EXAMPLES.parent / "README.md"


def walkthrough(text: str, name: str) -> list[str]:
    """The commands of a `<!-- walkthrough: NAME -->` block, continuation lines joined."""
    body = re.search(rf"<!-- walkthrough: {name} -->\n```sh\n(.*?)```", text, re.S).group(1)
    return [c for c in re.sub(r"\\\n\s*", "", body).splitlines() if c.strip() and not c.lstrip().startswith("#")]


def test_the_readme_cluster_walkthrough_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    subst = {"/srv/tf": str(tmp_path / "tf"), "/scratch/tf": str(tmp_path / "scratch"),
             "master-host:5555": f"127.0.0.1:{port}"}
    (tmp_path / "sweep.toml").write_text('name = "hello"\ncommand = "echo {n}"\n[parameters.grid]\nn = [1, 2, 3]\n')
    background: list[subprocess.Popen[bytes]] = []
    results = []
    try:
        for command in walkthrough(README.read_text(), "cluster"):
            for old, new in subst.items():
                command = command.replace(old, new)
            if re.search(r"&\s*(#.*)?$", command):
                background.append(subprocess.Popen(["bash", "-c", command.split("&")[0]], cwd=tmp_path,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                   start_new_session=True))
                if " master" in command:
                    keys_made = tmp_path / "tf" / "keys" / "master.key_secret"
                    wait_for(keys_made.exists, 30, "the master to make its keys")
                    assert keys_made.stat().st_mode & 0o777 == 0o600
                continue
            results.append(subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                                          timeout=120))
            if len(results) == 1:  # the first start: master.toml only, to review (here: its bind, for the slave)
                assert results[0].returncode == 2 and "review it" in results[0].stderr, results[0].stderr
                assert not (tmp_path / "tf" / "keys").exists()
                config = tmp_path / "tf" / "master.toml"
                config.write_text(config.read_text().replace('bind = "tcp://127.0.0.1:5555"',
                                                             f'bind = "tcp://127.0.0.1:{port}"', 1))
            else:
                assert results[-1].returncode == 0, (command, results[-1].stdout, results[-1].stderr)
    finally:
        for proc in reversed(background):  # the slave, then the master: each in a session of its own
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
    run, status = results[-2], results[-1]
    assert "wall time" in run.stdout and (tmp_path / "ticketfarm-results" / "hello-results.csv").exists()
    assert re.search(r"^hello\s+finished\s+3\s+3\b", status.stdout, re.M), status.stdout

"""Every command a page shows is run by a test as written: README.md's and docs/*.md's walkthroughs."""
from __future__ import annotations

import csv
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.httpcluster import TOKEN, HttpCluster
from tests.walkthrough import PAGES, ROOT, RUNNABLE, Shell, blocks, commands, walkthroughs

README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: page -> walkthrough name -> the test (file::function) that runs it as written
RUN_BY = {
    "README.md": {
        "first-lines": "test_walkthroughs.py::test_readme_first_lines_install_and_run_a_sweep",
        "quickstart": "test_walkthroughs.py::test_readme_first_lines_install_and_run_a_sweep",
        "cluster": "test_walkthroughs.py::test_readme_cluster_runs_a_sweep_on_a_slave_of_its_own",
        "slurm": "test_slurm.py::test_the_readme_walkthrough_runs_a_sweep_on_slurm_slaves",
        "python": "test_walkthroughs.py::test_readme_python_example_prints_what_it_says",
        "parallel": "test_parallel.py::test_walkthroughs_print_what_the_docs_show",
    },
    "docs/CLI.md": {"completion": "test_cli.py::test_bash_completes_verbs_and_options"},
    "docs/PARALLEL.md": {"parallel-tour": "test_parallel.py::test_walkthroughs_print_what_the_docs_show"},
    "docs/DEPLOY.md": {name: "test_ansible.py::test_the_page_has_every_walkthrough_step" for name in (
        "hosts", "master", "first-deploy", "second-run", "sweep", "rolling-restart", "stop-start", "remove-host",
        "master-on-host", "master-on-host-again", "remove-all")},
    "docs/HTTP.md": {
        "submit": "test_walkthroughs.py::test_http_page_submits_and_follows_a_sweep_with_curl",
        "events": "test_walkthroughs.py::test_http_page_submits_and_follows_a_sweep_with_curl",
    },
    "docs/PYTHON-API.md": {
        "example": "test_walkthroughs.py::test_python_api_example_and_attach_run_as_written",
        "attach": "test_walkthroughs.py::test_python_api_example_and_attach_run_as_written",
        "dask-joblib": "test_executor.py::test_the_dask_and_joblib_example_of_the_python_docs_runs_as_written",
    },
    "docs/SPEC-REFERENCE.md": {
        "validator-file": "test_walkthroughs.py::test_spec_reference_validator_file_rejects_with_its_reason",
        "retry-forget": "test_walkthroughs.py::test_spec_reference_retry_failed_then_forget",
        "pause-cancel": "test_walkthroughs.py::test_spec_reference_pause_resume_cancel_collect_prune",
        "collect-prune": "test_walkthroughs.py::test_spec_reference_pause_resume_cancel_collect_prune",
    },
}


def page_key(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    home = tmp_path / "home"
    home.mkdir()
    sh = Shell(home)
    yield sh
    sh.close()


# -- the pages' blocks and the tests that run them --------------------------------------------


def test_every_command_block_on_a_page_is_a_walkthrough_some_test_runs() -> None:
    unnamed = [f"{page_key(b.page)}:{b.line}" for page in PAGES for b in blocks(page)
               if b.lang in RUNNABLE and b.name is None]
    assert not unnamed, (f"blocks of commands no test runs: {unnamed}; put `<!-- walkthrough: NAME -->` before "
                         "each and run it as written from a test listed in tests/test_walkthroughs.py RUN_BY")
    named = {page_key(page): list(walkthroughs(page)) for page in PAGES if walkthroughs(page)}
    assert {page: sorted(names) for page, names in named.items()} == \
           {page: sorted(names) for page, names in RUN_BY.items()}


def test_each_listed_test_exists() -> None:
    for runs in RUN_BY.values():
        for where in set(runs.values()):
            file, function = where.split("::")
            assert f"def {function}(" in (ROOT / "tests" / file).read_text(), where


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    first = commands(walkthroughs(README)["first-lines"])
    readme_test = re.search(r"then: (.+)$", first[1]).group(1).strip()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert first[1].startswith("bash .ci/run") and ci[-1].strip() == readme_test


# -- README -----------------------------------------------------------------------------------


def checkout_copy(dest: Path) -> Path:
    """This checkout's tracked files, as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_readme_first_lines_install_and_run_a_sweep(tmp_path: Path) -> None:
    """`pip install -e . && ticketfarm run examples/compress.toml --local 2` in a fresh checkout and a venv of
    its own that sees the machine's packages (pip builds with the package index .ci/run installed from)."""
    first = commands(walkthroughs(README)["first-lines"])[0]
    assert commands(walkthroughs(README)["quickstart"]) == first.split("#")[0].strip().split(" && ")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    checkout = checkout_copy(tmp_path / "ticketfarm")
    sh = Shell(checkout, env={"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": ""})
    result = sh.run(first, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(checkout / "ticketfarm-results" / "compress-sizes.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 15 and all(int(r["compressed_bytes"]) > 0 for r in rows)
    assert (checkout / "examples" / ".ticketfarm" / "state.db").exists()
    assert "Successfully installed ticketfarm" in result.stdout, result.stdout[-2000:]


def test_readme_cluster_runs_a_sweep_on_a_slave_of_its_own(tmp_path: Path, shell: Shell) -> None:
    tf, port = tmp_path / "tf", free_port()
    shell.subs = {"/srv/tf": str(tf), "/scratch/tf": str(tmp_path / "scratch"),
                  "tcp://master-host:5555": f"tcp://127.0.0.1:{port}"}
    first_start, master, add_slave, slave, run, status, collect = commands(walkthroughs(README)["cluster"])

    wrote = shell.run(first_start)
    assert wrote.returncode != 0 and "review it" in wrote.stderr + wrote.stdout
    config = (tf / "master.toml").read_text()  # the user's review: this master listens on the test's port
    (tf / "master.toml").write_text(re.sub(r'^bind = ".*"$', f'bind = "tcp://127.0.0.1:{port}"', config, flags=re.M))
    running = shell.start(master)
    wait_for(lambda: "listening" in shell.log(running), 30, "the master to listen")
    assert (tf / "keys" / "master.key_secret").stat().st_mode & 0o777 == 0o600

    made = shell.run(add_slave)
    assert made.returncode == 0, made.stderr
    for key in re.findall(r"(/\S+\.key(?:_secret)?)", made.stdout):  # "copy to the host with ...": the user does
        shutil.copy(key, shell.cwd)
    shell.start(slave)
    (shell.cwd / "sweep.toml").write_text('name = "mysweep"\ncommand = "echo $(( {x} * 3 ))"\n'
                                         '[parameters.grid]\nx = [1, 2, 3, 4]\n[results]\nout = "stdout"\n')
    ran = shell.run(run)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    with open(shell.cwd / "ticketfarm-results" / "mysweep-results.csv", newline="") as fh:
        assert sorted(int(r["out"]) for r in csv.DictReader(fh)) == [3, 6, 9, 12]
    shown = shell.run(status)
    assert shown.returncode == 0 and "mysweep" in shown.stdout, shown.stdout + shown.stderr
    collected = shell.run(collect)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    again = shell.run(collect)
    assert again.returncode == 1 and "were removed after collection" in again.stderr, again.stdout + again.stderr
    slaves = shell.run(f"ticketfarm --state {tf} slaves")
    assert "node7" in slaves.stdout, slaves.stdout + slaves.stderr


def test_readme_python_example_prints_what_it_says(shell: Shell) -> None:
    (shell.cwd / "example.py").write_text(walkthroughs(README)["python"])
    result = shell.run("python3 example.py", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{[x * x for x in range(10)]}\n1024\n"


# -- docs/HTTP.md -----------------------------------------------------------------------------


class Hooks(http.server.BaseHTTPRequestHandler):
    """A status-callback receiver: keeps each POSTed body."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_http_page_submits_and_follows_a_sweep_with_curl(tmp_path: Path, shell: Shell) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed (.ci/run installs it)")
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    Hooks.received = []
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    cluster = HttpCluster(tmp_path / "state", n=2)
    try:
        shell.subs = {"localhost:8080": cluster.url.removeprefix("http://"),
                      "http://127.0.0.1:9000/hook": f"http://127.0.0.1:{hooks.server_address[1]}/hook"}
        shell.env["TOKEN"] = TOKEN
        page = walkthroughs(DOCS / "HTTP.md")
        submitted = shell.script(page["submit"])
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["sweep"] == "squares"
        followed = shell.script(page["events"], timeout=60)
        assert followed.returncode == 0, followed.stderr
        kinds = re.findall(r"^event: (\w+)$", followed.stdout, re.M)
        assert "tasks_done" in kinds and kinds[-1] == "sweep_finished", kinds
        wait_for(lambda: any(h.get("state") == "finished" for h in Hooks.received), 30, "the finished callback")
        table = cluster.get("/api/v1/sweeps/squares/collect?format=jsonl", token=TOKEN)
        rows = [json.loads(line) for line in table.body.splitlines()]
        assert sorted(row["results"]["stdout"].strip() for row in rows) == ["1", "4", "9"], table.body
    finally:
        cluster.close()
        hooks.shutdown()


# -- docs/PYTHON-API.md -----------------------------------------------------------------------


def test_python_api_example_and_attach_run_as_written(tmp_path: Path, shell: Shell) -> None:
    page = walkthroughs(DOCS / "PYTHON-API.md")
    (shell.cwd / "example_pyapi.py").write_text(page["example"])
    example = shell.run("python example_pyapi.py", timeout=120)
    assert example.returncode == 0, example.stderr
    lines = example.stdout.splitlines()
    assert lines[0] == "[0, 1, 7, 2, 5, 8, 16, 3, 19, 6]"
    assert sorted(int(x) for x in lines[1:4]) == [111, 118, 178]
    assert lines[4].startswith("remote error: invalid literal for int()")

    state, port = tmp_path / "tf", free_port()
    state.mkdir()
    (state / "master.toml").write_text(f'bind = "tcp://127.0.0.1:{port}"\n')
    shell.env["TICKETFARM_STATE"] = str(state)
    shell.subs = {"tcp://127.0.0.1:5555": f"tcp://127.0.0.1:{port}"}
    master = shell.start("ticketfarm master")
    wait_for(lambda: "listening" in shell.log(master), 30, "the master to listen")
    shell.start(f"ticketfarm-slave --master tcp://127.0.0.1:{port} --master-key {state}/keys/master.key "
                f"--secret-key {state}/keys/slave.key_secret --slots 2 --work-root {tmp_path / 'work'}")
    (shell.cwd / "example_attach.py").write_text(shell.substitute(page["attach"]))
    attach = shell.run("python example_attach.py", timeout=240)
    assert attach.returncode == 0, attach.stderr
    assert attach.stdout.split() == ["1000", "178"]


# -- docs/SPEC-REFERENCE.md -------------------------------------------------------------------


def test_spec_reference_validator_file_rejects_with_its_reason(shell: Shell) -> None:
    (shell.cwd / "checks.py").write_text(walkthroughs(DOCS / "SPEC-REFERENCE.md")["validator-file"])
    (shell.cwd / "sweep.toml").write_text(
        'name = "energies"\ncommand = "echo {x} > energy"\nmax_attempts = 1\n'
        'validate = {python = "checks.py:validate"}\n[parameters.grid]\nx = [-1.5, 2]\n'
        '[results]\nenergy = "file:energy"\n')
    ran = shell.run("ticketfarm run sweep.toml --local 1")
    assert ran.returncode != 0
    stats = shell.run("ticketfarm stats")
    assert "positive energy 2.0 for x=2" in stats.stdout + ran.stdout + ran.stderr, stats.stdout + ran.stderr


def test_spec_reference_retry_failed_then_forget(shell: Shell) -> None:
    first, retry_failed, forget = commands(walkthroughs(DOCS / "SPEC-REFERENCE.md")["retry-forget"])
    spec = shell.cwd / "sweep.toml"
    spec.write_text('name = "walk"\ncommand = "sleep {s}; echo {i}"\ntimeout = 1\nmax_attempts = 1\n'
                    '[parameters]\ncsv = "p.csv"\n[results]\nout = "stdout"\n')
    (shell.cwd / "p.csv").write_text("i,s\n" + "".join(f"{i},{2.5 if i in (1, 4, 7) else 0}\n" for i in range(8)))
    timed_out = shell.run(first)
    assert timed_out.returncode != 0 and "Failed tasks of walk (3)" in timed_out.stdout, timed_out.stdout
    spec.write_text(spec.read_text().replace("timeout = 1", "timeout = 10"))
    again = shell.run(retry_failed)
    assert again.returncode == 0, again.stdout + again.stderr
    with open(shell.cwd / "ticketfarm-results" / "walk-results.csv", newline="") as fh:
        assert sorted(int(r["out"]) for r in csv.DictReader(fh)) == list(range(8))
    gone = shell.run(forget)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert "walk" not in shell.run("ticketfarm status").stdout


def test_spec_reference_pause_resume_cancel_collect_prune(tmp_path: Path, shell: Shell) -> None:
    state, port = tmp_path / "tf", free_port()
    state.mkdir()
    (state / "master.toml").write_text(f'bind = "tcp://127.0.0.1:{port}"\nheartbeat_interval = 0.2\n')
    shell.env["TICKETFARM_STATE"] = str(state)
    master = shell.start("ticketfarm master")
    wait_for(lambda: "listening" in shell.log(master), 30, "the master to listen")
    shell.start(f"ticketfarm-slave --master tcp://127.0.0.1:{port} --master-key {state}/keys/master.key "
                f"--secret-key {state}/keys/slave.key_secret --slots 1 --work-root {tmp_path / 'work'} "
                "--heartbeat 0.2")
    (shell.cwd / "sim.toml").write_text('name = "sim"\ncommand = "sleep 5; echo {n}"\n'
                                        '[parameters.grid]\nn = {range = [40]}\n[results]\nout = "stdout"\n')
    submitted = shell.run("ticketfarm submit sim.toml")
    assert submitted.returncode == 0, submitted.stderr
    for command in commands(walkthroughs(DOCS / "SPEC-REFERENCE.md")["pause-cancel"]):
        done = shell.run(command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    status = shell.run("ticketfarm status")
    assert re.search(r"sim\s.*cancel", status.stdout), status.stdout
    for command in commands(walkthroughs(DOCS / "SPEC-REFERENCE.md")["collect-prune"]):
        done = shell.run(command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    assert (shell.cwd / "results").is_dir()

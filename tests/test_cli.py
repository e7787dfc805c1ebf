"""The command line as a new user meets it: --version, --local alone, options after the verb, JSON views,
shell completion, documented exit codes, and a next step in every "cannot"."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ticketfarm
from ticketfarm import errors, exitcodes
from ticketfarm.cli_options import bare_local, core_count
from tests.conftest import REPO, MasterProcess, run_cli, write_spec
from tests.walkthrough import Shell, commands, walkthroughs

SPEC = """
    name = "mixed"
    command = "echo {n}; if [ {n} = 2 ]; then echo 'no input for 2' >&2; exit 3; fi"
    max_attempts = 1
    [parameters.grid]
    n = [0, 1, 2, 3]
"""


@dataclass
class Ran:
    """One finished local run (a failed task among done ones) whose state the view tests read."""

    dir: Path
    result: subprocess.CompletedProcess[str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=self.dir)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    root = tmp_path_factory.mktemp("cli")
    write_spec(root, SPEC)
    # --local without N, and the global --state after the verb
    return Ran(root, run_cli("run", "spec.toml", "--local", "--state", "st", cwd=root))


def test_version_is_the_package_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == f"ticketfarm {ticketfarm.__version__}\n"


def test_local_alone_starts_one_slave_per_core_and_options_work_after_the_verb(ran: Ran) -> None:
    assert ran.result.returncode == exitcodes.FAILED.code, ran.result.stderr
    assert (ran.dir / "st" / "state.db").exists() and not (ran.dir / ".ticketfarm").exists()
    slaves = json.loads(ran.cli("slaves", "--format", "json", "--state", "st").stdout)["slaves"]
    # a slave slow to start may find the sweep over before it registers: the names, not their number, are certain
    assert {s["name"] for s in slaves} <= {f"local-{i}" for i in range(1, core_count() + 1)}
    assert "`ticketfarm retry mixed`" in ran.result.stderr  # the failed run says what to do next
    assert core_count() == len(os.sched_getaffinity(0))
    n = f"--local={core_count()}"
    assert bare_local(["run", "x.toml", "--local"]) == ["run", "x.toml", n]
    assert bare_local(["run", "--local", "x.toml"]) == ["run", n, "x.toml"]
    assert bare_local(["--local", ":::", "--local"]) == [n, ":::", "--local"]  # a command's own words are its own
    assert bare_local(["parallel", "--local", "echo"]) == ["parallel", "--local", "echo"]
    assert bare_local(["run", "x.toml", "--local", "3"]) == ["run", "x.toml", "--local", "3"]


def test_local_alone_follows_the_cpu_affinity(tmp_path: Path) -> None:
    write_spec(tmp_path, 'name = "one"\ncommand = "true"\n')
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "ticketfarm", "run", "--local", "spec.toml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    slaves = json.loads(run_cli("--state", ".ticketfarm", "slaves", "--format", "json", cwd=tmp_path).stdout)
    assert [s["name"] for s in slaves["slaves"]] == ["local-1"]


def test_a_wrong_log_level_is_refused_with_the_choices(tmp_path: Path) -> None:
    result = run_cli("status", "--log-level", "verbose", cwd=tmp_path)
    assert result.returncode == exitcodes.USAGE.code
    assert "invalid choice: 'verbose' (choose from 'debug', 'info', 'warning', 'error', 'critical')" in result.stderr
    env = {**os.environ, "TICKETFARM_LOG": "loud"}
    result = subprocess.run([sys.executable, "-m", "ticketfarm", "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == exitcodes.USAGE.code and "$TICKETFARM_LOG='loud' is not a log level" in result.stderr


# -- views -----------------------------------------------------------------------------------------------
OPENAPI = json.loads((REPO / "docs" / "openapi.json").read_text())
#: The API body each view prints with --format json (docs/CLI.md says the same).
SCHEMA_OF_VIEW = {"status": "Status", "stats": "Stats", "slaves": "SlaveList", "tasks": "TaskPage"}


def undocumented(value: Any, schema: dict[str, Any]) -> list[str]:
    """Keys of `value` that its OpenAPI schema does not name, recursively (a stable output documents them all)."""
    if "$ref" in schema:
        return undocumented(value, OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [undocumented(value, s) for s in schema[key] if s.get("type") != "null"]
            return min(options, key=len) if options else []
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return [k for k in value if k not in props] + [
            f"{k}.{m}" for k in value if k in props for m in undocumented(value[k], props[k])]
    if isinstance(value, list) and "items" in schema:
        return sorted({m for item in value for m in undocumented(item, schema["items"])})
    return []


@pytest.mark.parametrize("view", ["status", "stats", "slaves", "tasks"])
def test_json_views_are_the_documented_api_bodies(ran: Ran, view: str) -> None:
    import jsonschema

    args = [view, "mixed"] if view == "tasks" else [view]
    result = ran.cli("--state", "st", *args, "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    schema = {"$ref": f"#/components/schemas/{SCHEMA_OF_VIEW[view]}", "components": OPENAPI["components"]}
    jsonschema.validate(data, schema)
    assert undocumented(data, schema) == []
    assert view in (REPO / "docs" / "CLI.md").read_text()


def test_tasks_shows_each_task_with_its_slave_exit_code_and_reason(ran: Ran) -> None:
    data = json.loads(ran.cli("tasks", "mixed", "--state", "st", "--format", "json").stdout)
    by_task = {t["task"]: t for t in data["tasks"]}
    assert [by_task[i]["state"] for i in range(4)] == ["done", "done", "failed", "done"]
    assert by_task[2]["exit_code"] == 3 and "no input for 2" in by_task[2]["reason"]
    assert by_task[0]["exit_code"] == 0 and by_task[0]["slave"].startswith("local-") and by_task[0]["elapsed"] > 0
    lines = ran.cli("tasks", "mixed", "--state", "st").stdout.splitlines()
    assert lines[0].split() == ["task", "state", "attempts", "slave", "elapsed", "s", "exit", "reason"]
    assert re.match(r"2\s+failed\s+1\s+local-\d\s+\d+\.\d\s+3\s+exit code 3: no input for 2", lines[4]), lines[4]


def test_status_and_stats_tables_come_from_the_same_bodies(ran: Ran) -> None:
    status = ran.cli("--state", "st", "status").stdout.splitlines()
    assert status[0].split()[:3] == ["sweep", "state", "tasks"] and status[2].split()[:3] == ["mixed", "finished", "4"]
    stats = ran.cli("stats", "--state", "st").stdout
    assert stats.startswith("Sweeps\n") and "Failed tasks of mixed (1)" in stats


# -- completion ------------------------------------------------------------------------------------------
def completions(script: Path, line: str) -> list[str]:
    """What bash offers for the last word of `line`, with the completion script sourced."""
    words = line.split(" ")
    probe = (f"source {script}\nCOMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}; "
             f"COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}\n"
             f"_shtab_ticketfarm ticketfarm '{words[-1]}' '{words[-2]}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return [w.strip() for w in result.stdout.splitlines() if w.strip()]


def test_bash_completes_verbs_and_options(tmp_path: Path) -> None:
    shell = Shell(tmp_path / "home", env={"HOME": str(tmp_path / "home")})
    (tmp_path / "home").mkdir()
    for command in commands(walkthroughs(REPO / "docs" / "CLI.md")["completion"]):
        assert shell.run(command).returncode == 0, command
    script = tmp_path / "home" / ".local/share/bash-completion/completions/ticketfarm"
    assert set(completions(script, "ticketfarm sta")) == {"status", "stats"}
    assert {"status", "stats", "slaves", "submit"} <= set(completions(script, "ticketfarm s"))
    assert completions(script, "ticketfarm tas") == ["tasks"]
    assert "--format" in completions(script, "ticketfarm status --fo")
    assert "--retry-failed" in completions(script, "ticketfarm run spec.toml --re")
    zsh = (tmp_path / "home" / ".zfunc" / "_ticketfarm").read_text()
    assert zsh.startswith("#compdef ticketfarm") and "status" in zsh


# -- exit codes ------------------------------------------------------------------------------------------
def test_every_error_has_an_exit_code_and_the_docs_list_exactly_the_codes() -> None:
    kinds = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TicketfarmError)]
    assert sorted(c.__name__ for c in kinds if c not in exitcodes.BY_ERROR) == []
    assert set(exitcodes.BY_ERROR.values()) <= set(exitcodes.ALL)
    doc = (REPO / "docs" / "CLI.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+) \|$", doc, re.M)
    assert [(int(c), n) for c, n, _ in rows] == [(e.code, e.name) for e in exitcodes.ALL]
    assert len({e.code for e in exitcodes.ALL}) == len(exitcodes.ALL)


# -- first mistakes --------------------------------------------------------------------------------------
def test_first_mistakes_each_say_what_to_do_next(tmp_path: Path) -> None:
    MasterProcess(tmp_path / "m", "tcp://127.0.0.1:1")  # a master's config and keys; never started
    mistakes = {
        ("status",): (exitcodes.USAGE, "no ticketfarm state here (no state.db), so no status to show: pass --state DIR"),
        ("cancel", "nosuch"): (exitcodes.UNREACHABLE, "no master config in .ticketfarm, so no master to ask: pass "
                                                       "--master ADDRESS or --state DIR"),
        ("--state", "m", "run", "spec.toml"): (exitcodes.UNREACHABLE, "(nothing listens there): start one with "
                                                                      "`ticketfarm master` (same --state), or run "
                                                                      "with `--local`"),
        ("run", "spec.toml", "--local", "0"): (exitcodes.USAGE, "--local 0: a local run needs at least 1 slave "
                                                                "(--local alone: one per core)"),
        ("--state", "fresh", "master"): (exitcodes.USAGE, "review it, then run `ticketfarm --state fresh master`"),
        ("run", "quoted.toml"): (exitcodes.USAGE, "write {n} instead"),
        ("run", "sweep.toml", "--local"): (exitcodes.USAGE, "sweep.toml: no such spec file (a relative path is "
                                                            f"taken from {tmp_path}): give the path of a sweep spec"),
    }
    write_spec(tmp_path, 'name = "s"\ncommand = "echo {n}"\n[parameters.grid]\nn = [1]\n')
    write_spec(tmp_path, 'name = "q"\ncommand = "echo \'{n}\'"\n[parameters.grid]\nn = [1]\n', "quoted.toml")
    for args, (code, said) in mistakes.items():
        result = run_cli(*args, cwd=tmp_path)
        assert (result.returncode, said in result.stderr) == (code.code, True), (args, result.stderr)


def test_refusals_of_a_running_master_name_the_next_step(master: MasterProcess, tmp_path: Path) -> None:
    state = str(master.state)
    result = run_cli("--state", state, "cancel", "nosuch", cwd=tmp_path)
    assert result.returncode == exitcodes.REFUSED.code
    assert result.stderr == "ticketfarm: no sweep named 'nosuch'; `ticketfarm status` lists the sweeps\n"
    result = run_cli("pause", "nosuch", "--task", "3", "--state", state, cwd=tmp_path)
    assert result.returncode == exitcodes.REFUSED.code
    assert "`ticketfarm tasks nosuch` shows its tasks and their states" in result.stderr
    result = run_cli("tasks", "nosuch", "--state", state, cwd=tmp_path)
    assert result.returncode == exitcodes.REFUSED.code and "`ticketfarm status` lists them" in result.stderr


def test_the_glossary_defines_the_words_and_user_docs_speak_of_features() -> None:
    glossary = (REPO / "docs" / "GLOSSARY.md").read_text()
    defined = re.findall(r"^\*\*([\w ]+)\*\* —", glossary, re.M)
    assert {"sweep", "task", "ticket", "attempt", "slave", "slot", "outbox", "master", "state dir",
            "collection"} <= set(defined)
    readme = (REPO / "README.md").read_text()
    assert "(docs/GLOSSARY.md)" in readme and "(docs/CLI.md)" in readme
    user_docs = [REPO / "README.md", *(p for p in (REPO / "docs").glob("*.md") if p.name != "PROTOCOL.md")]
    history = re.compile(r"(?i:\bissue \d+)|\bTargets of\b|(?i:\bseed \d{3}\b)")
    assert [f"{p.name}: {m.group(0)}" for p in user_docs for m in history.finditer(p.read_text())] == []

"""What a new user coming from GNU parallel or concurrent.futures runs into: no silently wrong results, retries,
state found beside the spec, collections that never collide."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from master.store import Store
from tests.conftest import run_cli, write_spec

XZ_GRID = """
    name = "sizes"
    command = "xz -{level} -c {file} | wc -c"
    max_attempts = 1
    [parameters.grid]
    file = [FILES]
    level = [1, 2, 3]
    [results]
    size = "stdout"
"""


def test_a_failing_pipeline_fails_its_task_with_the_reason_it_gave(tmp_path: Path) -> None:
    # parallel -j4 'xz -{2} -c {1} | wc -c' ::: a b ::: 1 2 3, with a and b relative: not in the work dir.
    write_spec(tmp_path, XZ_GRID.replace("FILES", '"a", "b"'))
    (tmp_path / "a").write_text("a" * 1000)
    (tmp_path / "b").write_text("b" * 1000)
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "2", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    store = Store(tmp_path / "st" / "state.db", readonly=True)
    try:
        failed = store.failed_tasks("sizes")
    finally:
        store.close()
    assert len(failed) == 6
    assert all("exit code 1" in reason and "xz: " in reason and "No such file" in reason for _, _, reason in failed)
    assert "Failed tasks of sizes (6)" in result.stdout and "No such file" in result.stdout
    assert "note: parameter file = 'a' (and 1 more) names a file beside spec.toml" in result.stderr
    assert 'set cwd = "spec" in spec.toml' in result.stderr


def sizes_of(state: Path, sweep: str, n: int) -> list[int]:
    store = Store(state / "state.db", readonly=True)
    try:
        return [int(store.outputs(sweep, i)["size"].data) for i in range(n)]
    finally:
        store.close()


def test_cwd_spec_runs_relative_names_beside_the_spec_from_any_directory(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    write_spec(job, 'cwd = "spec"\n' + XZ_GRID.replace("FILES", '"a", "b"'))
    (job / "a").write_text("a" * 1000)
    (job / "b").write_text("b" * 1000)
    result = run_cli("run", "job/spec.toml", "--local", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(0 < s < 1000 for s in sizes_of(job / ".ticketfarm", "sizes", 6))
    assert "note:" not in result.stderr


def test_cwd_submit_runs_where_the_user_is_and_a_missing_one_says_why(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a").write_text("a" * 1000)
    write_spec(tmp_path, 'cwd = "submit"\n' + XZ_GRID.replace("FILES", '"a"'))
    result = run_cli("--state", "../st", "run", "../spec.toml", "--local", "1", cwd=data)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(0 < s < 1000 for s in sizes_of(tmp_path / "st", "sizes", 3))
    write_spec(tmp_path, f'cwd = "{tmp_path}/gone"\n' + XZ_GRID.replace("FILES", '"a"').replace("sizes", "gone"))
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot start worker: cwd {tmp_path}/gone is not a directory on slave local-1" in result.stdout


def test_absolute_input_paths_give_real_sizes(tmp_path: Path) -> None:
    files = [tmp_path / "a", tmp_path / "b"]
    for f in files:
        f.write_text(f.name * 1000)
    write_spec(tmp_path, XZ_GRID.replace("FILES", ", ".join(f'"{f}"' for f in files)))
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store(tmp_path / "st" / "state.db", readonly=True)
    try:
        sizes = [int(store.outputs("sizes", i)["size"].data) for i in range(6)]
    finally:
        store.close()
    assert all(0 < s < 1000 for s in sizes), sizes


def test_a_success_with_empty_results_and_stderr_is_warned_about(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "quiet"
        command = "if [ {n} = 1 ]; then echo 'cannot open input' >&2; else echo {n}; fi"
        [parameters.grid]
        n = [0, 1]
    """)
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning: 1 done task(s) of quiet exited 0 with every result empty but wrote to stderr" in result.stdout
    assert "task 1: exit code 0, every result empty, stderr: cannot open input" in result.stdout
    assert "task 0:" not in result.stdout


def flaky_spec(tmp_path: Path, extra: str = "") -> None:
    """Task n fails until the file ok-n exists; every run is logged, to tell re-runs apart."""
    write_spec(tmp_path, f"""
        name = "flaky"
        command = "echo {{n}} >> {tmp_path}/runs.log; test -e {tmp_path}/ok-{{n}} || {{ echo 'not yet' >&2; exit 3; }}; echo {{n}}"
        max_attempts = 1
        {extra}
        [parameters.grid]
        n = [0, 1, 2, 3]
    """)


def runs(tmp_path: Path) -> list[int]:
    return sorted(int(x) for x in (tmp_path / "runs.log").read_text().split())


def test_retry_failed_reruns_only_failed_tasks_under_a_changed_timeout(tmp_path: Path) -> None:
    (tmp_path / "ok-0").touch()
    (tmp_path / "ok-2").touch()
    flaky_spec(tmp_path)
    first = run_cli("--state", "st", "run", "spec.toml", "--local", "2", cwd=tmp_path)
    assert first.returncode == 1 and "Failed tasks of flaky (2)" in first.stdout, first.stdout + first.stderr
    (tmp_path / "ok-1").touch()
    (tmp_path / "ok-3").touch()
    flaky_spec(tmp_path, "timeout = 30")
    refused = run_cli("--state", "st", "run", "spec.toml", "--local", "2", cwd=tmp_path)
    assert refused.returncode == 6  # refused: the sweep exists with another spec
    assert "(timeout changed)" in refused.stderr and "--retry-failed" in refused.stderr
    retried = run_cli("--state", "st", "run", "spec.toml", "--local", "2", "--retry-failed", cwd=tmp_path)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "flaky: retrying 2 failed task(s)" in retried.stderr
    assert runs(tmp_path) == [0, 1, 1, 2, 3, 3]  # done tasks never ran again
    store = Store(tmp_path / "st" / "state.db", readonly=True)
    try:
        row = store.sweep("flaky")
        assert row is not None and row.sweep().timeout == 30 and row.state == "finished"
        assert store.task_counts("flaky") == {"done": 4}
        assert [a["state"] for a in store.attempts_of("flaky", 1)] == ["failed", "done"]
    finally:
        store.close()


def test_retry_failed_refuses_a_spec_changed_beyond_timeout_and_attempts(tmp_path: Path) -> None:
    flaky_spec(tmp_path)
    assert run_cli("--state", "st", "run", "spec.toml", "--local", "1", cwd=tmp_path).returncode == 1
    (tmp_path / "spec.toml").write_text((tmp_path / "spec.toml").read_text().replace("echo {n}\"", "echo x{n}\""))
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "1", "--retry-failed", cwd=tmp_path)
    assert result.returncode == 6
    assert "a retry may change only timeout, max_attempts, but command differs" in result.stderr
    assert "ticketfarm forget flaky" in result.stderr
    assert runs(tmp_path) == [0, 1, 2, 3]


def test_retry_one_task_without_a_master_then_run_resumes_it(tmp_path: Path) -> None:
    flaky_spec(tmp_path)
    assert run_cli("--state", "st", "run", "spec.toml", "--local", "1", cwd=tmp_path).returncode == 1
    (tmp_path / "ok-2").touch()
    done_one = run_cli("--state", "st", "retry", "flaky", "--task", "2", cwd=tmp_path)
    assert done_one.returncode == 0, done_one.stderr
    assert "flaky: queued again: task(s) 2" in done_one.stdout
    again = run_cli("--state", "st", "run", "spec.toml", "--local", "1", cwd=tmp_path)
    assert again.returncode == 1  # 0, 1 and 3 still failed
    assert runs(tmp_path) == [0, 1, 2, 2, 3]
    store = Store(tmp_path / "st" / "state.db", readonly=True)
    try:
        assert store.task_counts("flaky") == {"done": 1, "failed": 3}
    finally:
        store.close()
    bad = run_cli("--state", "st", "retry", "flaky", "--task", "2", cwd=tmp_path)
    assert bad.returncode == 6 and "task 2 of 'flaky' is done: only a failed or cancelled task" in bad.stderr


def test_forget_deletes_a_sweep_so_its_name_starts_anew(tmp_path: Path) -> None:
    flaky_spec(tmp_path)
    assert run_cli("--state", "st", "run", "spec.toml", "--local", "1", cwd=tmp_path).returncode == 1
    asked = subprocess.run([sys.executable, "-m", "ticketfarm", "--state", "st", "forget", "flaky"], cwd=tmp_path,
                           input="n\n", capture_output=True, text=True, timeout=60)
    assert asked.returncode == 1 and "nothing deleted" in asked.stdout
    forgot = run_cli("--state", "st", "forget", "flaky", "--yes", cwd=tmp_path)
    assert forgot.returncode == 0, forgot.stderr
    for n in range(4):
        (tmp_path / f"ok-{n}").touch()
    again = run_cli("--state", "st", "run", "spec.toml", "--local", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" not in again.stderr
    assert runs(tmp_path) == [0, 0, 1, 1, 2, 2, 3, 3]
    gone = run_cli("--state", "st", "forget", "nosuch", "--yes", cwd=tmp_path)
    assert gone.returncode == 6 and "no sweep named 'nosuch'" in gone.stderr


COUNTED = """
    name = "walk"
    command = "echo {n} >> RUNS; echo {n}"
    [parameters.grid]
    n = [0, 1, 2]
"""


def test_a_local_run_keeps_its_state_beside_the_spec_from_any_directory(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    write_spec(job, COUNTED.replace("RUNS", str(tmp_path / "runs.log")), name="sweep.toml")
    first = run_cli("run", "sweep.toml", "--local", "1", cwd=job)
    assert first.returncode == 0, first.stderr
    assert "new state dir .ticketfarm for walk" in first.stderr
    from_parent = run_cli("run", "job/sweep.toml", "--local", "1", "--out", "out", cwd=tmp_path)
    assert from_parent.returncode == 0, from_parent.stderr
    assert "resuming sweep walk (finished) from job/.ticketfarm" in from_parent.stderr
    assert not (tmp_path / ".ticketfarm").exists()
    assert runs(tmp_path) == [0, 1, 2]


def test_a_local_run_refuses_a_fresh_state_beside_the_spec_when_one_is_here(tmp_path: Path) -> None:
    write_spec(tmp_path, COUNTED.replace("RUNS", str(tmp_path / "runs.log")), name="sweep.toml")
    assert run_cli("run", "sweep.toml", "--local", "1", cwd=tmp_path).returncode == 0
    job = tmp_path / "job"
    job.mkdir()
    (job / "sweep.toml").write_text((tmp_path / "sweep.toml").read_text())
    refused = run_cli("run", "job/sweep.toml", "--local", "1", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "ticketfarm: job/sweep.toml's state would be a new job/.ticketfarm (a local run keeps it beside its spec), "
        "but ./.ticketfarm exists here: pass --state .ticketfarm to use it, or --state job/.ticketfarm to start there"]
    assert not (job / ".ticketfarm").exists()
    assert runs(tmp_path) == [0, 1, 2]


def collected_sweep(name: str, runs_log: Path, mode: str, path: str) -> str:
    return f"""
        name = "{name}"
        command = "echo {name} >> {runs_log}; echo {{n}}"
        [parameters.grid]
        n = [0, 1]
        [[collect]]
        mode = "{mode}"
        path = "{path}"
    """


def test_a_second_sweep_never_overwrites_the_collection_of_the_first(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    write_spec(tmp_path, collected_sweep("walk", log, "table", "walk.csv"), name="walk.toml")
    write_spec(tmp_path, collected_sweep("walk2", log, "table", "walk.csv"), name="walk2.toml")
    assert run_cli("--state", "st", "run", "walk.toml", "--local", "1", "--out", "out", cwd=tmp_path).returncode == 0
    before = (tmp_path / "out" / "walk.csv").read_bytes()
    second = run_cli("--state", "st", "run", "walk2.toml", "--local", "1", "--out", "out", cwd=tmp_path)
    assert second.returncode == 2
    assert ("out/walk.csv holds the collection of sweep 'walk'; sweep 'walk2' collects to the same path"
            in second.stderr)
    assert log.read_text().split() == ["walk", "walk"]  # refused before anything ran
    assert (tmp_path / "out" / "walk.csv").read_bytes() == before
    # Collected later by hand, from the store, it is refused the same way.
    assert run_cli("--state", "st", "run", "walk2.toml", "--local", "1", "--out", "elsewhere",
                   cwd=tmp_path).returncode == 0
    by_hand = run_cli("--state", "st", "collect", "walk2", "--out", "out", cwd=tmp_path)
    assert by_hand.returncode == 2 and "sweep 'walk2' collects to the same path" in by_hand.stderr
    assert (tmp_path / "out" / "walk.csv").read_bytes() == before
    again = run_cli("--state", "st", "collect", "walk", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # a sweep may always rewrite its own


def test_folders_collections_never_mix_sweeps(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    write_spec(tmp_path, collected_sweep("a", log, "folders", "res"), name="a.toml")
    write_spec(tmp_path, collected_sweep("b", log, "folders", "res"), name="b.toml")
    assert run_cli("--state", "st", "run", "a.toml", "--local", "1", "--out", "out", cwd=tmp_path).returncode == 0
    stale = tmp_path / "out" / "res" / "7" / "stdout"
    stale.parent.mkdir()
    stale.write_text("left over")
    refused = run_cli("--state", "st", "run", "b.toml", "--local", "1", "--out", "out", cwd=tmp_path)
    assert refused.returncode == 2 and "holds the collection of sweep 'a'; sweep 'b'" in refused.stderr
    again = run_cli("--state", "st", "collect", "a", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "res").iterdir()) == ["0", "1"]  # nothing stale kept

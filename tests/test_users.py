"""What a new user coming from GNU parallel or concurrent.futures runs into: no silently wrong results, retries,
state found beside the spec, collections that never collide."""
from __future__ import annotations

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

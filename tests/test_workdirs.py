"""The slave's work dirs: each ticket's is empty and its own; emptied ones are reused, anything else removed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from slave.runner import MANIFEST, Outcome, Output
from slave.workdirs import SPARE_DIRS, WorkDirs


def test_a_released_dir_is_emptied_and_reused_for_the_next_ticket(tmp_path: Path) -> None:
    dirs = WorkDirs(tmp_path, "s1")
    first = tmp_path / "sweep" / "1"
    dirs.make(first)
    (first / ".tf-stdout").write_text("out")
    os.symlink("/etc", first / "link")  # a link is unlinked, never followed
    inode = first.stat().st_ino
    dirs.release(first)
    assert not first.exists() and os.path.isdir("/etc")
    second = tmp_path / "other-sweep" / "2"  # a sweep's first ticket: its parent is made
    dirs.make(second)
    assert second.stat().st_ino == inode and os.listdir(second) == []


def test_a_dir_with_subdirectories_is_removed_whole_and_an_existing_one_is_refused(tmp_path: Path) -> None:
    dirs = WorkDirs(tmp_path, "s1")
    path = tmp_path / "sweep" / "1"
    dirs.make(path)
    (path / "sub").mkdir()
    (path / "sub" / "f").write_text("x")
    dirs.release(path)
    assert not path.exists() and dirs.spares == []
    dirs.make(path)
    dirs.release(path)
    path.mkdir()
    with pytest.raises(FileExistsError):
        dirs.make(path)  # with a spare at hand: a rename must not replace the existing dir


def test_spares_are_bounded_kept_per_slave_and_reused_after_a_restart(tmp_path: Path) -> None:
    dirs = WorkDirs(tmp_path, "s1")
    paths = [tmp_path / "sweep" / str(i) for i in range(SPARE_DIRS + 5)]
    for p in paths:
        dirs.make(p)
    for p in paths:
        dirs.release(p)
    assert len(dirs.spares) == SPARE_DIRS and not any(p.exists() for p in paths)
    (Path(dirs.spares[0]) / "stray").write_text("x")  # written into a spare behind the slave's back
    again = WorkDirs(tmp_path, "s1")
    assert len(again.spares) == SPARE_DIRS and all(os.listdir(s) == [] for s in again.spares)
    assert WorkDirs(tmp_path, "s2").spares == []
    again.make(paths[0])
    again.release(paths[0])
    assert len(set(again.spares)) == SPARE_DIRS  # new spare names never collide with adopted ones


def test_an_exit_code_output_has_no_file_and_survives_a_restart_in_the_manifest(tmp_path: Path) -> None:
    outcome = Outcome(7, "sweep", 3, True, 0, 0.01, outputs=[Output("code", "", 2, b"0\n"),
                                                            Output("out", str(tmp_path / ".tf-stdout"), 5)],
                      slave="s1")
    outcome.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [MANIFEST]
    loaded = Outcome.load(tmp_path / MANIFEST)
    assert loaded.outputs[0] == Output("code", "", 2, b"0\n")
    assert loaded.outputs[1] == Output("out", str(tmp_path / ".tf-stdout"), 5, None)

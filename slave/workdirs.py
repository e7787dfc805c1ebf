"""Per-ticket work dirs: every ticket gets an empty directory of its own; emptied ones are kept and reused.

Making and above all removing a directory is the slowest file-system step of a tiny ticket (`rmdir` took ~1.2 ms
on this project's disk with online discard, a `rename` ~15 µs), so an acknowledged ticket's directory is emptied of
its files and renamed into a small pool of this slave's under `<work_root>/.free/`, and the next ticket's directory
is renamed out of it. A directory that holds more than plain files is removed whole instead.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from pathlib import Path

#: Emptied directories kept for reuse at most (more than a slave holds tickets between two ACKs).
SPARE_DIRS = 64
#: The pool's folder: sweep names start with a letter or digit, so it is never a sweep's.
FREE = ".free"


class WorkDirs:
    """Makes and releases the work dirs under one root."""

    def __init__(self, root: Path, slave: str):
        # One pool per slave name: slaves may share a work root.
        self.pool = root / FREE / hashlib.sha256(slave.encode()).hexdigest()[:16]
        self.pool.mkdir(parents=True, exist_ok=True)
        self.spares: list[str] = []
        leftovers = os.listdir(self.pool)
        for name in leftovers:  # a previous run's spares serve this one (removing them is the slow part)
            spare = os.path.join(self.pool, name)
            if self._empty(Path(spare)):
                self.spares.append(spare)
            else:
                shutil.rmtree(spare, ignore_errors=True)
        self.names = itertools.count(1 + max((int(n) for n in leftovers if n.isdigit()), default=-1))

    def make(self, path: Path) -> None:
        """An empty directory at `path` (and its parent); FileExistsError when `path` exists already."""
        if not self.spares:
            path.mkdir(parents=True)
            return
        if os.path.lexists(path):  # a rename would silently replace an empty directory
            raise FileExistsError(f"work dir {path} exists already")
        spare = self.spares.pop()
        try:
            os.rename(spare, path)
        except FileNotFoundError:  # the sweep's first ticket here: no parent yet
            path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(spare, path)

    def release(self, path: Path) -> None:
        """Done with a ticket's directory: emptied and kept as a spare, or removed whole."""
        if len(self.spares) < SPARE_DIRS and self._empty(path):
            spare = str(self.pool / str(next(self.names)))
            try:
                os.rename(path, spare)
                self.spares.append(spare)
                return
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _empty(path: Path) -> bool:
        """Unlink the directory's files; False when it holds anything else (or is gone)."""
        try:
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
        except OSError:  # a subdirectory (IsADirectoryError / EPERM), or the directory itself is gone
            return False
        return True

"""The shipped examples run as a user would run them, and give real results."""
from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import run_cli

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


"""Pieces of the e2e harness, without a CLI: the version matrix's protocol
recorder (matrix.py) and the wait for a CLI built in the background."""

import json
import os
import subprocess
import sys
import time

import matrix
from conftest import wait_for_build


def test_protocols_from_counters_and_log():
    before = {"verbatim": 1, "delta": 4, "journal": 10}
    assert matrix.protocols(before, {"verbatim": 2, "delta": 6, "journal": 10}, "") == [
        "verbatim", "delta"]
    log = "started update 1 on o/p/s (version 3, journal v2)\n"
    assert matrix.protocols(before, {**before, "journal": 14}, log) == ["journal v2"]
    assert matrix.protocols(before, dict(before), log) == []


def test_table_has_a_column_per_cli_and_a_row_per_scenario(tmp_path):
    out = tmp_path / "m.jsonl"
    matrix.record(out, "test_up", "cli=v3.276.0", ["journal v2"])
    matrix.record(out, "test_up", "cli=v3.100.0", ["verbatim", "delta"])
    matrix.record(out, "test_login", "cli=v3.100.0", [])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert matrix.table(rows).splitlines() == [
        "| scenario | cli=v3.276.0 | cli=v3.100.0 |",
        "|---|---|---|",
        "| `test_up` | journal v2 | verbatim, delta |",
        "| `test_login` |  | none |"]


def test_wait_for_build_waits_for_a_live_builder(tmp_path):
    binary = tmp_path / "v9.9.9" / "pulumi"
    binary.parent.mkdir()
    builder = subprocess.Popen([sys.executable, "-c", (
        "import os, time; time.sleep(1); "
        f"open({str(binary)!r}, 'w').close(); os.chmod({str(binary)!r}, 0o755)")])
    (binary.parent / "building").write_text(str(builder.pid))
    t0 = time.monotonic()
    wait_for_build(binary, timeout=60)
    assert os.access(binary, os.X_OK) and time.monotonic() - t0 < 30
    builder.wait()
    # A stale marker (its builder gone) and no binary: no wait.
    binary.unlink()
    t0 = time.monotonic()
    wait_for_build(binary, timeout=60)
    assert time.monotonic() - t0 < 5

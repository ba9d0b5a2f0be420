"""The protocol recorder of the version matrix (e2e/matrix.py), without a CLI."""

import json

import matrix


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

"""Smoke runs of the benchmarks, so that they cannot rot.

Each script runs once at its smallest size with one repeat; the tests check
that the table and the JSON came out with every case and sane numbers. They
assert nothing about speed (the benchmarks are run by hand: see
docs/performance.md).
"""

import gzip
import json
import os
import re
import subprocess
import sys

from conftest import E2E_DIR


def run_script(name, *args, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PULUMI_") or k in ("PULUMI_BACKEND_VENV",
                                                     "PULUMI_BACKEND_CLI_CACHE")}
    proc = subprocess.run([sys.executable, str(E2E_DIR / name), *args], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_bench_cli_smoke(cli, tmp_path):
    out = tmp_path / "cli.json"
    table = run_script("bench_cli.py", "--sizes", "10", "--repeats", "1",
                       "--cli-version", cli.version, "--out", str(out))
    result = json.loads(out.read_text())
    assert result["machine"]["nproc"] >= 1 and cli.version.lstrip("v") in result["machine"]["cli"]
    cases = {(s["program"], s["backend"]) for s in result["samples"]}
    assert cases == {(p, b) for p in ("bulk", "dynamic") for b in ("ours", "file", "floor")}
    ops = ("create", "noop", "noop2", "add2", "export", "destroy")
    for s in result["samples"]:
        assert all(s["seconds"][op] > 0 for op in ops), s
        assert s["changes"]["create"].get("create", 0) >= 11, s  # 10 resources and the stack
        assert s["changes"]["noop"].keys() == {"same"}, s
        assert s["changes"]["add2"].get("create") == 2, s
        if s["backend"] == "ours":
            assert sum(s["server_cpu"].values()) > 0 and s["server_rss_mb"]["destroy"] > 0, s
        # Storage, in bytes: the create stores something, the export next to nothing.
        assert all(isinstance(v, int) for v in [*s["stored_bytes"].values(),
                                                 *s["disk_bytes"].values()]), s
        assert s["stored_bytes"]["create"] > 0 and abs(s["stored_bytes"]["export"]) < 65536, s
        assert s["disk_bytes_after_run"] == s["disk_bytes"]["destroy"] > 0, s
    assert len(result["medians"]) == 2 * len(ops)
    assert all(r["ours/file"] > 0 and r["ours/floor"] > 0 for r in result["medians"])
    for r in result["medians"]:
        assert all(isinstance(r[f"{b}_stored_mb"], float) for b in ("ours", "file", "floor")), r
        assert r["ours_database_mb"] > 0, r
    assert "instant (s)" not in table  # only when asked for
    assert table.count("\n| bulk | 10 |") == len(ops) and "| dynamic | 10 | destroy |" in table
    header = table.splitlines()[0]
    assert "| stored, ours (MB) | stored, file (MB) | stored, floor (MB) " \
           "| ours' database after (MB) |" in header, header
    cells = [line.split("|")[-5:-1] for line in table.splitlines()[2:2 + 2 * len(ops)]]
    assert all(float(c) >= -1e6 for row in cells for c in row), cells  # numbers, no dashes


def test_bench_cli_instant_smoke(cli, tmp_path):
    """The instant backend (e2e/instant_server.py) runs every operation and stores what ours
    stores; ours/instant and instant/floor come out in the table."""
    out = tmp_path / "cli.json"
    table = run_script("bench_cli.py", "--sizes", "2", "--repeats", "1", "--programs", "bulk",
                       "--backends", "ours,instant,floor", "--cli-version", cli.version,
                       "--out", str(out))
    samples = {s["backend"]: s for s in json.loads(out.read_text())["samples"]}
    assert samples.keys() == {"ours", "instant", "floor"} and not any(
        "error" in s for s in samples.values()), samples
    ours, instant = samples["ours"], samples["instant"]
    for op in ("create", "noop", "noop2", "add2", "destroy"):
        assert instant["changes"][op] == ours["changes"][op], op
    # What ours and instant store is the same state: the stack and 2 + 2 components.
    assert instant["changes"]["export"]["resources"] == ours["changes"]["export"]["resources"] \
        == 5, (instant["changes"], ours["changes"])
    assert sum(instant["server_cpu"].values()) > 0 and instant["stored_bytes"]["create"] > 0
    [row] = [r for r in json.loads(out.read_text())["medians"] if r["operation"] == "create"]
    assert row["ours/instant"] > 0 and row["instant/floor"] > 0 and row["instant_database_mb"] > 0
    header = table.splitlines()[0]
    assert "| ours (s) | instant (s) | floor (s) | ours/floor | ours/instant | instant/floor |" \
        in header and "file" not in header, header


def test_bench_server_smoke(tmp_path):
    out = tmp_path / "server.json"
    table = run_script("bench_server.py", "--mb", "0.2", "--rounds", "2", "--stacks", "20",
                       "--lifecycles", "3", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    sections = {r["section"].split(" (")[0] for r in rows}
    assert {"state 0.2 MB", "secrets", "20 stacks", "3 concurrent updates"} <= sections, sections
    assert len(rows) >= 13, rows
    assert all(0 < r["p50_s"] <= r["p95_s"] <= max(r["samples"]) and r["peak_rss_mb"] > 0
               for r in rows), rows
    assert all(r["rate_per_s"] > 0 for r in rows if "rate_per_s" in r), rows
    # Every row of a state size has at least --rounds samples (2): complete too.
    # (A page of events ends at about EVENT_PAGE_BYTES: 15 of these 16 KB events.)
    state = {re.sub(r"up to \d+ events", "up to N events",
                    r["operation"].split(" (")[0].split(":")[0]): len(r["samples"])
             for r in rows if r["section"].startswith("state 0.2 MB")}
    assert {"import", "complete", "journal batch of 100 entries", "verbatim checkpoint",
            "delta checkpoint", "engine events batch of up to 50",
            "events page back, up to N events"} <= state.keys(), state
    assert min(state.values()) >= 2, state
    assert "| state 0.2 MB" in table and "delta checkpoint" in table
    assert "| samples | p50 | p95 |" in table and "| events page back, up to " in table
    # The storage figures: one per state size, in the JSON and as a second table.
    [fig] = result["storage"]
    assert fig["section"] == "state 0.2 MB (12 res.)", fig
    assert fig["database_bytes"] >= fig["main_bytes"] > 0 and fig["page_size"] > 0, fig
    assert fig["page_count"] * fig["page_size"] <= fig["main_bytes"] + fig["wal_bytes"], fig
    assert fig["table_bytes"]["events"] > 0 and fig["table_bytes"]["deployments"] > 0, fig
    assert {"deployments", "checkpoints", "journal"} <= fig["written_bytes"].keys(), fig
    assert all(v > 0 for v in fig["written_bytes"].values()), fig
    storage = table.split("\n\n")[1]
    assert storage.startswith("| section | database (MB) |"), storage
    [line] = [x for x in storage.splitlines() if x.startswith("| state 0.2 MB")]
    assert all(float(c.replace(",", "")) >= 0 for c in line.split("|")[2:-1]), line


def test_bench_server_postgres_smoke(tmp_path):
    import postgres

    url = postgres.server().url()
    out = tmp_path / "server.json"
    table = run_script("bench_server.py", "--mb", "0.2", "--rounds", "2", "--stacks", "20",
                       "--lifecycles", "3", "--out", str(out), "--db-url", url)
    rows = json.loads(out.read_text())["rows"]
    pg = [r for r in rows if r["store"] == "postgresql"]
    assert {r["section"] for r in pg} == {"state 0.2 MB (12 res.) [postgresql]",
                                         "20 stacks [postgresql]",
                                         "3 concurrent updates [postgresql]"}, pg
    assert len(pg) == 14 and all(r["p95_s"] >= r["p50_s"] > 0 for r in pg), pg  # 2 paced rows
    assert "| 3 concurrent updates [postgresql] |" in table
    [fig] = [f for f in json.loads(out.read_text())["storage"] if f["store"] == "postgresql"]
    assert fig["database_bytes"] > 0 and fig["written_bytes"]["deployments"] > 0, fig
    assert "| state 0.2 MB (12 res.) [postgresql] |" in table.split("\n\n")[1]
    dbs = postgres.server().sql("SELECT datname FROM pg_database WHERE datname LIKE 'bench_%'")
    assert dbs == [], dbs  # the bench dropped what it made


def test_bench_import_smoke(tmp_path):
    out = tmp_path / "import.json"
    table = run_script("bench_import.py", "--stacks", "5", "--updates", "2", "--resources", "2",
                       "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["plain", "gzip"]
    assert all(r["stacks"] == 5 and r["versions"] == 10 and r["stacks_per_s"] > 0
               and r["mb_per_s"] > 0 for r in rows), rows
    assert "| plain | 5 | 10 |" in table and "| gzip | 5 | 10 |" in table


def test_bench_console_smoke(tmp_path):
    out = tmp_path / "console.json"
    table = run_script("bench_console.py", "--stacks", "5", "--resources", "30", "--steps", "10",
                       "--rounds", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["page"].split(",")[0] for r in rows[:3]] == ["stacks page", "resources page",
                                                           "update page"], rows
    assert all(r["median_s"] > 0 and r["html_bytes"] > 1000 for r in rows), rows
    assert "| stacks page, 7 stacks |" in table and "| 50 ms |" in table


def test_bench_search_smoke(tmp_path):
    out = tmp_path / "search.json"
    table = run_script("bench_search.py", "--stacks", "6", "--resources", "10", "--rounds", "2",
                       "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 13 and {r["as"] for r in rows} == {"root", "member"}, rows
    assert all(0 < r["p50_s"] <= r["p95_s"] <= max(r["samples"]) and len(r["samples"]) == 2
               for r in rows), rows
    everything = {r["as"]: r["results"] for r in rows if r["query"] == ""}
    assert everything == {"root": 60, "member": 30}, everything  # half the stacks readable
    assert result["indexed_stacks"] == 6 and result["index_build_s"] > 0, result
    assert "| query | as | results | p50 | p95 |" in table
    assert "| index built afresh, 6 stacks | | 60 |" in table


def test_bench_capacity_smoke(cli, tmp_path):
    """Record the CLI on a 2-resource program, replay it with 1 and 2 stacks at once on
    SQLite (and PostgreSQL, 1 replica, when the machine has it): every replayed update
    succeeds and every stack exports the recording's resource count after each operation."""
    import postgres

    stores, extra = ["sqlite"], []
    try:
        import psycopg  # noqa: F401
        if postgres.find_bindir():
            stores.append("pg1")
            extra = ["--db-url", postgres.server().url()]
    except ImportError:
        pass
    out, cache = tmp_path / "capacity.json", tmp_path / "cache"
    table = run_script("bench_capacity.py", "--programs", "bulk", "--sizes", "2",
                       "--concurrency", "1,2", "--stores", ",".join(stores),
                       "--cli-version", cli.version, "--cache", str(cache),
                       "--out", str(out), *extra)
    assert [p.name for p in cache.iterdir()] == [f"{cli.version}-bulk-2-16kb.json.gz"]
    result = json.loads(out.read_text())
    [rec] = result["recordings"]
    assert rec["ops"]["create"]["requests"] > 5 and rec["ops"]["init"]["requests"] > 0, rec
    rows = result["rows"]
    ops = ("create", "noop", "add2", "destroy")
    assert [(r["store"], r["n"], r["operation"]) for r in rows] == [
        (s, n, op) for s in stores for n in (1, 2) for op in ops], rows
    expected = {"create": 3, "noop": 3, "add2": 5, "destroy": 0}  # the stack and 2 + 2
    for r in rows:
        assert r["errors"] == 0 and r["resources_ok"], r
        assert r["exported_resources"] == [expected[r["operation"]]] * r["n"], r
        assert r["updates_per_min"] > 0 and r["server_cpu_per_update_s"] > 0, r
        assert r["peak_rss_mb"] > 0 and r["replayer_cpu_per_update_s"] >= 0, r
        assert r["journal_samples"] >= r["n"] and r["complete_samples"] == r["n"], r
        assert 0 < r["journal_p50_ms"] <= r["journal_p95_ms"] <= r["journal_p99_ms"], r
    assert all(r["db_growth_per_update_mb"] > 0 for r in rows if r["operation"] == "create")
    header = table.splitlines()[0]
    assert header == (
        "| store | program | resources | N | operation | updates/min "
        "| journal p50/p95/p99 (ms) | events p50/p95/p99 (ms) | complete p50/p95/p99 (ms) "
        "| server CPU/update (s) | peak RSS (MB) | DB growth/update (MB) "
        "| replayer CPU/update (s) | errors | resources ok |"), header
    assert table.count("| yes |") == len(rows) and "| sqlite | bulk | 2 | 2 | no-op |" in table


def test_bench_webhooks_smoke(tmp_path):
    """3 webhooks × 4 stack events with a fast and a 100 ms receiver: all 12 delivered."""
    out = tmp_path / "webhooks.json"
    table = run_script("bench_webhooks.py", "--hooks", "3", "--events", "4", "--slow-ms", "100",
                       "--timeout", "60", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["receiver"], r["delay_ms"]) for r in rows] == [("fast", 0), ("slow", 100)], rows
    for r in rows:
        assert r["due"] == 12 and r["delivered"] == 12, r
        assert r["deliveries_per_s"] > 0 and r["server_cpu_s"] > 0, r
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_max_s"], r
    assert table.splitlines()[0].startswith(
        "| receiver | hooks × events | delivered | deliveries/s | latency p50 (s) |")
    assert "| fast (0 ms) | 3 × 4 | 12/12 |" in table and "| slow (100 ms) | 3 × 4 | 12/12 |" \
        in table


def test_bench_capacity_replays_secrets_with_each_stacks_own_key(cli, tmp_path):
    """A dynamic provider's no-op decrypts what the create encrypted: each replayed stack
    sends ciphertexts of its own key, made before the phase, and the decrypts succeed."""
    out, cache = tmp_path / "capacity.json", tmp_path / "cache"
    run_script("bench_capacity.py", "--programs", "dynamic", "--sizes", "2",
               "--concurrency", "2", "--stores", "sqlite", "--ops", "create,noop",
               "--cli-version", cli.version, "--cache", str(cache), "--out", str(out))
    [recording] = cache.iterdir()
    with gzip.open(recording) as f:
        noop = json.load(f)["ops"]["noop"]["requests"]
    assert any(r["path"].endswith("/batch-decrypt") for r in noop)
    rows = json.loads(out.read_text())["rows"]
    assert [r["operation"] for r in rows] == ["create", "noop"], rows
    assert all(r["errors"] == 0 and r["resources_ok"] for r in rows), rows


def test_bench_capacity_peer_smoke(cli, tmp_path):
    """--peer-bin: the peer (here pulumi_backend.py itself standing in for the Go peer) is
    recorded through the recording proxy and replayed like the stores."""
    out, cache = tmp_path / "capacity.json", tmp_path / "cache"
    server = E2E_DIR.parent / "pulumi_backend.py"
    table = run_script("bench_capacity.py", "--programs", "bulk", "--sizes", "1",
                       "--concurrency", "1", "--stores", "peer", "--peer-bin", sys.executable,
                       "--peer-args", f"{server} --host 127.0.0.1 --port {{port}} "
                                      "--db {dir}/peer.db",
                       "--ops", "create,noop", "--cli-version", cli.version,
                       "--cache", str(cache), "--out", str(out))
    assert [p.name for p in cache.iterdir()] == [f"{cli.version}-bulk-1-16kb-peer.json.gz"]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["store"], r["operation"]) for r in rows] == [("peer", "create"),
                                                             ("peer", "noop")], rows
    assert all(r["errors"] == 0 and r["exported_resources"] == [2] for r in rows), rows
    assert all(r["server_cpu_per_update_s"] > 0 and r["complete_samples"] == 1 for r in rows)
    assert "| peer | bulk | 1 | 1 | no-op |" in table

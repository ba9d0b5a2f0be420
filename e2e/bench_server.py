#!/usr/bin/env python3
"""The server's hot paths without the CLI; prints markdown tables of p50 and p95.

    python3 e2e/bench_server.py [--mb 1,10,50] [--rounds 10] [--out FILE]

Each section starts its own ``pulumi_backend.py`` process (default flags but
--db, --port and, for the secrets rows, --crypto) and talks HTTP to it over
loopback with keep-alive, as the CLI does. A row gives the p50 and p95 of the
wall times seen by the client over its samples (at least ``--rounds``), so they
include HTTP parsing, gzip and the SQLite commit; the client's own JSON and gzip
are not timed. "peak RSS" is the server process's VmHWM while that row ran
(reset before each row through /proc/PID/clear_refs; where the kernel refuses,
the peak so far). Machines are noisy: compare rows of one run, not runs of
different days. Benchmarks assert nothing.

Sections: per state size (``--mb``): ``--rounds`` journal updates, each on the
base state imported again (import timed) so that the state does not grow: 3
batches of 100 journal entries (50 new 16 KB resources, begin and success) and
``complete``, sent back to back (the worst case: ``complete`` waits for the
replay of the base state and the batches), then again paced as a real update
(``PACE`` seconds before each batch and ``complete``); export (stored gzip passed
through, and decoded for a client without gzip); ``--rounds`` checkpoint updates (older CLIs): one verbatim
checkpoint, 3 delta checkpoints, ``complete``; engine events of no-op updates as
the CLI posts them (batches of 50: a resourcePreEvent and a resOutputsEvent per
resource, metadata with old and new inputs and outputs), then read back page by
page (``GET .../events?continuationToken=``). After each state size, a second
table gives the storage: the database's size on disk (main file, WAL), its free
pages, the bytes each table takes on disk (SQLite's dbstat, indexes included),
and the bytes of state written per table (/metrics,
``pulumi_backend_state_bytes_written_total``). Then: secrets: batch-encrypt and
batch-decrypt of 1,000 values per crypto implementation; list stacks with
``--stacks`` (1,000) stacks; ``--lifecycles`` (20) concurrent update lifecycles
(create, start, journal, complete). ``--out`` (default ``bench-server.json``)
keeps every sample (``rows``) and the storage figures (``storage``).

``--db-url postgresql://USER@HOST/DB`` (needs psycopg) runs the state sizes, the
stack list and the concurrent lifecycles again on PostgreSQL, section names
ending in ``[postgresql]``: each server gets a new database, created through
that URL and dropped afterwards (the user needs CREATEDB). ``--db-url local``
starts a throwaway PostgreSQL from the machine's packages (e2e/postgres.py), with
fsync on as SQLite's FULL synchronous mode.
The RSS column is the server's only, not PostgreSQL's; its storage rows have the
database's size (/metrics) and the bytes written, not SQLite's page figures.
"""

import argparse
import base64
import gzip
import hashlib
import http.client
import json
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cli import padding  # noqa: E402
from server_process import ServerProcess  # noqa: E402

ORG = "organization"
PROJECT = "bench"
SP = f"/api/stacks/{ORG}/{PROJECT}/{{}}"
PAD_KB = 16  # state per resource, as in bench_cli.py
STACK_URN = "urn:pulumi:s::bench::pulumi:pulumi:Stack::bench-s"
PROVIDER = "urn:pulumi:s::bench::pulumi:providers:test::default::provider-id"
JOURNAL_BATCHES = 3  # batches of 100 journal entries per sampled journal update
CHECKPOINT_DELTAS = 3  # delta checkpoints after the verbatim one, per checkpoint update
#: Seconds before each journal batch and ``complete`` in the paced rows: the CLI sends a
#: batch at most every 50 ms, after steps that take time, and ``complete`` seconds after
#: the start, so the server has replayed the batches (and parsed the base) by then.
PACE = 0.25
EVENT_BATCH = 50  # engine events per POST, as the CLI batches them (httpstate/state.go)


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, url: str):
        host, port = url.split("//", 1)[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=600)

    def call(self, method, path, body=None, token="token bench", gz=False, accept_gzip=False,
             gzipped=False):
        headers = {"Authorization": token, "Content-Type": "application/json",
                   "Accept": "application/vnd.pulumi+8"}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
            if gz:
                data = gzip.compress(data, 1)
            if gz or gzipped:
                headers["Content-Encoding"] = "gzip"
        if accept_gzip:
            headers["Accept-Encoding"] = "gzip"
        self.conn.request(method, path, data, headers)
        resp = self.conn.getresponse()
        out = resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status} {out[:300]!r}")
        if resp.getheader("Content-Encoding") == "gzip" and not accept_gzip:
            out = gzip.decompress(out)
        return out

    def close(self):
        self.conn.close()


def samples(fn, rounds: int) -> list:
    """Wall times of ``rounds`` calls of fn()."""
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


class Bench:
    def __init__(self, args, root: Path):
        self.args, self.root, self.rows, self.storage = args, root, [], []
        self.store = "sqlite"
        self.key = root / "master.key"
        self.key.write_bytes(os.urandom(32))
        self.databases = []  # PostgreSQL databases made for servers: dropped at the end

    def row(self, section: str, what: str, times: list, server: ServerProcess,
            per: float = 0.0, peak: Optional[float] = None):
        """Record p50 and p95 of ``times``; ``per`` items per sample gives a rate too.
        ``peak``: the server's peak RSS of these samples, when other rows' ran between
        them (see ``once``); otherwise the peak since the previous row."""
        p50, p95 = percentile(times, 50), percentile(times, 95)
        if self.store != "sqlite":
            section += f" [{self.store}]"
        row = {"section": section, "operation": what, "p50_s": p50, "p95_s": p95,
               "samples": times,
               "peak_rss_mb": server.peak_rss_mb() if peak is None else peak, "store": self.store}
        if per:
            row["rate_per_s"] = per / p50 if p50 > 0 else None
        self.rows.append(row)
        server.reset_peak()  # the next row's peak is its own
        print(f"{section:22} {what:48} p50 {p50 * 1000:9.1f} ms  p95 {p95 * 1000:9.1f} ms"
              f"  ({len(times)})", file=sys.stderr, flush=True)

    @staticmethod
    def once(server: ServerProcess, peaks: dict, key: str, fn) -> float:
        """Wall time of one fn(); the server's peak RSS during it raises peaks[key]."""
        server.reset_peak()
        t = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t
        peaks[key] = max(peaks.get(key, 0.0), server.peak_rss_mb())
        return elapsed

    def server(self, name: str, *flags) -> ServerProcess:
        directory = self.root / f"{name}-{self.store}"
        directory.mkdir()
        db = None
        if self.store == "postgresql":
            db = self.new_database(name)
            flags = ("--master-key-file", str(self.key), *flags)
        server = ServerProcess(directory, list(flags), db=db)
        server.start()
        server.reset_peak()
        return server

    def new_database(self, name: str) -> str:
        import psycopg

        db = f"bench_{name.replace('.', '_').replace('-', '_')}_{os.getpid()}"
        with psycopg.connect(self.args.db_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}"')
            conn.execute(f'CREATE DATABASE "{db}"')
        self.databases.append(db)
        return self.args.db_url.rsplit("/", 1)[0] + "/" + db

    def drop_databases(self) -> None:
        import psycopg

        with psycopg.connect(self.args.db_url, autocommit=True) as conn:
            for db in self.databases:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    # -- state size sections ---------------------------------------------------

    def state(self, mb: float) -> None:
        count = max(1, round(mb * 1e6 / (PAD_KB * 1024 + 350)))
        section = f"state {mb:g} MB ({count} res.)"
        resources = [{"urn": STACK_URN, "custom": False, "type": "pulumi:pulumi:Stack"}]
        resources += [resource(i) for i in range(count)]
        doc = {"version": 3, "deployment": {
            "manifest": {"time": "2026-01-01T00:00:00Z", "magic": "", "version": ""},
            "resources": resources}}
        raw = json.dumps(doc, separators=(",", ":")).encode()
        server = self.server(f"state-{mb:g}")
        try:
            c = Client(server.url)
            sp = SP.format("s")
            c.call("POST", f"/api/stacks/{ORG}/{PROJECT}", {"stackName": "s"})
            self.journal_rounds(c, sp, section, count, raw, server)
            c.call("POST", sp + "/import", gzip.compress(raw, 1), gzipped=True)  # the base again
            self.row(section, "export, stored gzip passed through", samples(
                lambda: c.call("GET", sp + "/export", accept_gzip=True), self.args.rounds), server)
            self.row(section, "export, decoded (client without gzip)", samples(
                lambda: c.call("GET", sp + "/export"), self.args.rounds), server)
            self.checkpoint_rounds(c, sp, section, count, server)
            self.events(c, sp, section, count, server)
            self.storage_figures(c, section, server)
            c.close()
        finally:
            server.stop()

    def journal_rounds(self, c: Client, sp: str, section: str, count: int, raw: bytes,
                       server: ServerProcess) -> None:
        """``--rounds`` updates, each on the base state imported again (so that the
        state does not grow from round to round): JOURNAL_BATCHES batches of 100
        entries creating 50 new resources each, then ``complete``; sent back to
        back, then again with the pauses of a real update (``PACE``)."""
        bodies = [journal_body(count, b) for b in range(JOURNAL_BATCHES)]  # not timed
        for pace, label in ((0.0, ""), (PACE, f", paced {PACE:g} s")):
            imports, batches, completes, peaks = [], [], [], {}
            for _ in range(self.args.rounds):
                gz = gzip.compress(raw, 1)
                imports.append(self.once(server, peaks, "import", lambda: c.call(
                    "POST", sp + "/import", gz, gzipped=True)))
                uid, tok = start_update(c, sp, journal=True)
                for body in bodies:
                    time.sleep(pace)
                    batches.append(self.once(server, peaks, "batch", lambda: c.call(
                        "PATCH", f"{sp}/update/{uid}/journalentries", body, token=tok,
                        gzipped=True)))
                time.sleep(pace)
                completes.append(self.once(server, peaks, "complete",
                                           lambda: complete(c, sp, uid, tok)))
            if not pace:
                self.row(section, "import (gzip body)", imports, server, peak=peaks["import"])
            self.row(section, f"journal batch of 100 entries{label} (entries/s)", batches,
                     server, per=100, peak=peaks["batch"])
            self.row(section, f"complete: replay {JOURNAL_BATCHES * 100} entries, store{label}",
                     completes, server, peak=peaks["complete"])

    def checkpoint_rounds(self, c: Client, sp: str, section: str, count: int,
                          server: ServerProcess) -> None:
        """``--rounds`` updates of older CLIs: one verbatim upload of the whole state,
        CHECKPOINT_DELTAS deltas (header + one resource, edited in place: the
        state keeps its size), then ``complete``."""
        doc = [json.dumps(json.loads(c.call("GET", sp + "/export")), separators=(",", ":"))
               .encode()]
        edits = [0]  # deltas so far: which resource the next one edits
        verbatims, deltas, completes, peaks = [], [], [], {}

        def verbatim_body(seq: int) -> bytes:
            return gzip.compress(b'{"version":3,"untypedDeployment":' + doc[0] +
                                 b',"sequenceNumber":' + str(seq).encode() + b"}", 1)

        def delta_body(seq: int) -> bytes:
            old = doc[0]
            head = old[:old.index(b'"resources":[') + 13]
            new_head = (head.replace(b"00:00:00Z", b"00:00:01Z") if b"00:00:00Z" in head
                        else head.replace(b"00:00:01Z", b"00:00:00Z"))
            # One resource's edit, rewritten in place (its text need not change).
            marker = b'"n":' + str(edits[0] % count).encode() + b"}"
            edits[0] += 1
            at = old.index(marker, len(head))
            doc[0] = new_head + old[len(head):]
            return gzip.compress(json.dumps(
                {"version": 3, "checkpointHash": hashlib.sha256(doc[0]).hexdigest(),
                 "sequenceNumber": seq, "deploymentDelta": [
                     span_edit(0, len(head), new_head),
                     span_edit(at, at + len(marker), marker)]}).encode(), 1)

        for _ in range(self.args.rounds):
            uid, tok = start_update(c, sp, journal=False)
            up = f"{sp}/update/{uid}"
            body = verbatim_body(1)
            verbatims.append(self.once(server, peaks, "verbatim", lambda: c.call(
                "PATCH", up + "/checkpointverbatim", body, token=tok, gzipped=True)))
            for seq in range(2, 2 + CHECKPOINT_DELTAS):
                body = delta_body(seq)
                deltas.append(self.once(server, peaks, "delta", lambda: c.call(
                    "PATCH", up + "/checkpointdelta", body, token=tok, gzipped=True)))
            completes.append(self.once(server, peaks, "complete",
                                       lambda: complete(c, sp, uid, tok)))
        self.row(section, "verbatim checkpoint (whole state)", verbatims, server,
                 peak=peaks["verbatim"])
        self.row(section, "delta checkpoint (header + one resource)", deltas, server,
                 peak=peaks["delta"])
        self.row(section, "complete (checkpoint path)", completes, server,
                 peak=peaks["complete"])

    def events(self, c: Client, sp: str, section: str, count: int,
               server: ServerProcess) -> None:
        """No-op updates' engine events, as the CLI posts them (batches of
        EVENT_BATCH, two events of every resource), in as many updates as it
        takes to reach ``--rounds`` batches; then every page of them read back
        (gzip accepted, as the CLI does), until ``--rounds`` pages were timed."""
        per_update = -(-2 * count // EVENT_BATCH)
        updates, batches, peaks = [], [], {}
        while len(batches) < self.args.rounds:
            uid, tok = start_update(c, sp, journal=True)
            for b in range(per_update):
                body = events_body(count, b)  # built outside the timing
                batches.append(self.once(server, peaks, "events", lambda: c.call(
                    "POST", f"{sp}/update/{uid}/events/batch", body, token=tok, gzipped=True)))
            complete(c, sp, uid, tok)
            updates.append(uid)
        per_batch = 2 * count * len(updates) / len(batches)  # the last one may be short
        self.row(section, f"engine events batch of up to {EVENT_BATCH} (events/s)", batches,
                 server, per=per_batch, peak=peaks["events"])
        server.reset_peak()  # the pages' own peak, below
        pages, sizes = [], []
        while len(pages) < self.args.rounds:
            for uid in updates:
                token = ""
                while True:
                    path = f"{sp}/update/{uid}/events" + (
                        f"?continuationToken={token}" if token else "")
                    t = time.perf_counter()
                    out = c.call("GET", path, accept_gzip=True)
                    pages.append(time.perf_counter() - t)
                    page = json.loads(gzip.decompress(out) if out[:2] == b"\x1f\x8b" else out)
                    sizes.append(len(page["events"]))
                    token = page.get("continuationToken")
                    if not token:
                        break
        self.row(section, f"events page back, up to {max(sizes)} events (GET, gzip)", pages,
                 server)

    def storage_figures(self, c: Client, section: str, server: ServerProcess) -> None:
        """What the section left on disk and wrote, by table (a second table)."""
        metrics = read_metrics(c)
        written = metrics.get("pulumi_backend_state_bytes_written_total", {})
        fig = {"section": section, "store": self.store,
               "database_bytes": metrics["pulumi_backend_database_bytes"][""],
               "written_bytes": {labels.split('"')[1]: value for labels, value in written.items()}}
        if self.store == "sqlite":
            fig.update(sqlite_figures(str(server.db)))
        else:
            fig["section"] += f" [{self.store}]"
        self.storage.append(fig)

    # -- secrets -----------------------------------------------------------------

    def secrets(self) -> None:
        n = 1000
        plaintexts = [base64.b64encode(json.dumps(f"secret-{i}").encode()).decode()
                      for i in range(n)]
        for crypto in ("openssl", "python"):
            section = f"secrets ({crypto})"
            try:
                server = self.server("secrets-" + crypto, "--crypto", crypto)
            except RuntimeError as e:
                print(f"{section}: unavailable: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            try:
                c = Client(server.url)
                c.call("POST", f"/api/stacks/{ORG}/{PROJECT}", {"stackName": "k"})
                sp = SP.format("k")
                out = []

                def encrypt():
                    out[:] = json.loads(c.call("POST", sp + "/batch-encrypt",
                                               {"plaintexts": plaintexts}, gz=True))["ciphertexts"]
                self.row(section, f"batch-encrypt {n} secrets (secrets/s)",
                         samples(encrypt, self.args.rounds), server, per=n)
                self.row(section, f"batch-decrypt {n} secrets (secrets/s)", samples(
                    lambda: c.call("POST", sp + "/batch-decrypt", {"ciphertexts": out}, gz=True),
                    self.args.rounds), server, per=n)
                c.close()
            finally:
                server.stop()

    # -- many stacks, many updates ------------------------------------------------

    def list_stacks(self) -> None:
        n = self.args.stacks
        section = f"{n} stacks"
        server = self.server("stacks")
        try:
            c = Client(server.url)
            for i in range(n):
                c.call("POST", f"/api/stacks/{ORG}/p{i % 10}", {"stackName": f"s{i}"})

            def list_all():
                token, seen = None, 0
                while True:
                    path = "/api/user/stacks" + (f"?continuationToken={token}" if token else "")
                    page = json.loads(c.call("GET", path, accept_gzip=False))
                    seen += len(page["stacks"])
                    token = page.get("continuationToken")
                    if not token:
                        break
                assert seen == n, seen
            self.row(section, "list stacks (all pages)", samples(list_all, self.args.rounds),
                     server)
            c.close()
        finally:
            server.stop()

    def lifecycles(self) -> None:
        n = self.args.lifecycles
        section = f"{n} concurrent updates"
        server = self.server("lifecycles")
        try:
            c = Client(server.url)
            for i in range(n):
                c.call("POST", f"/api/stacks/{ORG}/{PROJECT}", {"stackName": f"u{i}"})
            c.close()
            errors = []

            def lifecycle(i):
                try:
                    client = Client(server.url)
                    sp = SP.format(f"u{i}")
                    uid, tok = start_update(client, sp, journal=True)
                    for b in range(5):  # 5 batches of 20 entries: 10 resources each
                        entries = []
                        for k in range(10):
                            op = b * 10 + k + 1
                            res = resource(op, stack=f"u{i}", pad_kb=1)
                            entries.append({"version": 1, "kind": 0, "sequenceID": 2 * op - 1,
                                            "operationID": op,
                                            "operation": {"resource": res, "type": "creating"}})
                            entries.append({"version": 1, "kind": 1, "sequenceID": 2 * op,
                                            "operationID": op, "state": res})
                        client.call("PATCH", f"{sp}/update/{uid}/journalentries",
                                    {"entries": entries}, token=tok, gz=True)
                    client.call("POST", f"{sp}/update/{uid}/complete", {"status": "succeeded"},
                                token=tok)
                    client.close()
                except Exception as e:  # reported below; a benchmark does not stop
                    errors.append(e)

            def all_at_once():
                threads = [threading.Thread(target=lifecycle, args=(i,)) for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0]
            self.row(section, f"{n} lifecycles of 50 resources, all at once (updates/s)",
                     samples(all_at_once, self.args.rounds), server, per=n)
        finally:
            server.stop()


def resource(i: int, stack: str = "s", pad_kb: float = PAD_KB) -> dict:
    """A custom resource with pad_kb KB of hex padding split over inputs and outputs."""
    pad = padding(f"r{i}", pad_kb / 2)
    return {"urn": f"urn:pulumi:{stack}::bench::test:index:Thing::r{i}", "custom": True,
            "id": f"id-{i}", "type": "test:index:Thing", "inputs": {"pad": pad},
            "outputs": {"pad": pad, "n": i}, "parent": STACK_URN}


def journal_body(count: int, batch: int) -> bytes:
    """Gzipped batch of 100 journal entries: 50 new resources, begin and success."""
    entries = []
    for k in range(batch * 50 + 1, batch * 50 + 51):
        res = resource(count + k)
        entries.append({"version": 1, "kind": 0, "sequenceID": 2 * k - 1, "operationID": k,
                        "removeOld": None, "removeNew": None,
                        "operation": {"resource": res, "type": "creating"}})
        entries.append({"version": 1, "kind": 1, "sequenceID": 2 * k, "operationID": k,
                        "removeOld": None, "removeNew": None, "state": res})
    return gzip.compress(json.dumps({"entries": entries}, separators=(",", ":")).encode(), 1)


def events_body(count: int, batch: int) -> bytes:
    """Gzipped batch of a no-op's engine events (apitype.EngineEventBatch): for
    every resource a resourcePreEvent and a resOutputsEvent of a "same" step,
    whose metadata carries the old and new inputs and outputs."""
    events = []
    for seq in range(batch * EVENT_BATCH, min((batch + 1) * EVENT_BATCH, 2 * count)):
        res = resource(seq // 2)
        state = {"type": res["type"], "urn": res["urn"], "custom": True, "id": res["id"],
                 "parent": STACK_URN, "inputs": res["inputs"], "outputs": res["outputs"],
                 "provider": PROVIDER}
        metadata = {"op": "same", "urn": res["urn"], "type": res["type"], "old": state,
                    "new": state, "detailedDiff": None, "provider": PROVIDER}
        kind = "resOutputsEvent" if seq % 2 else "resourcePreEvent"
        events.append({"sequence": seq, "timestamp": 1767225600 + seq,
                       kind: {"metadata": metadata}})
    return gzip.compress(json.dumps({"events": events}, separators=(",", ":")).encode(), 1)


def complete(c: Client, sp: str, uid: str, tok: str) -> None:
    c.call("POST", f"{sp}/update/{uid}/complete", {"status": "succeeded"}, token=tok)


def percentile(times: list, q: float) -> float:
    """The q-th percentile, interpolated between the closest samples."""
    ordered = sorted(times)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def read_metrics(c: Client) -> dict:
    """/metrics as {name: {label text: value}}; the label text is "" without labels."""
    out: dict = {}
    for line in c.call("GET", "/metrics").decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            out.setdefault(name, {})[labels.rstrip("}")] = float(value)
    return out


def sqlite_figures(path: str) -> dict:
    """Sizes of the database files and, through a read-only connection (the
    server keeps running), its pages and the bytes each table takes with its
    indexes (the dbstat table, where SQLite was built with it)."""
    fig = {"main_bytes": os.path.getsize(path),
           "wal_bytes": os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for pragma in ("page_size", "page_count", "freelist_count"):
            fig[pragma] = conn.execute(f"PRAGMA {pragma}").fetchone()[0]
        tables = dict(conn.execute("SELECT name, tbl_name FROM sqlite_schema"))
        try:
            stat = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
        except sqlite3.OperationalError:  # no dbstat in this build
            stat = []
        by_table: dict = {}
        for name, size in stat:
            table = tables.get(name, name)
            table = "events" if table.startswith("event_") else table  # schema 4's event tables
            by_table[table] = by_table.get(table, 0) + size
        fig["table_bytes"] = by_table
    finally:
        conn.close()
    return fig


def span_edit(start: int, end: int, text: bytes) -> dict:
    point = {"line": 1, "column": 1}
    return {"Span": {"uri": "", "start": {**point, "offset": start},
                     "end": {**point, "offset": end}}, "NewText": text.decode()}


def start_update(c: Client, sp: str, journal: bool) -> tuple:
    uid = json.loads(c.call("POST", sp + "/update", {"options": {"dryRun": False}}))["updateID"]
    start = json.loads(c.call("POST", f"{sp}/update/{uid}",
                              {"journalVersion": 1 if journal else 0}))
    return uid, "update-token " + start["token"]


def table(rows: list) -> str:
    lines = ["| section | operation | samples | p50 | p95 | rate (at p50) | server peak RSS (MB) |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        rate = f"{r['rate_per_s']:,.0f}/s" if r.get("rate_per_s") else ""
        lines.append(f"| {r['section']} | {r['operation']} | {len(r['samples'])} "
                     f"| {r['p50_s'] * 1000:,.1f} ms | {r['p95_s'] * 1000:,.1f} ms "
                     f"| {rate} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


STORED_TABLES = ("deployments", "journal", "checkpoints", "events")
WRITTEN_TABLES = ("deployments", "checkpoints", "journal")


def storage_table(figures: list) -> str:
    """Database size after each state section; bytes on disk per table (SQLite's
    dbstat, indexes included) and bytes of state written per table (/metrics)."""
    def mb(v):
        return "–" if v is None else f"{v / 1e6:,.1f}"

    lines = ["| section | database (MB) | of it WAL (MB) | free pages | "
             + " | ".join(f"{t} (MB)" for t in STORED_TABLES) + " | other tables (MB) | "
             + " | ".join(f"written: {t} (MB)" for t in WRITTEN_TABLES) + " |",
             "|---|" + "--:|" * (4 + len(STORED_TABLES) + len(WRITTEN_TABLES))]
    for f in figures:
        stored = f.get("table_bytes")
        other = (sum(v for k, v in stored.items() if k not in STORED_TABLES)
                 if stored else None)
        cells = [mb(f["database_bytes"]), mb(f.get("wal_bytes")),
                 f"{f['freelist_count']:,}" if "freelist_count" in f else "–"]
        cells += [mb(stored.get(t, 0) if stored else None) for t in STORED_TABLES]
        cells += [mb(other)] + [mb(f["written_bytes"].get(t)) for t in WRITTEN_TABLES]
        lines.append(f"| {f['section']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="1,10,50", help="state sizes in MB (default 1,10,50)")
    parser.add_argument("--rounds", type=int, default=10, help="samples per operation (default 10)")
    parser.add_argument("--stacks", type=int, default=1000, help="stacks to list (default 1000)")
    parser.add_argument("--lifecycles", type=int, default=20,
                        help="concurrent update lifecycles (default 20)")
    parser.add_argument("--out", default="bench-server.json", help="JSON results file")
    parser.add_argument("--db-url", help="also run on PostgreSQL: a postgresql:// URL whose "
                        "server the bench may create databases on, or 'local' for a "
                        "throwaway server")
    args = parser.parse_args()
    started = time.time()
    local = None
    if args.db_url == "local":
        import postgres

        local = postgres.PostgresServer(postgres.find_bindir(), durable=True)
        args.db_url = local.url()
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        bench = Bench(args, Path(tmp))
        sizes = [float(x) for x in args.mb.split(",") if x]
        try:
            for bench.store in ["sqlite"] + (["postgresql"] if args.db_url else []):
                for mb in sizes:
                    bench.state(mb)
                if bench.store == "sqlite":
                    bench.secrets()  # no storage in these rows
                bench.list_stacks()
                bench.lifecycles()
        finally:
            if bench.databases:
                bench.drop_databases()
            if local:
                local.stop()
    result = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              "rounds": args.rounds, "total_seconds": round(time.time() - started, 1),
              "rows": bench.rows, "storage": bench.storage}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(bench.rows))
    print()
    print(storage_table(bench.storage))
    print(f"\n{len(bench.rows)} rows in {result['total_seconds']:.0f} s on "
          f"{result['machine']['nproc']} cores; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The server's hot paths without the CLI; prints a markdown table of medians.

    python3 e2e/bench_server.py [--mb 1,10,50] [--rounds 10] [--out FILE]

Each section starts its own ``pulumi_backend.py`` process (default flags but
--db, --port and, for the secrets rows, --crypto) and talks HTTP to it over
loopback with keep-alive, as the CLI does. A figure is the median wall time of
``--rounds`` requests seen by the client, so it includes HTTP parsing, gzip and
the SQLite commit. "peak RSS" is the server process's VmHWM while that row ran
(reset before each row through /proc/PID/clear_refs; where the kernel refuses,
the peak so far). Machines are noisy: compare rows of
one run, not runs of different days. Benchmarks assert nothing.

Sections: per state size (``--mb``): import, export (stored gzip passed
through, and decoded for a client without gzip), journal batches of 100
entries (entries/s) and the completing replay, a verbatim checkpoint and delta
checkpoints; secrets: batch-encrypt and batch-decrypt of 1,000 values per
crypto implementation; list stacks with ``--stacks`` (1,000) stacks;
``--lifecycles`` (20) concurrent update lifecycles (create, start, journal,
complete). ``--out`` (default ``bench-server.json``) keeps the results.

``--db-url postgresql://USER@HOST/DB`` (needs psycopg) runs the state sizes, the
stack list and the concurrent lifecycles again on PostgreSQL, section names
ending in ``[postgresql]``: each server gets a new database, created through
that URL and dropped afterwards (the user needs CREATEDB). ``--db-url local``
starts a throwaway PostgreSQL from the machine's packages (e2e/postgres.py), with
fsync on as SQLite's FULL synchronous mode.
The RSS column is the server's only, not PostgreSQL's.
"""

import argparse
import base64
import gzip
import hashlib
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cli import padding  # noqa: E402
from server_process import ServerProcess  # noqa: E402

ORG = "organization"
PROJECT = "bench"
SP = f"/api/stacks/{ORG}/{PROJECT}/{{}}"
PAD_KB = 16  # state per resource, as in bench_cli.py
STACK_URN = "urn:pulumi:s::bench::pulumi:pulumi:Stack::bench-s"


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


def samples(fn, rounds: int, prepare=None) -> list:
    """Wall times of ``rounds`` calls of fn(); with ``prepare``, of fn(prepare()),
    so that the client's own work (JSON, gzip, hashing) stays outside the timing."""
    out = []
    for _ in range(rounds):
        arg = prepare() if prepare else None
        t = time.perf_counter()
        fn(arg) if prepare else fn()
        out.append(time.perf_counter() - t)
    return out


class Bench:
    def __init__(self, args, root: Path):
        self.args, self.root, self.rows = args, root, []
        self.store = "sqlite"
        self.key = root / "master.key"
        self.key.write_bytes(os.urandom(32))
        self.databases = []  # PostgreSQL databases made for servers: dropped at the end

    def row(self, section: str, what: str, times: list, server: ServerProcess, unit: str = "s",
            per: float = 0.0):
        """Record the median of ``times``; ``per`` items per sample gives a rate too."""
        med = statistics.median(times)
        if self.store != "sqlite":
            section += f" [{self.store}]"
        row = {"section": section, "operation": what, "median_s": med, "samples": times,
               "peak_rss_mb": server.peak_rss_mb(), "store": self.store}
        if per:
            row["rate_per_s"] = per / med if med > 0 else None
        self.rows.append(row)
        server.reset_peak()  # the next row's peak is its own
        print(f"{section:22} {what:48} {med * 1000:9.1f} ms", file=sys.stderr, flush=True)

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
        rounds = self.args.rounds
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
            self.row(section, "import (gzip body)", samples(
                lambda body: c.call("POST", sp + "/import", body, gzipped=True), 1,
                lambda: gzip.compress(raw, 1)), server)
            self.row(section, "export, stored gzip passed through", samples(
                lambda: c.call("GET", sp + "/export", accept_gzip=True), rounds), server)
            self.row(section, "export, decoded (client without gzip)", samples(
                lambda: c.call("GET", sp + "/export"), rounds), server)

            # Journal: a create of new resources, 100 entries (begin + success) a batch.
            uid, tok = start_update(c, sp, journal=True)
            bodies = []  # built beforehand: the client's JSON and gzip are not timed
            for b in range(rounds):
                entries = []
                for k in range(b * 50 + 1, b * 50 + 51):
                    res = resource(count + k)
                    entries.append({"version": 1, "kind": 0, "sequenceID": 2 * k - 1,
                                    "operationID": k, "removeOld": None, "removeNew": None,
                                    "operation": {"resource": res, "type": "creating"}})
                    entries.append({"version": 1, "kind": 1, "sequenceID": 2 * k,
                                    "operationID": k, "removeOld": None, "removeNew": None,
                                    "state": res})
                bodies.append(gzip.compress(json.dumps({"entries": entries}, separators=(",", ":")).encode(), 1))

            def batch(body):
                c.call("PATCH", f"{sp}/update/{uid}/journalentries", body, token=tok,
                       gzipped=True)
            self.row(section, "journal batch of 100 entries (entries/s)",
                     samples(batch, rounds, lambda: bodies.pop(0)), server, per=100)
            self.row(section, f"complete: replay {rounds * 100} entries, store", samples(
                lambda: c.call("POST", f"{sp}/update/{uid}/complete", {"status": "succeeded"},
                               token=tok), 1), server)

            # Checkpoints (older CLIs): one verbatim upload, then deltas.
            doc_bytes = [c.call("GET", sp + "/export")]
            body = json.loads(doc_bytes[0])
            doc_bytes[0] = json.dumps(body, separators=(",", ":")).encode()
            uid, tok = start_update(c, sp, journal=False)
            seq = [1]

            def verbatim_body():
                seq[0] += 1
                return gzip.compress(b'{"version":3,"untypedDeployment":' + doc_bytes[0] +
                                     b',"sequenceNumber":' + str(seq[0] - 1).encode() + b"}", 1)

            def verbatim(body):
                c.call("PATCH", f"{sp}/update/{uid}/checkpointverbatim", body, token=tok,
                       gzipped=True)
            self.row(section, "verbatim checkpoint (whole state)",
                     samples(verbatim, max(1, rounds // 3), verbatim_body), server)

            def delta_body():
                doc = doc_bytes[0]
                head = doc[:doc.index(b'"resources":[') + 13]
                new_head = (head.replace(b"00:00:00Z", b"00:00:01Z") if b"00:00:00Z" in head
                            else head.replace(b"00:00:01Z", b"00:00:00Z"))
                # One resource's edit, rewritten in place (its text need not change).
                marker = b'"n":' + str(seq[0] % count).encode() + b"}"
                at = doc.index(marker, len(head))
                new_marker = marker
                new = new_head + doc[len(head):]
                edits = [span_edit(0, len(head), new_head),
                         span_edit(at, at + len(marker), new_marker)]
                doc_bytes[0] = new
                seq[0] += 1
                return gzip.compress(json.dumps(
                    {"version": 3, "checkpointHash": hashlib.sha256(new).hexdigest(),
                     "sequenceNumber": seq[0] - 1, "deploymentDelta": edits}).encode(), 1)

            def delta(body):
                c.call("PATCH", f"{sp}/update/{uid}/checkpointdelta", body, token=tok,
                       gzipped=True)
            self.row(section, "delta checkpoint (header + one resource)",
                     samples(delta, rounds, delta_body), server)
            self.row(section, "complete (checkpoint path)", samples(
                lambda: c.call("POST", f"{sp}/update/{uid}/complete", {"status": "succeeded"},
                               token=tok), 1), server)
            c.close()
        finally:
            server.stop()

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
    lines = ["| section | operation | median | rate | server peak RSS (MB) |",
             "|---|---|--:|--:|--:|"]
    for r in rows:
        rate = f"{r['rate_per_s']:,.0f}/s" if r.get("rate_per_s") else ""
        lines.append(f"| {r['section']} | {r['operation']} | {r['median_s'] * 1000:,.1f} ms "
                     f"| {rate} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="1,10,50", help="state sizes in MB (default 1,10,50)")
    parser.add_argument("--rounds", type=int, default=10, help="samples per median (default 10)")
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
              "rows": bench.rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(bench.rows))
    print(f"\n{len(bench.rows)} rows in {result['total_seconds']:.0f} s on "
          f"{result['machine']['nproc']} cores; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

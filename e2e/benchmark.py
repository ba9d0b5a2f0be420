#!/usr/bin/env python3
"""Benchmarks of the server's hot paths; prints a table of medians.

    python e2e/benchmark.py [--mb 10] [--rounds 15]

Each figure is the median wall time of one HTTP request over loopback (client
side, keep-alive), against a server running in this process on a temporary
database, so the numbers include HTTP parsing, gzip and the SQLite commit.
Machines are noisy: compare rows of one run, not runs of different days.
"""

import argparse
import base64
import dataclasses
import gzip
import hashlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pulumi_backend as pb  # noqa: E402

SP = "/api/stacks/organization/bench/{}"


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method, path, body=None, token="token bench", gz=False, accept_gzip=False):
        headers = {"Authorization": token, "Content-Type": "application/json"}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            if gz:
                data = gzip.compress(data, 1)
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


def timed(fn, rounds):
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def make_resource(i: int, pad: int) -> dict:
    urn = f"urn:pulumi:s::bench::test:index:Thing::r{i}"
    return {"urn": urn, "custom": True, "id": f"id-{i}", "type": "test:index:Thing",
            "inputs": {"blob": "x" * pad}, "outputs": {"blob": "x" * pad, "n": i},
            "parent": "urn:pulumi:s::bench::pulumi:pulumi:Stack::bench-s"}


def make_state(mb: float) -> dict:
    pad = 900
    count = int(mb * 1024 * 1024 / (2 * pad + 300))
    stack = {"urn": "urn:pulumi:s::bench::pulumi:pulumi:Stack::bench-s", "custom": False,
             "type": "pulumi:pulumi:Stack"}
    return {"version": 3, "deployment": {
        "manifest": {"time": "2026-01-01T00:00:00Z", "magic": "", "version": ""},
        "resources": [stack] + [make_resource(i, pad) for i in range(count)]}}


def start_server(tmp: str, name: str, **overrides):
    cfg = pb.Config(db=os.path.join(tmp, name + ".db"), port=0, log_level="warning",
                    **overrides)
    store, app = pb.build_app(cfg, environ={})
    server = pb.Server(cfg, app)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return server, store


def start_update(c: Client, stack: str, journal: bool) -> str:
    sp = SP.format(stack)
    uid = json.loads(c.call("POST", sp + "/update", {"options": {"dryRun": False}}))["updateID"]
    start = json.loads(c.call("POST", f"{sp}/update/{uid}",
                              {"journalVersion": 1 if journal else 0}))
    return uid, "update-token " + start["token"]


def bench_state(c: Client, state: dict, rounds: int, rows: list) -> None:
    sp = SP.format("s")
    c.call("POST", "/api/stacks/organization/bench", {"stackName": "s"})
    raw = json.dumps(state, separators=(",", ":")).encode()
    size_mb = len(raw) / 1e6
    resources = len(state["deployment"]["resources"])
    label = f"{size_mb:.1f} MB state, {resources} resources"
    rows.append((f"import ({label})", timed(lambda: c.call("POST", sp + "/import", raw, gz=True), 1)))
    rows.append(("export, stored gzip bytes", timed(
        lambda: c.call("GET", sp + "/export", accept_gzip=True), rounds)))
    rows.append(("export, decompressed for the client", timed(
        lambda: c.call("GET", sp + "/export"), rounds)))

    # Journal: batches of 100 entries, each a resource update on the big base.
    uid, tok = start_update(c, "s", journal=True)
    seq = [1]

    def batch():
        entries = []
        for _ in range(50):
            i = seq[0] % (resources - 1) + 1
            op = seq[0]
            res = make_resource(i - 1, 900)
            entries.append({"version": 1, "kind": 0, "sequenceID": 2 * op - 1,
                            "operationID": op, "removeOld": None, "removeNew": None,
                            "operation": {"resource": res, "type": "updating"}})
            entries.append({"version": 1, "kind": 1, "sequenceID": 2 * op, "operationID": op,
                            "removeOld": i, "removeNew": None, "state": res})
            seq[0] += 1
        c.call("PATCH", f"{sp}/update/{uid}/journalentries", {"entries": entries}, token=tok,
               gz=True)
    rows.append(("journal batch of 100 entries", timed(batch, rounds)))
    rows.append(("complete (journal replay + gzip + commit)", timed(
        lambda: c.call("POST", f"{sp}/update/{uid}/complete", {"status": "succeeded"}, token=tok),
        1)))
    rows.append(("first export after the update", timed(
        lambda: c.call("GET", sp + "/export", accept_gzip=True), 1)))

    # Checkpoints: one verbatim upload, then deltas touching the header and one resource.
    uid, tok = start_update(c, "s", journal=False)
    doc = raw
    counter = [1]

    def verbatim():
        body = b'{"version":3,"untypedDeployment":' + doc + \
            b',"sequenceNumber":' + str(counter[0]).encode() + b"}"
        c.call("PATCH", f"{sp}/update/{uid}/checkpointverbatim", body, token=tok, gz=True)
        counter[0] += 1
    rows.append(("verbatim checkpoint (whole state)", timed(verbatim, max(3, rounds // 3))))

    def delta():
        nonlocal doc
        old_head = doc[:doc.index(b'"resources":[') + 13]
        new_head = old_head.replace(b"2026-01-01T00:00:00Z", b"2026-01-01T00:00:01Z") \
            if b"00:00:00Z" in old_head else old_head.replace(b"00:00:01Z", b"00:00:00Z")
        marker = b'"n":' + str(counter[0] % 50).encode() + b"}"
        at = doc.index(marker, len(old_head))
        edits = [{"Span": {"uri": "", "start": {"line": 1, "column": 1, "offset": 0},
                           "end": {"line": 1, "column": 1, "offset": len(old_head)}},
                  "NewText": new_head.decode()},
                 {"Span": {"uri": "", "start": {"line": 1, "column": 1, "offset": at},
                           "end": {"line": 1, "column": 1, "offset": at + len(marker)}},
                  "NewText": marker.decode()}]
        new = new_head + doc[len(old_head):]
        body = {"version": 3, "checkpointHash": hashlib.sha256(new).hexdigest(),
                "sequenceNumber": counter[0], "deploymentDelta": edits}
        c.call("PATCH", f"{sp}/update/{uid}/checkpointdelta", body, token=tok, gz=True)
        doc = new
        counter[0] += 1
    rows.append(("delta checkpoint (header + one resource)", timed(delta, rounds)))
    rows.append(("complete (checkpoint path)", timed(
        lambda: c.call("POST", f"{sp}/update/{uid}/complete", {"status": "succeeded"}, token=tok),
        1)))


def bench_secrets(tmp: str, rounds: int, rows: list) -> None:
    plaintexts = [base64.b64encode(json.dumps(f"secret-{i}").encode()).decode()
                  for i in range(1000)]
    for crypto in ("openssl", "python"):
        try:
            server, store = start_server(tmp, "secrets-" + crypto, crypto=crypto)
        except ValueError as e:
            rows.append((f"batch-decrypt 1000 secrets ({crypto})", f"unavailable: {e}"))
            continue
        try:
            c = Client(server.server_address[1])
            c.call("POST", "/api/stacks/organization/bench", {"stackName": "k"})
            sp = SP.format("k")
            ct = json.loads(c.call("POST", sp + "/batch-encrypt", {"plaintexts": plaintexts},
                                   gz=True))["ciphertexts"]
            engine = server.app.engine
            blobs = [base64.b64decode(x) for x in ct]
            rows.append((f"batch-decrypt 1000 secrets, engine only ({crypto})", timed(
                lambda: engine.decrypt("organization", "bench", "k", blobs), rounds)))
            rows.append((f"batch-decrypt 1000 secrets over HTTP ({crypto})", timed(
                lambda: c.call("POST", sp + "/batch-decrypt", {"ciphertexts": ct}, gz=True),
                rounds)))
        finally:
            server.stop()
            server.server_close()
            store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="state size in MB (default 10)")
    parser.add_argument("--rounds", type=int, default=15, help="samples per median")
    args = parser.parse_args()
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        server, store = start_server(tmp, "state")
        try:
            bench_state(Client(server.server_address[1]), make_state(args.mb), args.rounds, rows)
        finally:
            server.stop()
            server.server_close()
            store.close()
        bench_secrets(tmp, args.rounds, rows)
    width = max(len(r[0]) for r in rows)
    print(f"{'operation'.ljust(width)}  median")
    print("-" * (width + 12))
    for name, value in rows:
        shown = f"{value * 1000:8.1f} ms" if isinstance(value, float) else value
        print(f"{name.ljust(width)}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

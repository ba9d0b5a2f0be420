#!/usr/bin/env python3
"""Resource search over many stacks; prints a markdown table of p50 and p95.

    python3 e2e/bench_search.py [--stacks 1000] [--resources 100] [--rounds 20]
                                [--out FILE]

The data goes in through the engine of an in-process app (a temporary SQLite
database): ``--stacks`` stacks in 20 projects, each with a state of
``--resources`` resources of varied types, names, protect flags and modified
times, imported once (which indexes it). A row times one search query through
``App.dispatch`` (routing, token and permission checks, the SQL over the index,
the JSON answer: the server's time, without the socket) ``--rounds`` times, as
an org admin or as a member who may read half the stacks. Two more rows time
building the whole index afresh (as for a database from before the index) and
re-indexing one stack as an import does. ``--out`` (default
``bench-search.json``) keeps every sample. Benchmarks assert nothing.
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pulumi_backend as pb  # noqa: E402

ORG = "organization"
TYPES = ("aws:s3/bucket:Bucket", "aws:s3/bucketObject:BucketObject", "aws:ec2/instance:Instance",
         "aws:iam/role:Role", "gcp:storage/bucket:Bucket", "random:index/randomPet:RandomPet",
         "kubernetes:apps/v1:Deployment", "azure-native:storage:StorageAccount")
QUERIES = [
    ("everything, newest first", "", {}),
    ("free text", "bucket", {}),
    ("type: part", "type:instance", {}),
    ("exact type", 'type:"aws:s3/bucket:Bucket"', {}),
    ("name: and stack:", "name:pet-7 stack:prod", {}),
    ("package: and protected:", "package:aws protected:true", {}),
    ("modified: range", "modified:[2025-03-01 to 2025-03-31]", {}),
    ("OR, negation", "(type:bucket OR type:role) -project:team-3", {}),
    ("rare match", "name:pet-42 project:team-7 stack:prod-7", {}),
    ("sorted by name, page 20", "type:bucket", {"sort": "name", "asc": "true", "page": "20"}),
]


def state(rng, project, stack, n):
    urn = f"urn:pulumi:{stack}::{project}::"
    res = [{"urn": urn + f"pulumi:pulumi:Stack::{project}-{stack}", "custom": False,
            "type": "pulumi:pulumi:Stack"}]
    for i in range(n - 1):
        type_ = TYPES[i % len(TYPES)]
        day = rng.randrange(1, 366)
        res.append({"urn": urn + f"{type_}::pet-{i}", "custom": True, "id": f"id-{stack}-{i}",
                    "type": type_, "protect": rng.random() < 0.1,
                    "modified": f"2025-{(day - 1) // 31 + 1:02d}-{(day - 1) % 28 + 1:02d}T"
                                f"10:00:00.000Z",
                    "inputs": {"name": f"pet-{i}"}, "outputs": {"name": f"pet-{i}", "arn": "x"}})
    return {"version": 3, "deployment": {"manifest": {"time": "2026-01-01T00:00:00Z",
                                                      "magic": "", "version": ""},
                                         "resources": res}}


def call(app, path, token):
    route, _, query = path.partition("?")
    req = pb.Request("GET", route, urllib.parse.parse_qs(query),
                     {"Authorization": token}, b"")
    resp = app.dispatch(req)
    assert resp.status == 200, (path, resp.status, resp.body[:300])
    return resp


def pct(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", type=int, default=1000, help="stacks (default 1000)")
    parser.add_argument("--resources", type=int, default=100,
                        help="resources per stack (default 100)")
    parser.add_argument("--rounds", type=int, default=20, help="samples per query (default 20)")
    parser.add_argument("--out", default="bench-search.json", help="JSON results file")
    args = parser.parse_args()
    progress, rng = sys.stderr.isatty(), random.Random(25)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        pb._setup_logging("error", "text")
        cfg = pb.Config(db=os.path.join(folder, "bench.db"), port=0, log_level="error")
        store, app = pb.build_app(cfg, environ={})
        engine, ident = app.engine, app.identity
        started = time.perf_counter()
        for i in range(args.stacks):
            project, stack = f"team-{i % 20}", f"{('dev', 'prod')[i % 2]}-{i}"
            engine.create_stack(ORG, project, {"stackName": stack})
            engine.import_deployment(ORG, project, stack, pb._dumps(
                state(rng, project, stack, args.resources)), "")
            if progress and i % 50 == 0:
                print(f"\r{i}/{args.stacks} stacks", end="", file=sys.stderr)
        if progress:
            print("\r", end="", file=sys.stderr)
        load_s = time.perf_counter() - started
        ident.add_user(pb._LOCAL_ADMIN, "root", role="admin")
        ident.add_user(pb._LOCAL_ADMIN, "member")
        ident.create_team(pb._LOCAL_ADMIN, "half")
        ident.add_member(pb._LOCAL_ADMIN, "half", "member")
        for n in range(0, 20, 2):  # every other project: half the stacks
            ident.grant(pb._LOCAL_ADMIN, "half", f"team-{n}/*", pb.PERM_READ)
        tokens = {who: "token " + ident.create_token(pb._LOCAL_ADMIN, "personal", who)[1]
                  for who in ("root", "member")}
        cases = [(what, q, extra, "root") for what, q, extra in QUERIES]
        cases += [(what + " (member, half the stacks)", q, extra, "member")
                  for what, q, extra in QUERIES[:3]]
        for what, query, extra, who in cases:
            path = (f"/api/orgs/{ORG}/search/resources"
                    f"{'v2' if 'sort' in extra else ''}?"
                    + urllib.parse.urlencode({"query": query, **extra}))
            total = json.loads(call(app, path, tokens[who]).body)["total"]  # warm
            samples = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                call(app, path, tokens[who])
                samples.append(time.perf_counter() - t0)
            rows.append({"case": what, "query": query, "as": who, "results": total,
                         "p50_s": statistics.median(samples), "p95_s": pct(samples, 95),
                         "samples": samples})
        # The whole index afresh, as for a database from before it: one stack at a time.
        with store.write() as db:
            db.execute("DELETE FROM search_stacks")
            db.execute("DELETE FROM search_resources")
        t0 = time.perf_counter()
        indexed = engine.search.catch_up()
        build_s = time.perf_counter() - t0
        one = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            engine.import_deployment(ORG, "team-0", "dev-0", pb._dumps(
                state(rng, "team-0", "dev-0", args.resources)), "")
            one.append(time.perf_counter() - t0)
        store.close()
    resources = args.stacks * args.resources
    print(f"{args.stacks} stacks x {args.resources} resources ({resources} indexed), "
          f"loaded in {load_s:.1f} s\n")
    lines = ["| query | as | results | p50 | p95 |", "|---|---|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['case']}: `{r['query'] or '(none)'}` | {r['as']} | {r['results']} "
                     f"| {r['p50_s'] * 1000:.1f} ms | {r['p95_s'] * 1000:.1f} ms |")
    lines.append(f"| index built afresh, {indexed} stacks | | {resources} | "
                 f"{build_s:.2f} s (total) | |")
    lines.append(f"| import of one stack ({args.resources} resources), index included | | "
                 f"| {statistics.median(one) * 1000:.1f} ms | {pct(one, 95) * 1000:.1f} ms |")
    print("\n".join(lines))
    machine = {"python": platform.python_version(), "nproc": os.cpu_count(),
               "sqlite": pb.sqlite3.sqlite_version}
    Path(args.out).write_text(json.dumps({
        "machine": machine, "stacks": args.stacks, "resources": args.resources, "rows": rows,
        "index_build_s": build_s, "indexed_stacks": indexed, "import_one_s": one}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

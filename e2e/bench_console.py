#!/usr/bin/env python3
"""Server time of the web console's heaviest pages; prints a markdown table.

    python3 e2e/bench_console.py [--stacks 1000] [--resources 5000] [--steps 600]
                                 [--rounds 10] [--out FILE]

The data goes in through the API handlers of an in-process app (a temporary
database): ``--stacks`` stacks with tags and a finished update each, one stack
of ``--resources`` resources (a tree: components holding 10 resources each),
and an update of ``--steps`` resources whose events hold what the CLI sends
(a pre-event and an outputs event per resource, with old and new inputs and
their diffs, and some diagnostics). A figure is the median of ``--rounds``
renders, timed around ``App.dispatch`` (routing, session check, permission
check and rendering: the server's time, without the socket). The issue's
budgets (stacks page 50 ms, resources page 300 ms, update page 300 ms) are in
the table; the script asserts nothing. ``--out`` (default
``bench-console.json``) keeps the results.
"""

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pulumi_backend as pb  # noqa: E402

ORG = "organization"
SID = "bench-session-id"


class Bench:
    def __init__(self, folder: str):
        cfg = pb.Config(db=os.path.join(folder, "bench.db"), port=0, log_level="error")
        pb._setup_logging("error", "text")
        self.store, self.app = pb.build_app(cfg, environ={})
        with self.store.write() as db:  # a session, as a sign-in would leave it
            now = pb._now()
            self.store.insert_session(db, hashlib.sha256(SID.encode()).hexdigest(),
                                      hashlib.sha256(b"bench").hexdigest(), now, now + 3600)

    def call(self, method: str, path: str, body=None, token: str = "token bench",
             headers=None) -> pb.Response:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        hdrs = {"Authorization": token, "Cookie": f"pb_session={SID}", **(headers or {})}
        path, _, query = path.partition("?")
        req = pb.Request(method, path, pb.urllib.parse.parse_qs(query), hdrs, data or b"")
        resp = self.app.dispatch(req)
        assert resp.status in (200, 303), (path, resp.status, resp.body[:300])
        return resp

    def update(self, project: str, stack: str, events: list, state=None, tags=None) -> str:
        sp = f"/api/stacks/{ORG}/{project}/{stack}"
        program = {"name": project, "runtime": "python", "main": "", "description": "",
                   "options": {"dryRun": False}, "config": {
                       "p:secret": {"string": "v1:abc", "secret": True, "object": False}},
                   "metadata": {"message": "bench", "environment": {}}}
        uid = json.loads(self.call("POST", f"{sp}/update", program).body)["updateID"]
        lease = json.loads(self.call("POST", f"{sp}/update/{uid}", {"tags": tags or {}}).body)
        tok = "update-token " + lease["token"]
        for i in range(0, len(events), 500):
            self.call("POST", f"{sp}/update/{uid}/events/batch", {"events": events[i:i + 500]},
                      token=tok)
        if state is not None:
            self.call("PATCH", f"{sp}/update/{uid}/checkpoint",
                      {"version": 3, "deployment": state}, token=tok)
        self.call("POST", f"{sp}/update/{uid}/complete", {"status": "succeeded"}, token=tok)
        return uid

    def time(self, path: str, rounds: int) -> list:
        self.call("GET", path)  # warm: first-use imports and caches
        out = []
        for _ in range(rounds):
            started = time.perf_counter()
            resp = self.call("GET", path)
            out.append(time.perf_counter() - started)
        assert resp.content_type.startswith("text/html") and len(resp.body) > 1000
        return out


def urn(stack: str, type_: str, name: str, parent_type: str = "") -> str:
    qualified = f"{parent_type}${type_}" if parent_type else type_
    return f"urn:pulumi:{stack}::big::{qualified}::{name}"


def big_state(n: int) -> dict:
    root = urn("s", "pulumi:pulumi:Stack", "big-s")
    resources = [{"urn": root, "custom": False, "type": "pulumi:pulumi:Stack",
                  "outputs": {"url": "https://example.com"}}]
    prov = urn("s", "pulumi:providers:random", "default")
    resources.append({"urn": prov, "custom": True, "id": "p1", "type": "pulumi:providers:random",
                      "parent": root})
    comp = None
    for i in range(n - 2):
        if i % 11 == 0:
            comp = urn("s", "my:index:Group", f"group-{i}")
            resources.append({"urn": comp, "custom": False, "type": "my:index:Group",
                              "parent": root})
            continue
        resources.append({
            "urn": urn("s", "random:index/randomPet:RandomPet", f"pet-{i}", "my:index:Group"),
            "custom": True, "id": f"pet-{i}", "type": "random:index/randomPet:RandomPet",
            "parent": comp, "provider": f"{prov}::p1", "dependencies": [comp],
            "inputs": {"length": 3, "prefix": f"p{i}"},
            "outputs": {"id": f"pet-{i}", "length": 3, "prefix": f"p{i}"}})
    return {"manifest": {"time": "2026-01-01T00:00:00Z", "magic": "", "version": ""},
            "resources": resources}


def step_events(n: int) -> list:
    events, seq = [], 0
    ops = ("create", "update", "replace", "delete", "same")
    for i in range(n):
        op = ops[i % len(ops)]
        res_urn = urn("u", "random:index/randomPet:RandomPet", f"pet-{i}")
        old = {"length": 3, "prefix": f"old-{i}", "tags": {"a": "1"}}
        new = {"length": 4 if op != "same" else 3, "prefix": f"new-{i}", "tags": {"a": "1"}}
        meta = {"op": op, "urn": res_urn, "type": "random:index/randomPet:RandomPet",
                "old": {"inputs": old, "outputs": old} if op != "create" else None,
                "new": {"inputs": new, "outputs": new} if op != "delete" else None,
                "diffs": ["length", "prefix"] if op in ("update", "replace") else [],
                "detailedDiff": {"length": {"kind": "update"}} if op == "update" else None}
        for kind in ("resourcePreEvent", "resOutputsEvent"):
            seq += 1
            events.append({"sequence": seq, "timestamp": seq, kind: {"metadata": meta}})
        if i % 50 == 0:
            seq += 1
            events.append({"sequence": seq, "timestamp": seq, "diagnosticEvent": {
                "urn": res_urn, "severity": "warning", "message": f"note {i}\n",
                "color": "raw"}})
    seq += 1
    events.append({"sequence": seq, "timestamp": seq, "summaryEvent": {
        "maybeCorrupt": False, "durationSeconds": 12, "resourceChanges": {"create": n // 5}}})
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", type=int, default=1000, help="stacks (default 1000)")
    parser.add_argument("--resources", type=int, default=5000,
                        help="resources of the big stack (default 5000)")
    parser.add_argument("--steps", type=int, default=600,
                        help="resources of the big update (default 600)")
    parser.add_argument("--rounds", type=int, default=10, help="samples per median (default 10)")
    parser.add_argument("--out", default="bench-console.json", help="JSON results file")
    args = parser.parse_args()
    progress = sys.stderr.isatty()
    with tempfile.TemporaryDirectory() as folder:
        b = Bench(folder)
        for i in range(args.stacks):
            project = f"team-{i % 20}"
            tags = {"env": "prod" if i % 2 else "dev", "owner": f"team-{i % 20}"}
            b.call("POST", f"/api/stacks/{ORG}/{project}", {"stackName": f"stack-{i}",
                                                          "tags": tags})
            b.update(project, f"stack-{i}", [], tags=tags)
            if progress and i % 50 == 0:
                print(f"\r{i}/{args.stacks} stacks", end="", file=sys.stderr)
        if progress:
            print("\r", end="", file=sys.stderr)
        b.call("POST", f"/api/stacks/{ORG}/big", {"stackName": "s"})
        b.update("big", "s", [], big_state(args.resources))
        b.call("POST", f"/api/stacks/{ORG}/big", {"stackName": "u"})
        uid = b.update("big", "u", step_events(args.steps))
        cases = [
            (f"stacks page, {args.stacks + 2} stacks", "/", 0.050),
            (f"resources page, {args.resources} resources", "/stacks/big/s/resources", 0.300),
            (f"update page, {args.steps} resources", f"/stacks/big/u/updates/{uid}", 0.300),
            (f"overview, {args.resources} resources", "/stacks/big/s", None),
            ("filtered stacks page (tag env=prod)", "/?tag=env%3Dprod", None),
        ]
        rows = []
        for what, path, budget in cases:
            times = b.time(path, args.rounds)
            size = len(b.call("GET", path).body)
            rows.append({"page": what, "median_s": statistics.median(times),
                         "max_s": max(times), "budget_s": budget, "html_bytes": size})
        b.store.close()
    lines = ["| page | median | max | budget | HTML |", "|---|--:|--:|--:|--:|"]
    for r in rows:
        budget = f"{r['budget_s'] * 1000:.0f} ms" if r["budget_s"] else ""
        lines.append(f"| {r['page']} | {r['median_s'] * 1000:.1f} ms | {r['max_s'] * 1000:.1f} ms"
                     f" | {budget} | {r['html_bytes'] / 1024:.0f} KiB |")
    print("\n".join(lines))
    machine = {"python": platform.python_version(), "nproc": os.cpu_count()}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    over = [r["page"] for r in rows if r["budget_s"] and r["median_s"] > r["budget_s"]]
    print(f"{len(rows)} pages timed; " + (f"over budget: {', '.join(over)}" if over
                                          else "all within budget"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

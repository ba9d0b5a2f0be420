#!/usr/bin/env python3
"""Webhook delivery throughput: K webhooks, M stack events, a fast and a slow receiver.

    python3 e2e/bench_webhooks.py [--hooks 10] [--events 200] [--slow-ms 200] [--out FILE]

For each receiver (``fast``: answers at once; ``slow``: sleeps ``--slow-ms``
before answering), a fresh pulumi_backend.py (``--auth-token``, an admin;
``--webhook-allow 127.0.0.1/32``; ``--webhook-retry-delays 1s,1s``) gets
``--hooks`` organization webhooks (``POST /api/orgs/{org}/hooks``, format raw,
filter ``stack_created``) that all point at one receiver (``http.server`` on
127.0.0.1), then ``--events`` stacks are created back to back through the API
(``POST /api/stacks/{org}/{project}``): each makes one ``stack_created`` event,
so K × M deliveries are due. The receiver notes when each delivery arrives
(before its sleep) and which stack it names; an event's time is when its
create request was answered (the event is committed with it).
Rows: deliveries per second from the first event to the last delivery, p50,
p95 and max of event-to-delivery latency, the seconds the events took to make,
the server's CPU seconds, deliveries received (the wait ends when all came, or
none came for ``--idle`` seconds), and repeats (a delivery ID seen twice:
delivery is at least once). ``--out`` (default ``bench-webhooks.json``)
keeps the rows. Benchmarks assert nothing.
"""

import argparse
import http.client
import http.server
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_process import ServerProcess  # noqa: E402

ORG, PROJECT, TOKEN = "organization", "bench", "bench-token"


class Receiver:
    """Records (arrival time, webhook ID, stack name) of each POST; answers after ``delay``."""

    def __init__(self, delay: float):
        self.delay, self.got, self.lock = delay, [], threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                arrived = time.time()
                stack = json.loads(body).get("stackName")
                with receiver.lock:
                    receiver.got.append((arrived, self.headers.get("Pulumi-Webhook-ID"), stack))
                time.sleep(receiver.delay)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def call(conn, method: str, path: str, body: dict) -> dict:
    conn.request(method, path, json.dumps(body).encode(),
                 {"Authorization": f"token {TOKEN}", "Content-Type": "application/json",
                  "Accept": "application/vnd.pulumi+8"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status >= 300:
        raise RuntimeError(f"{method} {path}: {resp.status} {data[:300]!r}")
    return json.loads(data) if data else {}


def percentile(values: list, q: float):
    if not values:
        return None
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def run(receiver_kind: str, delay: float, args, root: Path) -> dict:
    folder = root / receiver_kind
    folder.mkdir()
    server = ServerProcess(folder, ["--auth-token", TOKEN, "--webhook-allow", "127.0.0.1/32",
                                    "--webhook-retry-delays", "1s,1s", *args.server_flag],
                           token=TOKEN)
    receiver = Receiver(delay)
    server.start()
    host, port = server.url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for i in range(args.hooks):
            call(conn, "POST", f"/api/orgs/{ORG}/hooks",
                 {"displayName": f"bench-{i}", "payloadUrl": receiver.url, "active": True,
                  "format": "raw", "filters": ["stack_created"]})
        cpu = server.cpu_seconds()
        made: dict = {}
        first = time.time()
        for i in range(args.events):
            name = f"s{i:05d}"
            call(conn, "POST", f"/api/stacks/{ORG}/{PROJECT}", {"stackName": name})
            made[name] = time.time()
        events_s = time.time() - first
        due = args.hooks * args.events
        # Until all are in, or none came for --idle seconds (a delivery the server lost
        # would otherwise hold the run until --timeout), or --timeout.
        deadline, last, seen = time.time() + args.timeout, time.time(), 0
        while time.time() < deadline and time.time() - last < args.idle:
            with receiver.lock:
                ids = {g[1] for g in receiver.got}
            if len(ids) >= due:
                break
            if len(ids) > seen:
                seen, last = len(ids), time.time()
            time.sleep(0.05)
        with receiver.lock:
            got = list(receiver.got)
        server_cpu = server.cpu_seconds() - cpu
    finally:
        conn.close()
        server.stop()
        receiver.close()
    firsts: dict = {}
    for arrived, hook_id, stack in got:
        firsts.setdefault(hook_id, (arrived, stack))
    latencies = [arrived - made[stack] for arrived, stack in firsts.values() if stack in made]
    last = max((a for a, _ in firsts.values()), default=first)
    return {"receiver": receiver_kind, "delay_ms": delay * 1000, "hooks": args.hooks,
            "events": args.events, "due": due, "delivered": len(firsts),
            "repeats": len(got) - len(firsts), "events_s": events_s,
            "seconds": last - first, "deliveries_per_s": len(firsts) / max(last - first, 1e-9),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p95_s": percentile(latencies, 95),
            "latency_max_s": max(latencies, default=None), "server_cpu_s": server_cpu}


def table(rows: list) -> str:
    lines = ["| receiver | hooks × events | delivered | deliveries/s | latency p50 (s) "
             "| latency p95 (s) | latency max (s) | events made in (s) | server CPU (s) "
             "| repeats |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['receiver']} ({r['delay_ms']:.0f} ms) | {r['hooks']} × {r['events']} "
            f"| {r['delivered']}/{r['due']} | {r['deliveries_per_s']:.1f} "
            f"| {r['latency_p50_s'] or 0:.2f} | {r['latency_p95_s'] or 0:.2f} "
            f"| {r['latency_max_s'] or 0:.2f} | {r['events_s']:.2f} "
            f"| {r['server_cpu_s']:.2f} | {r['repeats']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", type=int, default=10, help="webhooks K (default 10)")
    parser.add_argument("--events", type=int, default=200,
                        help="stack events M (default 200)")
    parser.add_argument("--slow-ms", type=float, default=200,
                        help="the slow receiver's delay per request (default 200)")
    parser.add_argument("--receivers", default="fast,slow", help="fast and/or slow")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for the last delivery (default 600)")
    parser.add_argument("--idle", type=float, default=15,
                        help="stop waiting when no delivery came for this long (default 15)")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="extra pulumi_backend.py flag (repeatable)")
    parser.add_argument("--out", default="bench-webhooks.json", help="JSON results file")
    args = parser.parse_args()
    started = time.time()
    delays = {"fast": 0.0, "slow": args.slow_ms / 1000}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        for kind in [k for k in args.receivers.split(",") if k]:
            rows.append(run(kind, delays[kind], args, Path(tmp)))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    result = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              "argv": sys.argv[1:], "total_seconds": round(time.time() - started, 1),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    missing = sum(r["delivered"] < r["due"] for r in rows)
    print(f"\n{len(rows)} rows{f' ({missing} with deliveries missing)' if missing else ''} "
          f"in {result['total_seconds']:.0f} s on {result['machine']['nproc']} cores; "
          f"JSON: {args.out}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

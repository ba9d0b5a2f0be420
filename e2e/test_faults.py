"""Reliability and security scenarios with the real `pulumi` CLI and real processes.

- crashes: SIGKILL of the server at 20 points of a 200-resource `up` (journal
  CLI) and at 3 points on the checkpoint/delta CLI; what was committed before
  the kill must survive into the stack's state;
- graceful restarts: SIGTERM and an immediate restart in the middle of an `up`;
  the CLI's retries carry the update through;
- load: 20 CLI processes updating 20 stacks at once;
- TLS, API tokens, and server logs that hold no token or secret;
- fuzzing: schemathesis against the server's own OpenAPI document.

Every test starts its own server (``make_server``), so killing or flooding it
touches nothing else. Loops are bounded; traffic stays on 127.0.0.1.
"""

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ORG, _kill_marked, journal_entries, unavailable, wait_for

ACCESS_LINE = re.compile(r"\b(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (\S+) (\d{3}) \d+ [\d.]+ms$",
                         re.M)


class LogTail:
    """Counts the server's access-log lines that appeared since it was made."""

    def __init__(self, server):
        self.path = server.log
        self.offset = self.path.stat().st_size

    def text(self):
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def count(self, route_suffix, status=200):
        return sum(1 for m in ACCESS_LINE.finditer(self.text())
                   if m[2].endswith(route_suffix) and int(m[3]) == status)


def server_errors(text):
    """Access-log lines with a 5xx status, and tell-tale error lines."""
    bad = [m[0] for m in ACCESS_LINE.finditer(text) if m[3].startswith("5")]
    bad += [line for line in text.splitlines()
            if "database is locked" in line or "Traceback" in line or " ERROR " in line]
    return bad


def state_urns(e2e, stack):
    return {r["urn"] for r in e2e.resources(stack)}


def components(urns):
    return {u for u in urns if "::e2e:index:Group::" in u}


def query(db_path, sql, *args):
    """Rows of one query on a server's database (opened as the server would be)."""
    with contextlib.closing(sqlite3.connect(db_path)) as con:
        return con.execute(sql, args).fetchall()


def running_update(db_path):
    """(update id, journal?) of the running update in a server's database, or None."""
    rows = query(db_path, "SELECT id, journal FROM updates WHERE status = 'running'")
    return rows[0] if rows else None


def stored_entries(con, update_id):
    return journal_entries(con.execute("SELECT batch, data FROM journal WHERE update_id = ? "
                                       "ORDER BY seq", (update_id,)))


def journal_truth(db_path, update_id):
    """URNs of the committed success entries (kind 1 with a state) of an update."""
    with contextlib.closing(sqlite3.connect(db_path)) as con:
        entries = stored_entries(con, update_id)
    urns = {e["state"]["urn"] for e in entries
            if e.get("kind") == 1 and (e.get("state") or {}).get("urn")}
    return urns, len(entries)


def checkpoint_truth(db_path, update_id):
    """URNs in the last committed checkpoint of an update, rebuilt from its rows.

    Full rows hold the document; delta rows hold the CLI's text edits (byte
    offsets), applied in order. Every step's SHA-256 must match the stored one.
    """
    rows = query(db_path, "SELECT seq, kind, data, hash FROM checkpoints WHERE update_id = ? "
                 "ORDER BY seq", update_id)
    data = b""
    for seq, kind, blob, digest in rows:
        if kind == "full":
            data = bytes(blob)
        else:
            out, pos = bytearray(), 0
            for edit in json.loads(blob):
                start, end = edit["Span"]["start"]["offset"], edit["Span"]["end"]["offset"]
                assert pos <= start <= end <= len(data), (seq, start, end)
                out += data[pos:start] + edit.get("NewText", "").encode()
                pos = end
            data = bytes(out + data[pos:])
        assert hashlib.sha256(data).hexdigest() == digest, f"checkpoint {seq}: hash mismatch"
    if not data:
        return set(), len(rows)
    deployment = json.loads(data).get("deployment") or {}
    return {r["urn"] for r in deployment.get("resources") or []}, len(rows)


def integrity(db_path):
    return query(db_path, "PRAGMA integrity_check")


def cancel_if_running(e2e, db_path, stack):
    """`pulumi cancel` the stack's update if the server still has it running."""
    if running_update(db_path) is None:
        return False
    proc = e2e.run("cancel", "--yes", "--stack", stack, check=False)
    if proc.returncode != 0:  # the CLI may have finished the update meanwhile
        assert running_update(db_path) is None, e2e.explain("cancel failed", proc.stdout,
                                                               proc.stderr)
        return False
    return True


# ==== crashes ===============================================================

RESOURCES = 200
# Where each of the 20 kills lands: after this fraction of the up's 201 success
# entries (200 components and the stack) is committed. Rounds chain, so early
# resources are `same` in later rounds and the later ones get created.
KILL_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.02,
                  0.15, 0.3, 0.45, 0.6, 0.75, 0.95, 0.25, 0.4, 0.7, 0.85)


def committed_successes(con):
    """(update id, committed success entries) of the running update, or None."""
    row = con.execute("SELECT id FROM updates WHERE status = 'running'").fetchone()
    if row is None:
        return None
    return row[0], sum(e.get("kind") == 1 for e in stored_entries(con, row[0]))


def up_until_committed(e2e, srv, stack, program, target):
    """Spawn an `up` and return it once `target` success entries are committed.

    Returns None if the up ended first (a kill point past the end of a short
    run): the caller tries a lower target.
    """
    up = e2e.spawn("up", stack, program)
    with contextlib.closing(sqlite3.connect(srv.db)) as con:
        wait_for(lambda: (up.poll() is not None
                          or (committed_successes(con) or ("", -1))[1] >= target),
                 f"{target} success entries", timeout=120, step=0.01)
    if up.poll() is not None:
        out, err = up.communicate()
        assert up.returncode == 0, e2e.explain("the up failed before the kill", out, err)
        return None
    return up


@pytest.mark.timeout_seconds(420)
def test_kill9_during_journaled_up(e2e, make_server):
    """SIGKILL the server 20 times in a 200-component `up`; no committed entry is lost."""
    srv = make_server()
    e2e.use_server(srv)
    e2e.stack("dev")
    program = {"dir": str(e2e.files), "components": RESOURCES}
    summary = []
    started = time.monotonic()
    for round_no, fraction in enumerate(KILL_FRACTIONS, 1):
        target = int(fraction * (RESOURCES + 1))
        tail = LogTail(srv)
        up = up_until_committed(e2e, srv, "dev", program, target)
        if up is None:  # the run ended first: kill earlier in a new one
            target //= 2
            up = up_until_committed(e2e, srv, "dev", program, target)
        assert up is not None, f"round {round_no}: twice the up ended before the kill"
        srv.kill()
        acked = tail.count("/journalentries")
        running = running_update(srv.db)
        assert running is not None, f"round {round_no}: no running update at the kill"
        truth, entries = journal_truth(srv.db, running[0])
        srv.start()  # same db, same port
        assert integrity(srv.db) == [("ok",)]
        cancelled = cancel_if_running(e2e, srv.db, "dev")
        out, err = up.communicate(timeout=120)
        now = state_urns(e2e, "dev")
        lost = truth - now
        assert not lost, f"round {round_no}: {len(lost)} committed resources lost: {sorted(lost)[:5]}"
        summary.append(round_no)
        print(f"round {round_no:2}: killed at {len(truth):3}/{RESOURCES + 1} committed resources "
              f"(target {target:3}; {entries:3} entries, {acked:3} acknowledged journal "
              f"requests); state has {len(components(now)):3}/{RESOURCES} components "
              f"({'cancelled' if cancelled else f'up exited {up.returncode}'})")
    # The 20th kill is behind us: a final up converges, and the next one is a no-op.
    stack = e2e.stack("dev", create=False)
    changes = e2e.up(stack, program)
    assert sum(changes.values()) == RESOURCES + 1, changes
    urns = state_urns(e2e, "dev")
    assert len(components(urns)) == RESOURCES and len(urns) == RESOURCES + 1, len(urns)
    assert e2e.up(stack, program) == {"same": RESOURCES + 1}
    assert integrity(srv.db) == [("ok",)]
    print(f"kill -9 (journal CLI): {len(summary)}/{len(KILL_FRACTIONS)} kills lost no committed "
          f"resource; converged to {RESOURCES} components; {time.monotonic() - started:.0f}s")
    assert len(summary) == len(KILL_FRACTIONS) == 20


@pytest.mark.cli_versions("v3.224.0")
@pytest.mark.timeout_seconds(300)
def test_kill9_during_checkpoint_up(e2e, make_server):
    """The checkpoint/delta path: SIGKILL at 3 points; the last committed checkpoint survives."""
    srv = make_server()
    e2e.use_server(srv)
    e2e.stack("dev")
    program = {"dir": str(e2e.files), "components": RESOURCES}
    kills = 0
    for round_no, k in enumerate((40, 150, 120), 1):  # checkpoint requests; a fresh up makes ~600
        tail = LogTail(srv)
        up = e2e.spawn("up", "dev", program)
        wait_for(lambda: tail.count("/checkpointdelta") + tail.count("/checkpointverbatim") >= k
                 or up.poll() is not None, f"{k} checkpoints", timeout=120, step=0.01)
        srv.kill()
        running = running_update(srv.db)
        assert running is not None, f"round {round_no}: the update had ended before the kill"
        truth, rows = checkpoint_truth(srv.db, running[0])
        srv.start()
        assert integrity(srv.db) == [("ok",)]
        cancel_if_running(e2e, srv.db, "dev")
        up.communicate(timeout=120)
        now = state_urns(e2e, "dev")
        assert truth <= now, f"round {round_no}: lost {sorted(truth - now)[:5]}"
        kills += 1
        print(f"round {round_no}: kill after {k} checkpoints: {rows} stored rows, "
              f"{len(components(truth))} components committed, state has {len(components(now))}")
    stack = e2e.stack("dev", create=False)
    e2e.up(stack, program)
    assert len(components(state_urns(e2e, "dev"))) == RESOURCES
    assert e2e.up(stack, program) == {"same": RESOURCES + 1}
    print(f"kill -9 (checkpoint CLI): {kills}/3 kills with the last checkpoint kept")


@pytest.mark.timeout_seconds(300)
def test_power_loss_then_lease_expiry(e2e, make_server):
    """Server and CLI die together; once the short lease lapses the next `up` recovers.

    No `pulumi cancel` here: the next update finds the abandoned one (its lease
    expired), finishes it with what its journal committed, and runs on top.
    The CLI assumes a 5-minute lease and renews only after half of it, so with
    `--lease-seconds 2` an update outlives its lease unless the server extends
    the lease while the update keeps writing.
    """
    srv = make_server("--lease-seconds", "2")
    e2e.use_server(srv)
    program = {"dir": str(e2e.files), "components": RESOURCES}
    for round_no, (name, fraction) in enumerate((("dev", 0.3), ("prod", 0.7)), 1):
        target = int(fraction * (RESOURCES + 1))
        e2e.stack(name)
        up = up_until_committed(e2e, srv, name, program, target)
        assert up is not None, f"round {round_no}: the up ended before the kill"
        srv.kill()
        _kill_marked(e2e.env["E2E_SANDBOX"])  # the CLI and its program die too
        up.wait(30)
        running = running_update(srv.db)
        assert running is not None
        truth, _ = journal_truth(srv.db, running[0])
        srv.start()
        assert integrity(srv.db) == [("ok",)]
        wait_for(lambda: not srv.get(e2e.path(name)).get("currentOperation"),
                 "the abandoned update's lease to lapse", timeout=30, step=0.2)
        stack = e2e.stack(name, create=False)
        changes = e2e.up(stack, program)  # runs well past the 2-second lease
        now = state_urns(e2e, name)
        assert truth <= now, f"round {round_no}: lost {sorted(truth - now)[:5]}"
        assert len(components(now)) == RESOURCES, len(components(now))
        print(f"power loss {round_no}: {len(truth)} committed resources kept; "
              f"the next up made {changes}")


# ==== graceful restart ======================================================

ROUNDS = 10


@pytest.mark.timeout_seconds(300)
def test_sigterm_restart_during_up(e2e, make_server):
    """SIGTERM + immediate restart while an `up` runs: the CLI's retries finish it."""
    srv = make_server()
    e2e.use_server(srv)
    e2e.stack("dev")
    files = {}
    ok = 0
    for round_no in range(ROUNDS):
        # Three resources updated every round (sleeping 0.5-1.5 s), one new one.
        files = {name: {"content": f"{name}-r{round_no}", "sleep": sleep}
                 for name, sleep in (("s1", 0.5), ("s2", 1.0), ("s3", 1.5))} | {
                     k: v for k, v in files.items() if k.startswith("n")}
        files[f"n{round_no}"] = {"content": f"new-{round_no}", "sleep": 1.0}
        for marker in e2e.files.glob("*.started"):
            marker.unlink()
        up = e2e.spawn("up", "dev", {"dir": str(e2e.files), "files": files})
        wait_for(lambda: any(e2e.files.glob("*.started")) or up.poll() is not None,
                 "a resource to start", timeout=120)
        time.sleep(0.15 * (round_no % 8))  # land the signal at different moments
        assert up.poll() is None, f"round {round_no}: the up ended too early\n{up.communicate()}"
        down = time.monotonic()
        srv.stop()
        assert srv.proc.returncode == 0, f"round {round_no}: server exited {srv.proc.returncode}"
        srv.start()
        down = time.monotonic() - down
        after = LogTail(srv)
        out, err = up.communicate(timeout=120)
        assert up.returncode == 0, e2e.explain(f"round {round_no}: the up failed", out, err)
        # The update began on the old server and was finished on the new one.
        assert after.count("/complete") == 1, after.text()
        writes = after.count("/journalentries")
        changes = json.loads(out.strip().splitlines()[-1])
        expected = {"create": 5} if round_no == 0 else {"update": 3, "create": 1,
                                                        "same": 1 + round_no}
        assert changes == expected, (round_no, changes)
        resources = {r["urn"].rsplit("::", 1)[1]: r for r in e2e.resources("dev")
                     if r["type"] == "pulumi-python:dynamic:Resource"}
        assert sorted(resources) == sorted(files), (round_no, sorted(resources))
        assert all(resources[n]["outputs"]["content"] == f["content"] for n, f in files.items())
        ok += 1
        print(f"round {round_no}: server down {down:.2f}s; {writes} journal writes and the "
              f"completion went to the new server; {len(resources)} resources")
    log = srv.log.read_text(errors="replace")
    assert log.count("draining and stopping") == ROUNDS
    assert not server_errors(log), server_errors(log)[:5]
    print(f"SIGTERM restarts during up: {ok}/{ROUNDS} ups completed with every resource")


# ==== load ==================================================================

STACKS = 20


@pytest.mark.timeout_seconds(400)
def test_parallel_stacks(e2e, make_server):
    """20 CLI processes update 20 stacks at once: all succeed, no lock errors, no 5xx."""
    srv = make_server()
    e2e.use_server(srv)
    names = [f"load-{i:02}" for i in range(STACKS)]
    for name in names:
        status, body = srv.request("POST", f"/api/stacks/{ORG}/{e2e.project}",
                                   json.dumps({"stackName": name}).encode())
        assert status == 200, body
    started = time.monotonic()
    procs = {name: e2e.spawn("up", name, {"components": 3, "outputs": {"stack": name}})
             for name in names}
    results = {name: (p.wait(timeout=360), *p.communicate()) for name, p in procs.items()}
    elapsed = time.monotonic() - started
    failed = {n: r for n, r in results.items() if r[0] != 0}
    assert not failed, e2e.explain(f"{len(failed)} ups failed", *next(iter(failed.values()))[1:])
    for name, (_, out, _) in results.items():
        assert json.loads(out.strip().splitlines()[-1]) == {"create": 4}, (name, out)
        deployment = e2e.export(name)["deployment"]
        assert len(deployment["resources"]) == 4
        root = [r for r in deployment["resources"] if r["type"] == "pulumi:pulumi:Stack"][0]
        assert root["outputs"]["stack"] == name
    log = srv.log.read_text(errors="replace")
    assert not server_errors(log), server_errors(log)[:5]
    requests = len(ACCESS_LINE.findall(log))
    print(f"load: {STACKS}/{STACKS} parallel ups succeeded in {elapsed:.0f}s, "
          f"{requests} requests, no 5xx, no lock errors")


# ==== TLS, tokens, logs =====================================================

def self_signed(directory):
    """A self-signed certificate for 127.0.0.1 (IP SAN), made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"openssl failed: {proc.stderr}", pytrace=False)
    return cert, key


SECRET = "tls-e2e-secret-Q7vX"


def test_tls(e2e, make_server, tmp_path):
    cert, key = self_signed(tmp_path)
    srv = make_server("--tls-cert", str(cert), "--tls-key", str(key), cafile=cert)
    assert srv.url.startswith("https://127.0.0.1:"), srv.url
    e2e.use_server(srv)
    out = e2e.run("login", srv.url).stdout
    assert "Logged in to" in out and srv.url in out, out
    e2e.run("stack", "init", "dev")
    stack = e2e.stack("dev", create=False)
    changes = e2e.up(stack, {"dir": str(e2e.files), "files": {"a": {"content": "a"}},
                             "secret_outputs": {"token": SECRET}})
    assert changes == {"create": 2}, changes
    shown = json.loads(e2e.run("stack", "output", "--json", "--show-secrets").stdout)
    assert shown["token"] == SECRET, shown
    assert SECRET not in json.dumps(e2e.export("dev"))
    # The server presents that certificate: untrusted without it (the CLI would
    # retry such errors for ~15 s, so a plain client checks this).
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(
            socket.create_connection(("127.0.0.1", srv.port), timeout=10),
            server_hostname="127.0.0.1")
    # Plain http to the TLS port gets no HTTP answer, and the server lives on.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as plain:
        plain.sendall(b"GET /api/capabilities HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = plain.recv(100)
        except OSError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    assert srv.request("GET", "/api/capabilities")[0] == 200


def test_auth_tokens(e2e, make_server):
    right = "right-token-" + os.urandom(6).hex()
    srv = make_server("--auth-token", f"other-token,{right}", token=right)
    e2e.use_server(srv)
    assert "Logged in to" in e2e.run("login", srv.url).stdout
    e2e.run("stack", "init", "dev")
    assert re.search(r"^dev\*", e2e.run("stack", "ls").stdout, re.M)
    # A wrong PULUMI_ACCESS_TOKEN: the CLI's login check gets the server's 401.
    e2e.use_server(srv, token="wrong-token")
    e2e.fails("stack", "ls", match=r"Unauthorized: No credentials provided or are invalid")
    e2e.fails("login", srv.url, match=r"Unauthorized|401")
    # The stored login's token is revoked (the server restarts with another
    # list): the CLI's next call gets 401 and asks the user to log in again.
    e2e.use_server(srv)
    assert re.search(r"^dev\*", e2e.run("stack", "ls").stdout, re.M)
    srv.args = ["--auth-token", "other-token"]
    srv.restart()
    del e2e.env["PULUMI_ACCESS_TOKEN"]  # the CLI uses the token `login` stored
    e2e.fails("stack", "ls", match=r"requires logging in; try running `pulumi login` first")
    for token, status in ((right, 401), ("wrong-token", 401), ("other-token", 200)):
        srv.token = token
        assert srv.request("GET", "/api/user")[0] == status, token
    assert srv.request("GET", "/api/capabilities")[0] == 200  # needs no token


def test_logs_hold_no_secrets(e2e, make_server):
    token = "log-token-" + os.urandom(8).hex()
    config_secret = "cfg-plain-" + os.urandom(8).hex()
    output_secret = "out-plain-" + os.urandom(8).hex()
    file_secret = "file-plain-" + os.urandom(8).hex()
    srv = make_server("--auth-token", token, "--log-level", "debug", token=token)
    e2e.use_server(srv)
    e2e.run("login", srv.url)
    e2e.run("stack", "init", "dev")
    e2e.run("config", "set", "--secret", "dbpass", config_secret)
    assert e2e.run("config", "get", "dbpass").stdout.strip() == config_secret
    stack = e2e.stack("dev", create=False)
    e2e.up(stack, {"dir": str(e2e.files), "files": {"f": {"content": file_secret, "secret": True}},
                   "secret_outputs": {"token": output_secret}})
    shown = json.loads(e2e.run("stack", "output", "--json", "--show-secrets").stdout)
    assert shown["token"] == output_secret
    exported = e2e.run("stack", "export", "--show-secrets").stdout
    assert output_secret in exported and file_secret in exported
    e2e.call(stack.refresh)

    leases = [r[0] for r in query(srv.db, "SELECT lease_token FROM updates") if r[0]]
    log = srv.log.read_text(errors="replace")
    assert " DEBUG " in log and "journal entries" in log, "the debug log is empty"
    forbidden = {"token": token, "config secret": config_secret,
                 "output secret": output_secret, "file secret": file_secret}
    forbidden |= {f"lease token {i}": lease for i, lease in enumerate(leases)}
    for name, value in list(forbidden.items()):
        raw = value.encode()
        forbidden[f"{name} (base64)"] = base64.b64encode(raw).decode()
        # The same bytes at any offset inside a longer base64 text.
        for shift in (1, 2):
            inner = base64.b64encode(b"\0" * shift + raw).decode()[4:-4]
            forbidden[f"{name} (base64, shifted {shift})"] = inner
    found = [name for name, value in forbidden.items() if value in log]
    assert not found, f"the server log holds: {found}"
    print(f"logs: {len(log.splitlines())} debug log lines hold none of {len(forbidden)} "
          f"secret forms ({len(leases)} lease tokens)")


# ==== fuzzing ===============================================================

def fuzz_examples():
    return int(os.environ.get("PULUMI_BACKEND_FUZZ_EXAMPLES") or 5)


def fuzz_seed():
    return int(os.environ.get("PULUMI_BACKEND_FUZZ_SEED") or 1)


def run_schemathesis(binary, url, workdir, config=None):
    cmd = [str(binary)]
    if config:
        cmd += ["--config-file", str(config)]
    cmd += ["run", url + "/api/openapi/pulumi-spec.json",
            "-c", "not_a_server_error,hostile_json_refused", "-H", "Authorization: token x",
            "-n", str(fuzz_examples()), "--seed", str(fuzz_seed()),
            "--no-color", "--generation-database", "none"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULUMI_")}
    # fuzz_hooks.py adds lone surrogates and deep nesting to generated bodies and checks
    # that they are refused.
    env.update(NO_COLOR="1", SCHEMATHESIS_HOOKS="fuzz_hooks", PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent), env.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=1800,
                          stdin=subprocess.DEVNULL, env=env)
    counts = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    return proc, counts


@pytest.mark.parametrize("params", ["random", "pinned"])
def test_fuzz_openapi(make_server, tmp_path, params):
    """schemathesis against /api/openapi/pulumi-spec.json: no request gets a 5xx."""
    binary = Path(sys.executable).parent / "schemathesis"
    if not os.access(binary, os.X_OK):
        unavailable(f"schemathesis is not installed in {Path(sys.executable).parent}")
    srv = make_server()
    config = None
    if params == "pinned":
        status, body = srv.request("POST", f"/api/stacks/{ORG}/proj",
                                   json.dumps({"stackName": "dev"}).encode())
        assert status == 200, body
        config = tmp_path / "schemathesis.toml"
        config.write_text('[parameters]\n"path.orgName" = "organization"\n'
                          '"path.projectName" = "proj"\n"path.stackName" = "dev"\n')
    started = time.monotonic()
    proc, counts = run_schemathesis(binary, srv.url, tmp_path, config)
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    assert proc.returncode == 0, f"schemathesis exited {proc.returncode}\n{tail}\n{proc.stderr}"
    assert counts and counts[1] == counts[2] and int(counts[1]) > 0, tail
    log = srv.log.read_text(errors="replace")
    assert not server_errors(log), server_errors(log)[:5]
    served = ACCESS_LINE.findall(log)
    on_stack = [m for m in served if m[1].startswith(f"/api/stacks/{ORG}/proj/dev/")
                and m[2].startswith("2")]
    if params == "pinned":  # the pinned names reach the stack's real handlers
        assert len(on_stack) > 10, len(on_stack)
        # Nothing the fuzzing stored (lone surrogates, deep nesting) breaks a read later.
        for suffix in ("", "/updates", "/export"):
            status, body = srv.request("GET", f"/api/stacks/{ORG}/proj/dev{suffix}")
            assert status < 500, (suffix, status, body[:200])
    print(f"fuzz ({params} path parameters, -n {fuzz_examples()}, seed {fuzz_seed()}): "
          f"{counts[1]} generated, {counts[2]} passed; {len(served)} requests served, "
          f"{len(on_stack)} 2xx on the stack, no 5xx; {time.monotonic() - started:.0f}s")

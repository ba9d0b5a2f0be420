"""The newest CLI's team commands against pulumi_backend.py (issue 25): `pulumi org
audit-log`, `org role`, `org member`, `org usage` and `pulumi stack history events`.

One server for the module, with --auth-token (its token's user, "admin", is an org
admin that can add members); each test checks what the CLI prints. Before these
routes existed every command here failed with ``[404] Not Found: no route``.
"""

import csv
import io
import json
import re

import pytest

from conftest import ORG, SERVER_SCRIPT, TOKEN, Server, unavailable

ADMIN = "admin"  # the server's --user: who --auth-token tokens act as


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """This module's server: with --auth-token, so that members can be added."""
    if not SERVER_SCRIPT.exists():
        unavailable(f"{SERVER_SCRIPT} does not exist")
    srv = Server(tmp_path_factory.mktemp("server"), ["--auth-token", TOKEN])
    srv.start()
    yield srv
    srv.stop()


def api(e2e, method, path, body=None):
    status, out = e2e.server.request(method, path, None if body is None
                                     else json.dumps(body).encode())
    assert status == 200, f"{method} {path}: {status} {out[:300]!r}"
    return json.loads(out or b"{}")


def deployment(project, stack, names):
    """A state (as `pulumi stack import` takes it) with a stack and one component per name."""
    root = f"urn:pulumi:{stack}::{project}::pulumi:pulumi:Stack::{project}-{stack}"
    resources = [{"urn": root, "custom": False, "type": "pulumi:pulumi:Stack"}]
    resources += [{"urn": f"urn:pulumi:{stack}::{project}::e2e:index:Group::{n}",
                   "custom": False, "type": "e2e:index:Group", "parent": root} for n in names]
    return {"version": 3, "deployment": {"manifest": {"time": "2026-01-01T00:00:00Z",
                                                      "magic": "", "version": ""},
                                         "resources": resources}}


def table_rows(out):
    """The cells of each body row of a go-pretty table (StyleLight)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")]
            for line in out.splitlines() if line.startswith("│")][1:]


# ==== audit log ===============================================================

def test_audit_log_list(e2e):
    e2e.run("stack", "init", "audited")
    out = e2e.run("org", "audit-log", "list").stdout
    assert re.search(r"TIMESTAMP\s+│ USER\s+│ EVENT", out), out
    assert re.search(rf"│ {ADMIN}\s+│ stack_created\s+│ .*audited", out), out
    only = e2e.run("org", "audit-log", "list", "--event-type", "stack_created",
                   "--output", "json").stdout
    events = json.loads(only)["events"]
    assert events and {e["event"] for e in events} == {"stack_created"}, only
    assert any(e["user"]["githubLogin"] == ADMIN and "audited" in e["description"]
               for e in events), only
    none = e2e.run("org", "audit-log", "list", "--user", "nobody").stdout
    assert "No audit log events found." in none, none


def test_audit_log_export(e2e):
    e2e.run("stack", "init", "exported")
    out = e2e.run("org", "audit-log", "export").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and rows[0].keys() >= {"time", "actor", "event", "target", "outcome"}, out
    assert any(r["event"] == "stack_created" and r["target"].endswith("/exported")
               and r["actor"] == ADMIN for r in rows), out
    cef = e2e.run("org", "audit-log", "export", "--format", "cef",
                  "--event-type", "stack_created").stdout
    lines = cef.splitlines()
    assert lines and all(line.startswith("CEF:0|Pulumi|pulumi-backend|") for line in lines), cef
    assert any("|stack_created|" in line and f"suser={ADMIN}" in line
               and "exported" in line for line in lines), cef
    as_json = json.loads(e2e.run("org", "audit-log", "export", "--output", "json").stdout)
    assert as_json["count"] == len(as_json["events"]) >= 1, as_json
    assert any(e["event"] == "stack_created" for e in as_json["events"]), as_json


# ==== roles and members =======================================================

def test_role_list(e2e):
    out = e2e.run("org", "role", "list").stdout
    ids = [row[0] for row in table_rows(out)]
    assert ids == ["member", "admin", "stack-read", "stack-write", "stack-admin"], out
    assert "5 role(s)" in out, out
    err = e2e.fails("org", "role", "assign", "stack-write", "devs",
                    match=r"\[400\] Bad Request: custom roles are not supported")
    assert "team grant" in err, err


def test_member_list_edit_remove(e2e):
    api(e2e, "POST", f"/api/orgs/{ORG}/members/alice", {"role": "member"})
    rows = {row[0]: row for row in table_rows(e2e.run("org", "member", "list").stdout)}
    assert rows[ADMIN][2] == "Admin" and rows["alice"][2] == "Member", rows
    out = e2e.run("org", "member", "edit", "alice", "--role", "admin").stdout
    assert re.search(r"GitHub login:\s+alice", out) and re.search(r"Role:\s+admin", out), out
    out = e2e.run("org", "member", "edit", "alice", "--fga-role-name", "Member").stdout
    assert re.search(r"Role:\s+member", out), out
    listed = json.loads(e2e.run("org", "member", "list", "--output", "json").stdout)
    assert {m["user"]["githubLogin"]: m["role"] for m in listed["members"]} == {
        ADMIN: "admin", "alice": "member"}, listed
    out = e2e.run("org", "member", "remove", "alice", "--yes").stdout
    assert f"Removed member alice from organization {ORG}." in out, out
    logins = [row[0] for row in table_rows(e2e.run("org", "member", "list").stdout)]
    assert logins == [ADMIN], logins


# ==== usage ===================================================================

def test_usage_get(e2e):
    before = json.loads(e2e.run("org", "usage", "get", "--lookback-days", "2",
                                "--output", "json").stdout)["summary"]
    for stack, names in (("small", ["a"]), ("big", ["a", "b", "c"])):
        e2e.run("stack", "init", stack)
        path = e2e.files / f"{stack}.json"
        path.write_text(json.dumps(deployment(e2e.project, stack, names)))
        e2e.run("stack", "import", "--file", str(path), "--stack", stack)
    out = e2e.run("org", "usage", "get", "--lookback-days", "2").stdout
    rows = table_rows(out)
    assert len(rows) == 3 and "3 summary point(s)." in out, out  # two days ago .. today
    # Today: 2 + 4 resources more than before (each state counts its Stack resource).
    assert int(rows[-1][3]) == before[-1]["resources"] + 6, (before, out)
    hourly = json.loads(e2e.run("org", "usage", "get", "--granularity", "hourly",
                                "--lookback-days", "1", "--output", "json").stdout)["summary"]
    assert len(hourly) == 25 and all("hour" in s for s in hourly), hourly
    assert hourly[-1]["resources"] == before[-1]["resources"] + 6, hourly


# ==== update events ===========================================================

def test_stack_history_events(e2e):
    from test_cli import spec

    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a"], components=1), message="first")
    updates = api(e2e, "GET", e2e.path("dev") + "/updates")["updates"]
    update_id = updates[0]["updateID"]
    # By version (what `pulumi stack history` shows) and by id (the console shows it).
    out = e2e.run("stack", "history", "events", "1", "--stack", "dev").stdout
    assert re.search(r"TIMESTAMP\s+│ TYPE\s+│ DETAILS", out), out
    assert re.search(r"│ resource-pre\s+│ create urn:pulumi:dev::", out), out
    assert "dynamic:Resource::a " in out, out  # a long URN wraps in its cell
    assert re.search(r"│ summary\s+│ result=succeeded", out), out
    count = int(re.search(r"(\d+) event\(s\)", out)[1])
    same = e2e.run("stack", "history", "events", update_id, "--stack", "dev", "--all").stdout
    assert f"{count} event(s)" in same, same
    urn = next(r["urn"] for r in e2e.resources("dev") if r["urn"].endswith("::a"))
    only = json.loads(e2e.run("stack", "history", "events", update_id, "--stack", "dev",
                              "--urn", urn, "--output", "json").stdout)
    assert only and all(urn in json.dumps(e) for e in only), only
    assert {k for e in only for k in e} >= {"resourcePreEvent", "resOutputsEvent"}, only
    every = json.loads(e2e.run("stack", "history", "events", "1", "--stack", "dev", "--all",
                               "--output", "json").stdout)
    assert len(every) == count > len(only), (count, len(only))
    doc = json.loads(e2e.run("stack", "history", "events", "1", "--stack", "dev", "--summary",
                             "--output", "json").stdout)
    assert doc["result"] == "succeeded" and doc["summary"] == {"create": 3}, doc
    assert [(r["name"], r["op"]) for r in doc["resources"]][1:] == [
        ("group-0", "create"), ("a", "create")], doc
    text = e2e.run("stack", "history", "events", update_id, "--stack", "dev",
                   "--summary").stdout
    assert re.search(r"Result:\s+succeeded\nDuration: .*\nChanges:\s+3 create", text), text
    assert re.search(r"│ a\s+│ pulumi-python:dynamic:Resource\s+│ create", text), text
    e2e.fails("stack", "history", "events", "9", "--stack", "dev", match=r"\[404\]")

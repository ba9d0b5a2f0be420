"""The real `pulumi` CLI against pulumi_backend.py, one scenario per test.

Each test runs the CLI (plain commands and Automation API programs, see
e2e_programs.py) and then checks both what the CLI said and what the server
stored (GET .../export and friends). Tests marked ``core`` also run on the
older CLI, which uploads checkpoints instead of journal entries.
"""

import base64
import json
import os
import re
import sqlite3

import pytest

from conftest import E2E_DIR, journal_entries, wait_for

ORG = "organization"
SECRET = "hunter2-e2e-secret-value"
SECRET_KEY = "4dabf18193072939515e22adb298388d"  # Pulumi's marker of a secret in state
# A real journal-v2 update with a state migration, replayed by the unit tests.
JOURNAL_FIXTURE = E2E_DIR / "fixtures" / "journal-v2-state-migration.json"
WRITE_FIXTURES = os.environ.get("PULUMI_BACKEND_WRITE_FIXTURES") == "1"  # read before the
# e2e fixture clears the PULUMI_* variables


def spec(e2e, files=(), **kw):
    """A program spec with file resources in the test's files folder.

    files: names, or a dict name -> file options (see e2e_programs).
    """
    if not isinstance(files, dict):
        files = {name: {"content": f"{name}-v1"} for name in files}
    return {"dir": str(e2e.files), "files": files, **kw}


def inline_program(spec):
    """The inline program of a spec (imported late: collection needs no pulumi SDK)."""
    import e2e_programs

    return e2e_programs.build(spec)


def by_name(resources):
    """Map the custom and component resources of a deployment by logical name."""
    return {r["urn"].rsplit("::", 1)[1]: r for r in resources
            if not r["type"].startswith(("pulumi:pulumi:Stack", "pulumi:providers:"))}


def plain(resource):
    """A resource without its secret `__provider` (the CLI re-encrypts it on every update)."""
    return {k: ({n: v for n, v in val.items() if n != "__provider"} if isinstance(val, dict) else val)
            for k, val in resource.items()}


def stack_outputs(deployment):
    stack = [r for r in deployment.get("resources") or [] if r["type"] == "pulumi:pulumi:Stack"]
    return stack[0].get("outputs", {}) if stack else {}


def stack_info(e2e, stack):
    return e2e.server.get(e2e.path(stack))


def assert_unlocked(e2e, stack):
    """No operation in progress (activeUpdate stays set: it names the last update)."""
    info = stack_info(e2e, stack)
    assert not info.get("currentOperation"), info


# ==== identity and stacks ===================================================

@pytest.mark.core
def test_login_and_whoami(e2e):
    out = e2e.run("login", e2e.server.url).stdout
    assert "Logged in to" in out and "admin" in out and e2e.server.url in out, out
    who = e2e.run("whoami", "-v").stdout
    assert re.search(r"User:\s+admin", who), who
    assert re.search(rf"Organizations:\s+{ORG}", who), who
    # "Backend URL" is the console's URL, which the CLI can't derive for 127.0.0.1.
    assert e2e.run("whoami").stdout.strip() == "admin"
    creds = json.loads((e2e.work.parent / "pulumi-home" / "credentials.json").read_text())
    assert creds["current"] == e2e.server.url
    assert e2e.server.get("/api/user")["githubLogin"] == "admin"


@pytest.mark.core
def test_stack_init_ls_select(e2e):
    e2e.run("stack", "init", "alpha")
    e2e.run("stack", "init", "beta")
    listed = e2e.run("stack", "ls").stdout
    assert re.search(r"^beta\*", listed, re.M) and re.search(r"^alpha\s", listed, re.M), listed
    e2e.run("stack", "select", "alpha")
    assert re.search(r"^alpha\*", e2e.run("stack", "ls").stdout, re.M)
    e2e.fails("stack", "init", "alpha", match="already exists")
    stacks = e2e.server.get(f"/api/user/stacks?project={e2e.project}")["stacks"]
    assert sorted(s["stackName"] for s in stacks) == ["alpha", "beta"]
    assert all(s["orgName"] == ORG and s["projectName"] == e2e.project for s in stacks)
    assert not e2e.resources("alpha")


def test_stack_tags(e2e):
    e2e.run("stack", "init", "dev")
    e2e.run("stack", "tag", "set", "team", "blue")
    e2e.run("stack", "tag", "set", "cost-center", "42")
    tags = json.loads(e2e.run("stack", "tag", "ls", "--json").stdout)
    assert tags["team"] == "blue" and tags["cost-center"] == "42", tags
    assert tags["pulumi:project"] == e2e.project
    assert stack_info(e2e, "dev")["tags"]["team"] == "blue"
    e2e.run("stack", "tag", "rm", "team")
    assert "team" not in json.loads(e2e.run("stack", "tag", "ls", "--json").stdout)
    server_tags = stack_info(e2e, "dev")["tags"]
    assert "team" not in server_tags and server_tags["cost-center"] == "42", server_tags
    listed = e2e.run("stack", "ls", "--tag", "cost-center=42").stdout
    assert re.search(r"^dev", listed, re.M), listed


def test_pulumi_api_lists_and_calls_our_operations(e2e):
    """`pulumi api` reads the OpenAPI document of the backend it is logged in to
    (GET /api/openapi/pulumi-spec.json) and calls our routes by operationId."""
    e2e.run("login", e2e.server.url)
    e2e.run("stack", "init", "dev")
    listed = json.loads(e2e.run("api", "list", "--output=json").stdout)
    ops = {(op["method"], op["path"]): op for op in listed["operations"]}
    stack = "/api/stacks/{orgName}/{projectName}/{stackName}"
    assert listed["count"] == len(ops) > 60, listed["count"]
    assert ops[("GET", stack)]["operationId"] == "GetStack"
    assert ops[("GET", stack)]["tag"] == "Stacks" and ops[("GET", stack)]["summary"]
    assert ops[("PATCH", stack + "/update/{updateID}/checkpointdelta")]["operationId"] == \
        "PatchUpdateCheckpointDelta_update"
    assert ("GET", "/api/openapi") in ops
    assert ("GET", "/api/orgs/{orgName}/auditlogs") in ops  # issue 13's access routes
    assert not any(path.startswith("/api/esc/") for _, path in ops)  # ours, not Pulumi Cloud's
    table = e2e.run("api", "list", "--output=table").stdout
    assert re.search(r"Users\s+.\s+GET\s+.\s+/api/user\s", table), table
    # By operationId, the path variables taken from the selected stack.
    got = json.loads(e2e.run("api", "GetStack").stdout)
    assert (got["orgName"], got["projectName"], got["stackName"]) == (ORG, e2e.project, "dev")
    assert json.loads(e2e.run("api", "/api/user").stdout)["githubLogin"] == "admin"
    e2e.run("api", "UpdateStackTags", "--body", json.dumps({"team": "api"}), "-X", "PATCH")
    assert stack_info(e2e, "dev")["tags"] == {"team": "api"}
    described = e2e.run("api", "describe", "ListUserStacks").stdout
    assert "continuationToken" in described and "resourceCount" in described, described


@pytest.mark.core
def test_config_secret(e2e):
    e2e.run("stack", "init", "dev")
    e2e.run("config", "set", "--secret", "dbpass", SECRET)
    e2e.run("config", "set", "region", "moon-1")
    settings = (e2e.work / "Pulumi.dev.yaml").read_text()
    assert "secure:" in settings and SECRET not in settings, settings
    assert e2e.run("config", "get", "dbpass").stdout.strip() == SECRET
    listing = e2e.run("config").stdout
    assert "[secret]" in listing and SECRET not in listing, listing
    assert SECRET in e2e.run("config", "--show-secrets").stdout
    # The ciphertext in the settings file is the server's: it decrypts it.
    ciphertext = re.search(r"secure:\s*(\S+)", settings)[1]
    status, body = e2e.server.request(
        "POST", e2e.path("dev") + "/decrypt", json.dumps({"ciphertext": ciphertext}).encode())
    assert status == 200, body
    assert base64.b64decode(json.loads(body)["plaintext"]).decode() == SECRET


# ==== updates ===============================================================

@pytest.mark.core
def test_preview_saves_no_state(e2e):
    stack = e2e.stack("dev")
    before = stack_info(e2e, "dev").get("version", 0)
    result = e2e.call(stack.preview, program=inline_program(spec(e2e, ["a", "b"], components=2)))
    assert result.change_summary.get("create") == 5, result.change_summary  # stack+2+2
    assert stack_info(e2e, "dev").get("version", 0) == before
    assert not e2e.resources("dev")
    assert not os.listdir(e2e.files)
    assert stack.history() == []
    assert_unlocked(e2e, "dev")


def twenty(e2e):
    """15 files (one with secret content), 4 components, plain and secret outputs."""
    files = {f"f{i:02}": {"content": f"content-{i}"} for i in range(15)}
    files["f00"] = {"content": SECRET + "-in-file", "secret": True}
    return spec(e2e, files, components=4, outputs={"plain": "visible"},
                secret_outputs={"token": SECRET})


@pytest.mark.core
def test_up_creates_resources_with_secret_outputs(e2e):
    stack = e2e.stack("dev")
    changes = e2e.up(stack, twenty(e2e))
    assert changes == {"create": 20}, changes  # stack + 4 components + 15 files
    assert sorted(os.listdir(e2e.files)) == [f"f{i:02}.txt" for i in range(15)]
    outputs = stack.outputs()
    assert outputs["token"].secret and outputs["token"].value == SECRET
    assert outputs["plain"].value == "visible" and not outputs["plain"].secret

    deployment = e2e.export("dev")["deployment"]
    raw = json.dumps(deployment)
    assert SECRET not in raw, "a secret is stored in plaintext"
    resources = by_name(deployment["resources"])
    assert len(resources) == 19
    assert resources["f03"]["outputs"]["content"] == "content-3"
    token = stack_outputs(deployment)["token"]
    assert token[SECRET_KEY] == "1b47061264138c4ac30d75fd1eb44270" and token["ciphertext"], token
    assert deployment["secrets_providers"]["type"] == "service"
    state = deployment["secrets_providers"]["state"]
    assert (state["url"], state["owner"], state["project"], state["stack"]) == (
        e2e.server.url, ORG, e2e.project, "dev")
    info = stack_info(e2e, "dev")
    assert info["version"] == 1
    assert_unlocked(e2e, "dev")


@pytest.mark.core
def test_stack_output_secrets(e2e):
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a"], outputs={"plain": "visible"}, secret_outputs={"token": SECRET}))
    hidden = json.loads(e2e.run("stack", "output", "--json").stdout)
    assert hidden["plain"] == "visible" and hidden["token"] == "[secret]", hidden
    assert e2e.run("stack", "output", "token").stdout.strip() == "[secret]"
    shown = json.loads(e2e.run("stack", "output", "--json", "--show-secrets").stdout)
    assert shown["token"] == SECRET, shown
    assert e2e.run("stack", "output", "token", "--show-secrets").stdout.strip() == SECRET
    assert stack_outputs(e2e.export("dev")["deployment"])["token"]["ciphertext"]


@pytest.mark.core
def test_up_with_update_replace_delete(e2e):
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["keep", "upd", "repl", "gone"]))
    first = by_name(e2e.resources("dev"))
    files = {"keep": {"content": "keep-v1"},
             "upd": {"content": "upd-v2"},                            # update
             "repl": {"content": "repl-v1", "fname": "repl-new.txt"},  # replace
             "new": {"content": "new-v1"}}                             # create; "gone" deleted
    changes = e2e.up(stack, spec(e2e, files))
    assert changes == {"same": 2, "update": 1, "replace": 1, "delete": 1, "create": 1}, changes
    assert sorted(os.listdir(e2e.files)) == ["keep.txt", "new.txt", "repl-new.txt", "upd.txt"]

    now = by_name(e2e.resources("dev"))
    assert sorted(now) == ["keep", "new", "repl", "upd"]
    assert now["upd"]["outputs"]["content"] == "upd-v2"
    assert now["repl"]["id"] != first["repl"]["id"]
    assert plain(now["keep"]) == plain(first["keep"])
    assert stack_info(e2e, "dev")["version"] == 2
    assert_unlocked(e2e, "dev")



@pytest.mark.cli_versions("v3.224.0")
def test_full_checkpoints_when_deltas_are_off(e2e):
    """PULUMI_OPTIMIZED_CHECKPOINT_PATCH=false: the old CLI sends whole states
    to PATCH .../checkpoint (the third upload form)."""
    e2e.env["PULUMI_OPTIMIZED_CHECKPOINT_PATCH"] = "false"
    before = e2e.server.log.read_text(errors="replace").count("/checkpoint 200")
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a", "b"], secret_outputs={"token": SECRET}))
    changes = e2e.up(stack, spec(e2e, {"a": {"content": "a-v2"}}))
    assert changes == {"same": 1, "update": 1, "delete": 1}, changes
    assert e2e.server.log.read_text(errors="replace").count("/checkpoint 200") > before
    assert by_name(e2e.resources("dev"))["a"]["outputs"]["content"] == "a-v2"
    assert stack_info(e2e, "dev")["version"] == 2
    assert_unlocked(e2e, "dev")

@pytest.mark.core
def test_refresh_detects_drift(e2e):
    stack = e2e.stack("dev")
    program = spec(e2e, ["a", "b", "c"])
    e2e.up(stack, program)
    (e2e.files / "a.txt").write_text("drifted")
    os.remove(e2e.files / "b.txt")
    result = e2e.call(stack.refresh)
    changes = result.summary.resource_changes
    assert changes.get("update") == 1 and changes.get("delete") == 1, changes
    now = by_name(e2e.resources("dev"))
    assert now["a"]["outputs"]["content"] == "drifted"
    assert "b" not in now and now["c"]["outputs"]["content"] == "c-v1"
    assert stack.history()[0].kind == "refresh"
    # The next up puts things back.
    changes = e2e.up(stack, program)
    assert changes.get("update") == 1 and changes.get("create") == 1, changes
    assert (e2e.files / "a.txt").read_text() == "a-v1" and (e2e.files / "b.txt").exists()
    assert stack_info(e2e, "dev")["version"] == 3


@pytest.mark.core
def test_destroy(e2e):
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a", "b"], components=2, secret_outputs={"token": SECRET}))
    result = e2e.call(stack.destroy)
    assert result.summary.resource_changes == {"delete": 5}, result.summary.resource_changes
    assert os.listdir(e2e.files) == []
    assert e2e.resources("dev") == []
    assert [h.kind for h in stack.history()] == ["destroy", "update"]
    assert_unlocked(e2e, "dev")


def test_up_again_after_destroy(e2e):
    stack = e2e.stack("dev")
    program = spec(e2e, ["a", "b"], secret_outputs={"token": SECRET})
    e2e.up(stack, program)
    e2e.call(stack.destroy)
    changes = e2e.up(stack, program)
    assert changes == {"create": 3}, changes
    assert sorted(by_name(e2e.resources("dev"))) == ["a", "b"]
    assert stack.outputs()["token"].value == SECRET
    assert stack_info(e2e, "dev")["version"] == 3


@pytest.mark.core
def test_history_paging(e2e):
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a"]), message="first")
    e2e.up(stack, spec(e2e, {"a": {"content": "v2"}}), message="second")
    e2e.call(stack.refresh)
    e2e.call(stack.preview, program=inline_program(spec(e2e, {"a": {"content": "v3"}})))  # not history
    every = stack.history()
    assert [(h.kind, h.version) for h in every] == [("refresh", 3), ("update", 2), ("update", 1)]
    assert all(h.result == "succeeded" for h in every)
    assert [h.message for h in every[1:]] == ["second", "first"]
    page2 = stack.history(page_size=2, page=2)
    assert [(h.kind, h.version) for h in page2] == [("update", 1)]
    cli_page = json.loads(e2e.run("stack", "history", "--json", "--page-size", "2", "--page", "1").stdout)
    assert [h["version"] for h in cli_page] == [3, 2]
    assert "first" in e2e.run("stack", "history", "--page-size", "2", "--page", "2").stdout
    server_page = e2e.server.get(e2e.path("dev") + "/updates?pageSize=2&page=2")["updates"]
    assert [u["version"] for u in server_page] == [1]


def cli_own_state(e2e, specs):
    """Resources after the ``up`` of each spec on a file:// backend: the state the
    CLI's own snapshot manager writes for the same updates."""
    from pulumi import automation as auto

    work = e2e.work.parent / "work-diy"
    work.mkdir()
    (work / "Pulumi.yaml").write_text((e2e.work / "Pulumi.yaml").read_text())
    env = dict(e2e.env, PULUMI_BACKEND_URL=f"file://{work}", PULUMI_CONFIG_PASSPHRASE="e2e")
    opts = auto.LocalWorkspaceOptions(
        work_dir=str(work), pulumi_home=env["PULUMI_HOME"], env_vars=env,
        pulumi_command=e2e.cli.command, secrets_provider="passphrase")
    stack = auto.create_stack("dev", e2e.project, inline_program(specs[0]), opts=opts)
    for program in specs:
        e2e.call(stack.up, program=inline_program(program))
    return stack.export_stack().deployment["resources"]


def shape(resources, files_dir):
    """What two backends' states of the same updates share: no IDs of providers,
    no secrets (encrypted differently), the files folder named alike."""
    out = []
    for r in resources:
        r = {k: v for k, v in plain(r).items() if k not in ("created", "modified")}
        if r["type"].startswith("pulumi:providers:"):
            r.pop("id", None)
        r.pop("provider", None)
        out.append(json.loads(json.dumps(r).replace(str(files_dir), "FILES")))
    return out


class JournalCapture:
    """Copy every journal entry the server commits into a side table (an SQLite
    trigger on the module server's database), to keep what the CLI sent."""

    def __init__(self, server):
        self.db = sqlite3.connect(server.db, timeout=30)
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS e2e_captured (seq INTEGER, batch INTEGER, data BLOB);
            DELETE FROM e2e_captured;
            CREATE TRIGGER IF NOT EXISTS e2e_capture AFTER INSERT ON journal
            BEGIN INSERT INTO e2e_captured VALUES (NEW.seq, NEW.batch, NEW.data); END;""")

    def stop(self):
        """Drop the trigger; return the captured entries in sequenceID order."""
        with self.db:
            self.db.execute("DROP TRIGGER e2e_capture")
        rows = self.db.execute("SELECT batch, data FROM e2e_captured ORDER BY seq").fetchall()
        self.db.close()
        first = {}  # a retried batch: the first copy counts, as in the server's replay
        for entry in journal_entries(rows):
            first.setdefault(entry["sequenceID"], entry)
        return [first[seq] for seq in sorted(first)]


def test_state_migration_renames_a_child(e2e):
    """Journal version 2: the newest CLI journals a state migration (kind 10) only
    when the server answers journalVersion 2; answered 1, the program fails with
    "The Pulumi CLI does not support state migrations".

    The journal of the migrating update is kept in JOURNAL_FIXTURE (rewritten
    with PULUMI_BACKEND_WRITE_FIXTURES=1) for the unit tests' replay."""
    first = {"dir": str(e2e.files), "holder": {"child": "a"}}
    renamed = {"dir": str(e2e.files), "holder": {"child": "b", "renamed_from": "a"}}
    stack = e2e.stack("dev")
    assert e2e.up(stack, first) == {"create": 3}
    base = e2e.export("dev")["deployment"]
    old = by_name(base["resources"])["a"]
    capture = JournalCapture(e2e.server)
    assert e2e.up(stack, renamed) == {"same": 3}  # renamed in state, not replaced
    entries = capture.stop()
    migrated = e2e.export("dev")
    new = by_name(migrated["deployment"]["resources"])
    assert sorted(new) == ["b", "holder"]
    assert (new["b"]["id"], new["b"]["parent"]) == (old["id"], old["parent"])
    assert [e["version"] for e in entries if e["kind"] == 10] == [2]
    assert e2e.up(stack, renamed) == {"same": 3}  # the migration sees the new shape
    log = e2e.server.log.read_text(errors="replace")
    assert f"/{e2e.project}/dev (version 2, journal v2)" in log
    assert os.listdir(e2e.files) == ["child.txt"]
    if WRITE_FIXTURES:
        JOURNAL_FIXTURE.write_text(json.dumps(
            {"cli": e2e.cli.version, "base": base, "entries": entries,
             "expected": migrated["deployment"]["resources"]}, indent=1) + "\n")

    diy_files = e2e.files / "diy"
    diy_files.mkdir()
    theirs = cli_own_state(e2e, [{**first, "dir": str(diy_files)},
                                 {**renamed, "dir": str(diy_files)}])
    assert shape(e2e.resources("dev"), e2e.files) == shape(theirs, diy_files)


# ==== export and import =====================================================

@pytest.mark.core
def test_export_import_round_trip(e2e):
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a", "b"], secret_outputs={"token": SECRET}))
    exported, before, after = (e2e.work / n for n in ("export.json", "before.json", "after.json"))
    e2e.run("stack", "export", "--file", str(exported))
    e2e.run("stack", "export", "--show-secrets", "--file", str(before))
    version = stack_info(e2e, "dev")["version"]
    e2e.run("stack", "import", "--file", str(exported))
    assert stack_info(e2e, "dev")["version"] == version + 1
    # `stack import` re-encrypts every secret (fresh ciphertexts), so compare
    # the plaintext exports byte for byte, and the stored state structurally.
    e2e.run("stack", "export", "--show-secrets", "--file", str(after))
    assert before.read_bytes() == after.read_bytes()
    stored = e2e.export("dev")["deployment"]
    assert SECRET not in json.dumps(stored)
    assert len(stored["resources"]) == len(json.loads(exported.read_text())["deployment"]["resources"])
    assert stack.outputs()["token"].value == SECRET
    assert_unlocked(e2e, "dev")


@pytest.mark.core
def test_export_older_version(e2e):
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, {"a": {"content": "one"}}))
    e2e.up(stack, spec(e2e, {"a": {"content": "two"}}))
    old = json.loads(e2e.run("stack", "export", "--version", "1").stdout)
    assert by_name(old["deployment"]["resources"])["a"]["outputs"]["content"] == "one"
    assert old["deployment"] == e2e.export("dev", version=1)["deployment"]
    current = json.loads(e2e.run("stack", "export").stdout)
    assert by_name(current["deployment"]["resources"])["a"]["outputs"]["content"] == "two"
    assert e2e.server.request("GET", e2e.path("dev") + "/export/99")[0] == 404
    e2e.fails("stack", "export", "--version", "99", match=r"404|not found|does not exist")


def test_import_into_fresh_stack_then_up(e2e):
    program = spec(e2e, ["a", "b"], secret_outputs={"token": SECRET})
    e2e.up(e2e.stack("src"), program)
    exported = e2e.work / "src.json"
    e2e.run("stack", "export", "--stack", "src", "--file", str(exported))
    # Make it dst's state, as a user copying a stack does (the CLI refuses
    # resources of another stack); its secrets still name src's key.
    text = exported.read_text().replace("urn:pulumi:src::", "urn:pulumi:dst::")
    exported.write_text(text.replace(f"::{e2e.project}-src", f"::{e2e.project}-dst"))
    dst = e2e.stack("dst")
    e2e.run("stack", "import", "--stack", "dst", "--file", str(exported))
    deployment = e2e.export("dst")["deployment"]
    assert sorted(by_name(deployment["resources"])) == ["a", "b"]
    assert deployment["secrets_providers"]["state"]["stack"] == "dst"
    assert SECRET not in json.dumps(deployment)
    assert dst.outputs()["token"].value == SECRET
    changes = e2e.up(dst, program)
    assert changes == {"same": 3}, changes
    assert stack_info(e2e, "dst")["version"] == 2


def test_stack_rename_keeps_history_and_secrets(e2e):
    stack = e2e.stack("dev")
    e2e.run("config", "set", "--secret", "pw", "config-" + SECRET, "--stack", "dev")
    e2e.up(stack, spec(e2e, ["a"], secret_outputs={"token": SECRET}))
    e2e.up(stack, spec(e2e, {"a": {"content": "v2"}}, secret_outputs={"token": SECRET}))
    e2e.run("stack", "rename", "renamed", "--stack", "dev")
    # The CLI renames Pulumi.dev.yaml; its ciphertexts now go to the new name.
    assert e2e.run("config", "get", "pw", "--stack", "renamed").stdout.strip() == "config-" + SECRET
    assert e2e.server.request("GET", e2e.path("dev"))[0] == 404
    urns = sorted(r["urn"] for r in e2e.resources("renamed") if "providers" not in r["urn"])
    assert urns == [f"urn:pulumi:renamed::{e2e.project}::pulumi-python:dynamic:Resource::a",
                    f"urn:pulumi:renamed::{e2e.project}::pulumi:pulumi:Stack::{e2e.project}-renamed"]
    assert stack_info(e2e, "renamed")["version"] >= 2
    history = json.loads(e2e.run("stack", "history", "--stack", "renamed", "--json").stdout)
    assert [h["version"] for h in history if h["kind"] == "update"] == [2, 1], history
    shown = json.loads(e2e.run("stack", "output", "--stack", "renamed", "--json",
                               "--show-secrets").stdout)
    assert shown["token"] == SECRET
    renamed = e2e.stack("renamed", create=False)
    changes = e2e.up(renamed, spec(e2e, {"a": {"content": "v2"}}, secret_outputs={"token": SECRET}))
    # Like the CLI's own rename (DIY backends, edit.RenameStack), URNs move to
    # the new stack and the root resource is renamed to PROJECT-NEWSTACK.
    assert changes == {"same": 2}, changes
    assert renamed.outputs()["token"].value == SECRET



def test_secrets_move_between_servers(e2e, make_server):
    """Export from one server, import into another: the CLI decrypts through the
    first server (recorded in the state) and re-encrypts through the second."""
    stack = e2e.stack("dev")
    e2e.run("config", "set", "--secret", "pw", "config-" + SECRET, "--stack", "dev")
    e2e.up(stack, spec(e2e, ["a"], secret_outputs={"token": SECRET}))
    exported = e2e.work / "export.json"
    e2e.run("stack", "export", "--file", str(exported), "--stack", "dev")
    first = e2e.server
    e2e.run("login", first.url)  # keep credentials for the first server's URL
    second = make_server()
    e2e.use_server(second)
    e2e.run("login", second.url)
    e2e.run("stack", "init", f"{ORG}/{e2e.project}/dev", "--no-select")
    e2e.run("stack", "import", "--file", str(exported), "--stack", "dev")
    stored = e2e.export("dev")["deployment"]
    assert stored["secrets_providers"]["state"]["url"] == second.url
    assert SECRET not in json.dumps(stored)
    first.stop()  # from now on only the second server can decrypt
    shown = json.loads(e2e.run("stack", "output", "--json", "--show-secrets",
                               "--stack", "dev").stdout)
    assert shown["token"] == SECRET
    # Config secrets live in Pulumi.dev.yaml, encrypted with the first server's
    # key: the second refuses them until they are set again (README).
    e2e.fails("config", "get", "pw", "--stack", "dev", match="could not be decrypted")
    e2e.run("config", "set", "--secret", "pw", "config-" + SECRET, "--stack", "dev")
    assert e2e.run("config", "get", "pw", "--stack", "dev").stdout.strip() == "config-" + SECRET

def test_rm_with_resources_needs_force(e2e):
    e2e.up(e2e.stack("dev"), spec(e2e, ["a"]))
    e2e.fails("stack", "rm", "dev", "--yes", match="still has resources")
    assert stack_info(e2e, "dev")["stackName"] == "dev"
    assert len(by_name(e2e.resources("dev"))) == 1


def test_rm_force(e2e):
    e2e.up(e2e.stack("dev"), spec(e2e, ["a"]))
    e2e.run("stack", "rm", "dev", "--yes", "--force")
    assert e2e.server.request("GET", e2e.path("dev"))[0] == 404
    assert e2e.server.request("GET", e2e.path("dev") + "/export")[0] == 404
    assert "dev" not in e2e.run("stack", "ls").stdout
    assert (e2e.files / "a.txt").exists()  # --force forgets, it does not destroy
    e2e.run("stack", "init", "dev")  # the name is free again, with a fresh history
    assert e2e.resources("dev") == []


# ==== concurrency and failures ==============================================

def test_cancel_update_held_by_another_process(e2e):
    e2e.stack("dev")
    slow = e2e.spawn("up", "dev", spec(e2e, {"slow": {"content": "x", "sleep": 10}}))
    started = e2e.files / "slow.txt.started"
    wait_for(lambda: started.exists() or slow.poll() is not None, "the slow resource to start")
    assert slow.poll() is None, slow.communicate()
    assert stack_info(e2e, "dev").get("currentOperation")
    e2e.run("cancel", "--yes", "--stack", "dev")
    out, err = slow.communicate(timeout=120)
    assert slow.returncode != 0, f"the cancelled update succeeded:\n{out}\n{err}"
    assert re.search(r"\[40[39]\]", err), err  # the server refused the cancelled update's writes
    assert_unlocked(e2e, "dev")
    assert "slow" not in by_name(e2e.resources("dev"))
    stack = e2e.stack("dev", create=False)
    changes = e2e.up(stack, spec(e2e, ["fast"]))
    assert changes.get("create") == 1, changes  # the stack resource may predate the cancel
    assert sorted(by_name(e2e.resources("dev"))) == ["fast"]
    assert [h.result for h in stack.history()] == ["succeeded", "failed"]


def test_concurrent_ups_one_fails(e2e):
    e2e.stack("dev")
    program = spec(e2e, {"slow": {"content": "x", "sleep": 8}})
    procs = [e2e.spawn("up", "dev", program) for _ in range(2)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    failed = [r for r in results if r[0] != 0]
    assert len(failed) == 1, results
    assert "Another update is currently in progress" in failed[0][2], failed[0][2]
    assert_unlocked(e2e, "dev")
    assert list(by_name(e2e.resources("dev"))) == ["slow"]
    assert [h.result for h in e2e.stack("dev", create=False).history()] == ["succeeded"]


def test_stack_reference(e2e):
    e2e.up(e2e.stack("producer"), spec(e2e, outputs={"answer": "42"},
                                       secret_outputs={"password": SECRET}))
    producer = f"{ORG}/{e2e.project}/producer"
    consumer = e2e.stack("consumer")
    e2e.up(consumer, spec(e2e, refs={"got": [producer, "answer"],
                                     "got_secret": [producer, "password"]}))
    outputs = consumer.outputs()
    assert outputs["got"].value == "42"
    assert outputs["got_secret"].secret and outputs["got_secret"].value == SECRET
    deployment = e2e.export("consumer")["deployment"]
    assert stack_outputs(deployment)["got"] == "42"
    assert SECRET not in json.dumps(deployment)
    assert stack_outputs(deployment)["got_secret"][SECRET_KEY]


def test_failed_update_keeps_last_good_state(e2e):
    from pulumi import automation as auto

    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a"]))
    good = e2e.resources("dev")
    with pytest.raises(auto.errors.CommandError) as failure:
        stack.up(program=inline_program(spec(e2e, {"a": {"content": "a-v2", "fail": True}})))
    assert "e2e provider failure requested" in str(failure.value)
    assert e2e.resources("dev") == good
    assert (e2e.files / "a.txt").read_text() == "a-v1"
    assert [h.result for h in stack.history()] == ["failed", "succeeded"]
    assert_unlocked(e2e, "dev")
    assert e2e.up(stack, spec(e2e, {"a": {"content": "a-v2"}})) == {"same": 1, "update": 1}


@pytest.mark.timeout_seconds(600)
def test_thousand_resources(e2e):
    stack = e2e.stack("dev")
    program = spec(e2e, components=1000)
    assert e2e.up(stack, program) == {"create": 1001}
    assert len(e2e.resources("dev")) == 1001
    assert e2e.up(stack, program) == {"same": 1001}
    assert len(e2e.resources("dev")) == 1001
    assert e2e.call(stack.destroy).summary.resource_changes == {"delete": 1001}
    assert e2e.resources("dev") == []
    assert stack_info(e2e, "dev")["version"] == 3


def test_state_delete_and_unprotect(e2e):
    e2e.up(e2e.stack("dev"), spec(e2e, {"guarded": {"protect": True}, "doomed": {}}))
    urns = {name: r["urn"] for name, r in by_name(e2e.resources("dev")).items()}
    assert by_name(e2e.resources("dev"))["guarded"]["protect"] is True
    e2e.fails("state", "delete", urns["guarded"], "--yes", "--stack", "dev", match="protected")
    e2e.run("state", "unprotect", urns["guarded"], "--yes", "--stack", "dev")
    assert not by_name(e2e.resources("dev"))["guarded"].get("protect")
    e2e.run("state", "delete", urns["doomed"], "--yes", "--stack", "dev")
    assert sorted(by_name(e2e.resources("dev"))) == ["guarded"]
    assert (e2e.files / "doomed.txt").exists()  # only forgotten, not deleted
    assert stack_info(e2e, "dev")["version"] == 3


def test_state_survives_server_restart(e2e):
    stack = e2e.stack("dev")
    e2e.up(stack, spec(e2e, ["a"], secret_outputs={"token": SECRET}))
    before = e2e.export("dev")
    e2e.server.restart()
    assert e2e.export("dev") == before
    assert stack.outputs()["token"].value == SECRET
    assert e2e.up(stack, spec(e2e, ["a"], secret_outputs={"token": SECRET})) == {"same": 2}

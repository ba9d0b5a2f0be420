"""The console's administration pages (issue 24, item 3) in a real browser.

An org admin (a stored user, "boss") signs in to Debian's Chromium through
Playwright and, in the browser only, adds users, creates a team, adds a member,
grants the team ``app/*`` write, changes a role, removes a user and revokes a
token. After each step the API (GET .../teams, .../members) and the real CLI
say the change happened: the new member's token runs `pulumi stack init`,
`config set` and `up` on app/dev (refused before the grant), and is refused
(401) once revoked in the browser. The audit page then shows those changes,
filtered by user and by event. A member gets 403 on every admin page. With
PULUMI_BACKEND_CONSOLE_SCREENSHOTS=docs the team page and the audit page are
saved as docs/console-admin.png and docs/console-audit.png.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ORG, TOKEN
from test_access import admin, as_user, use_project
from test_console import SCREENSHOTS_TO, Shots, browser  # noqa: F401 - a fixture

ADMIN_SHOTS = ("admin", "audit")


def api(srv, path):
    """GET ``path`` as the server's --auth-token admin; return the JSON."""
    status, body = srv.request("GET", path)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def members(srv):
    return {m["user"]["githubLogin"]: m["role"]
            for m in api(srv, f"/api/orgs/{ORG}/members")["members"]}


@pytest.mark.timeout_seconds(420)
def test_admin_console_in_a_browser(e2e, make_server, browser, tmp_path):  # noqa: F811
    srv = make_server("--auth-token", TOKEN)
    admin(srv, "user", "add", "boss", "--role", "admin")
    boss = admin(srv, "token", "create", "--user", "boss").strip()
    e2e.use_server(srv, token=boss)
    use_project(e2e, "app")

    errors = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: d.accept())  # the "Revoke this token?" confirmations
    shots = Shots(tmp_path)
    base = srv.url

    page.goto(base + "/login")
    page.fill("#token", boss)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    page.click("header >> text=Admin")
    page.wait_for_url(base + "/admin/users")

    # Users: add carol (member) and dave, whom the admin then promotes and removes.
    for login, name in (("carol", "Carol <Ops>"), ("dave", "Dave")):
        page.goto(base + "/admin/users")
        page.fill("input[name=login]", login)
        page.fill("input[name=name]", name)
        page.click("text=Add user")
        page.wait_for_url(base + f"/admin/users/{login}")
    assert members(srv) == {"admin": "admin", "boss": "admin", "carol": "member",
                            "dave": "member"}
    page.select_option("select[name=role]", "admin")
    page.click("text=Set role")
    page.wait_for_url(base + "/admin/users/dave")
    assert members(srv)["dave"] == "admin"
    out = e2e.run("org", "member", "list", "--output", "json").stdout
    assert {m["user"]["githubLogin"]: m["role"] for m in json.loads(out)["members"]}[
        "dave"] == "admin", out
    page.click("text=Remove user dave")
    page.wait_for_url(base + "/admin/users")
    assert "dave" not in members(srv)
    assert "Carol &lt;Ops&gt;" in page.content()

    # carol's token (made on the server's command line): no write on app/* yet.
    carol = admin(srv, "token", "create", "--user", "carol", "--name", "laptop").strip()
    as_user(e2e, carol)
    e2e.fails("stack", "init", "dev", match=r"needs the 'write' permission; carol has it on "
                                            r"no stack")

    # A member sees no Admin link and gets 403 on the admin pages.
    other = browser.new_context()
    member_page = other.new_page()
    member_page.goto(base + "/login")
    member_page.fill("#token", carol)
    member_page.click("button[type=submit]")
    member_page.wait_for_url(base + "/")
    assert member_page.locator("header >> text=Admin").count() == 0
    for path in ("/admin/users", "/admin/teams", "/admin/tokens", "/admin/audit"):
        assert member_page.goto(base + path).status == 403, path
    other.close()

    # Teams: create "apps", add carol, grant app/* write.
    page.click(".tabs >> text=Teams")
    page.wait_for_url(base + "/admin/teams")
    page.fill("input[name=name]", "apps")
    page.fill("input[name=display_name]", "Application team")
    page.fill("input[name=description]", "Runs the app/* stacks")
    page.click("text=Create team")
    page.wait_for_url(base + "/admin/teams/apps")
    page.select_option("select[name=login]", "carol")
    page.click("text=Add member")
    page.wait_for_url(base + "/admin/teams/apps")
    page.fill("input[name=pattern]", "app/*")
    page.select_option("select[name=permission]", "write")
    page.click("button >> text=Grant")
    page.wait_for_url(base + "/admin/teams/apps")
    assert page.locator("tr.grant-row").inner_text().split("\t")[:2] == ["app/*", "write"]
    assert page.locator("tr.member-row").count() == 1
    shots.take(page, "admin")
    team = api(srv, f"/api/orgs/{ORG}/teams/apps")
    assert [m["githubLogin"] for m in team["members"]] == ["carol"], team
    assert team["stacks"] == [{"projectName": "app", "stackName": "*", "permission": 102}]

    # Now carol's token writes app/dev with the real CLI.
    e2e.run("stack", "init", "dev")
    e2e.run("config", "set", "greeting", "hello", "--stack", "dev")
    changes = e2e.up(e2e.stack("dev", create=False), {"outputs": {"greeting": "hello"}})
    assert changes.get("create") == 1, changes
    history = json.loads(e2e.run("stack", "history", "--stack", "dev", "--json").stdout)
    assert history[0]["environment"]["requestedBy"] == "carol"
    use_project(e2e, "ops")
    e2e.fails("stack", "init", "prod", match=r"needs the 'write' permission on stack ops/prod")
    use_project(e2e, "app")

    # Tokens: revoke carol's in the browser; the CLI is refused from then on.
    page.click(".tabs >> text=Tokens")
    page.wait_for_url(base + "/admin/tokens")
    row = page.locator("tr.token-row", has_text="laptop")
    assert "carol" in row.inner_text()
    row.locator("button >> text=Revoke").click()
    page.wait_for_url(base + "/admin/tokens")
    assert page.locator("tr.token-row", has_text="laptop").count() == 0
    e2e.fails("stack", "ls", match=r"Unauthorized|401|requires logging in")
    assert srv.request("GET", "/api/user")[0] == 200  # the admin's token still works

    # The audit log: boss's changes, filtered by user, then by event.
    page.click(".tabs >> text=Audit log")
    page.wait_for_url(base + "/admin/audit")
    page.fill("input[name=user]", "boss")
    page.click("button >> text=Filter")
    page.wait_for_url(re.compile(r".*/admin/audit\?.*user=boss.*"))
    rows = page.locator("tr.audit-row").all_inner_texts()
    events = [re.split(r"\t", r)[2].strip() for r in rows]
    for event in ("member_added", "member_role_changed", "member_removed", "team_created",
                  "team_member_added", "stack_permission_changed", "token_revoked"):
        assert event in events, (event, events)
    assert all("\tboss" in r for r in rows), rows
    shots.take(page, "audit")
    page.fill("input[name=event]", "token_revoked")
    page.click("button >> text=Filter")
    page.wait_for_url(re.compile(r".*event=token_revoked.*"))
    rows = page.locator("tr.audit-row").all_inner_texts()
    assert len(rows) == 1 and "personal:carol" in rows[0], rows
    page.fill("input[name=user]", "")
    page.fill("input[name=event]", "")
    page.fill("input[name=stack]", "app/dev")
    page.click("button >> text=Filter")
    page.wait_for_url(re.compile(r".*stack=app%2Fdev.*"))
    events = [r.split("\t")[2].strip() for r in page.locator("tr.audit-row").all_inner_texts()]
    assert "stack_created" in events and "update_completed" in events, events

    assert errors == [], errors  # no CSP violation or script error on any page
    context.close()
    if SCREENSHOTS_TO:
        Path(SCREENSHOTS_TO).mkdir(parents=True, exist_ok=True)
        for name in ADMIN_SHOTS:
            shutil.copy(tmp_path / f"console-{name}.png",
                        Path(SCREENSHOTS_TO) / f"console-{name}.png")

"""Single sign-on to the console through a real OIDC provider, in a real browser.

The provider is ``oidc-provider-mock`` (pinned in setup.sh), started as a
subprocess on 127.0.0.1 with client registration required; the test registers
the server's exact redirect URI and sets each person's claims (groups too)
through the mock's ``PUT /users/{sub}``, then signs in on the mock's form.
Debian's Chromium through Playwright, as in test_console.py. The sign-in page
with its button is saved as docs/console-sign-in.png when
PULUMI_BACKEND_CONSOLE_SCREENSHOTS=docs (test_console.py's variable).
"""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import TOKEN, unavailable
from test_console import SCREENSHOTS_TO, Shots, browser  # noqa: F401 (a fixture)

from conftest import Server  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, body=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode()
                                 if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data = resp.read()
        return json.loads(data) if data else None


@pytest.fixture
def provider(tmp_path):
    try:
        import oidc_provider_mock  # noqa: F401
    except ImportError:
        unavailable("oidc-provider-mock is not installed (see e2e/setup.sh)")
    port = free_port()
    log = open(tmp_path / "provider.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "oidc_provider_mock", "--port", str(port), "--host", "127.0.0.1",
         "--require-registration=true", "--require-nonce=true"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                call("GET", url + "/.well-known/openid-configuration")
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the OIDC provider did not start: "
                        + (tmp_path / "provider.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def set_person(provider, sub, email, groups):
    call("PUT", f"{provider}/users/{urllib.parse.quote(sub)}",
         {"email": email, "email_verified": True, "preferred_username": sub,
          "name": sub.title(), "groups": groups})


@pytest.mark.timeout_seconds(300)
def test_single_sign_on_in_a_browser(provider, browser, tmp_path):  # noqa: F811
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client = call("POST", provider + "/oauth2/clients",
                  {"redirect_uris": [base + "/sso/callback"]})
    (tmp_path / "client-secret").write_text(client["client_secret"])
    config = tmp_path / "sso.json"
    config.write_text(json.dumps({
        "issuer": provider, "clientId": client["client_id"],
        "clientSecretFile": "client-secret", "usernameClaim": "preferred_username",
        "groupsClaim": "groups", "allowedEmailDomains": ["example.com"],
        "teams": [{"group": "eng/devs", "team": "devs"}, {"group": "eng/*/ops", "team": "ops"}],
        "adminGroups": ["admins"], "sessionLifetime": "8h", "displayName": "Example IdP"}))
    (tmp_path / "server").mkdir()
    srv = Server(tmp_path / "server", ["--auth-token", TOKEN, "--sso-config", str(config)])
    srv.port = port
    srv.start()
    try:
        run_scenario(srv, base, provider, browser, tmp_path)
    finally:
        srv.stop()


def run_scenario(srv, base, provider, browser, tmp_path):  # noqa: F811
    def api(method, path, body=None):
        status, data = srv.request(method, "/api" + path,
                                   json.dumps(body).encode() if body is not None else None)
        assert status in (200, 201, 204), f"{method} {path}: {status} {data[:300]!r}"
        return json.loads(data) if data else None

    # Stacks and the teams' grants, made through the API beforehand.
    for project, stack in (("app", "dev"), ("app", "prod"), ("other", "misc")):
        api("POST", f"/stacks/organization/{project}", {"stackName": stack})
    for team, stack in (("devs", "dev"), ("ops", "prod")):
        api("POST", "/orgs/organization/teams/pulumi", {"name": team})
        api("PATCH", f"/orgs/organization/teams/{team}", {"addStackPermission": {
            "projectName": "app", "stackName": stack, "permission": 101}})
    api("POST", "/orgs/organization/teams/pulumi", {"name": "unmapped"})

    errors = []
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    shots = Shots(tmp_path)

    def sign_in(sub, expect_home=True):
        page.goto(base + "/login")
        page.click("#sso")
        page.wait_for_url(provider + "/oauth2/authorize**")
        page.get_by_placeholder("sub").fill(sub)
        page.get_by_role("button", name="Authorize").click()
        if expect_home:
            page.wait_for_url(base + "/")

    def stacks_seen():
        page.goto(base + "/")
        return sorted(page.locator("table a").all_inner_texts())

    def teams_of(login):
        return sorted(t["name"] for t in api("GET", "/orgs/organization/teams")["teams"]
                      if any(m["githubLogin"] == login for m in api(
                          "GET", f"/orgs/organization/teams/{t['name']}")["members"]))

    def audit():
        return json.dumps(api("GET", "/orgs/organization/auditlogs"))

    # The sign-in page offers the provider beside the token form.
    page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    assert page.inner_text("#sso") == "Sign in with Example IdP"
    assert page.locator("#token").count() == 1
    shots.take(page, "sign-in", full_page=False)
    if SCREENSHOTS_TO:
        shutil.copy(tmp_path / "console-sign-in.png", f"{SCREENSHOTS_TO}/console-sign-in.png")

    # First sign-in: alice is created, in the teams her groups map to.
    set_person(provider, "alice", "alice@example.com", ["eng/devs", "eng/x/ops", "other"])
    sign_in("alice")
    cookie = next(c for c in context.cookies() if c["name"] == "pb_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    sso_cookie = next(c for c in context.cookies() if c["name"] == "pb_sso")
    assert sso_cookie["httpOnly"] and sso_cookie["sameSite"] == "Lax"
    assert "alice" in page.inner_text("header")
    assert stacks_seen() == ["dev", "prod"]
    member = next(m for m in api("GET", "/orgs/organization/members")["members"]
                  if m["user"]["githubLogin"] == "alice")
    assert member["role"] == "member"
    assert teams_of("alice") == ["devs", "ops"]
    api("PATCH", "/orgs/organization/teams/unmapped", {"memberAction": "add",
                                                       "member": "alice"})
    log = audit()
    assert "created at first single sign-on" in log and "group eng/x/ops" in log

    # The group is removed at the provider: the next sign-in removes the team,
    # and leaves a team the mapping never names alone.
    set_person(provider, "alice", "alice@example.com", ["eng/devs"])
    context.clear_cookies()
    sign_in("alice")
    assert stacks_seen() == ["dev"]
    assert teams_of("alice") == ["devs", "unmapped"]
    assert "in no group mapped to this team" in audit()

    # An email outside the allowed domains is refused.
    set_person(provider, "mallory", "mallory@evil.test", ["eng/devs"])
    context.clear_cookies()
    sign_in("mallory", expect_home=False)
    page.wait_for_url(base + "/sso/callback**")
    assert "email domain 'evil.test' is not allowed" in page.inner_text(".err")
    assert all(m["user"]["githubLogin"] != "mallory"
               for m in api("GET", "/orgs/organization/members")["members"])

    # A tampered state, a replayed callback and a replayed code are refused and audited.
    def callback_url(sub):
        """Go through the provider, and return the callback URL without opening it."""
        page.goto(base + "/login")
        page.click("#sso")
        page.wait_for_url(provider + "/oauth2/authorize**")
        # The form's POST, without following its redirect (a browser would).
        resp = page.request.post(page.url, form={"sub": sub}, max_redirects=0)
        assert resp.status in (302, 303), resp.status
        return resp.headers["location"]

    context.clear_cookies()
    url = callback_url("alice")
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    page.goto(url.replace("state=" + urllib.parse.quote(query["state"]), "state=tampered"))
    assert "state does not match" in page.inner_text(".err")
    assert "state does not match" in audit()

    context.clear_cookies()
    url = callback_url("alice")
    page.goto(url)
    page.wait_for_url(base + "/")
    page.goto(url)  # the same callback again
    assert "no sign-in in flight" in page.inner_text(".err")
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["code"]
    fresh = callback_url("alice")  # a new sign-in, with the old code
    fresh_query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(fresh).query))
    page.goto(base + "/sso/callback?" + urllib.parse.urlencode(
        {"code": code, "state": fresh_query["state"]}))
    assert "refused: invalid_grant" in page.inner_text(".err")
    log = audit()
    assert "no sign-in in flight" in log and "invalid_grant" in log
    assert code not in log and query["state"] not in log  # never a code or a state

    # next after sign-in is a local path only.
    context.clear_cookies()
    page.goto(base + "/sso/start?next=https://evil.test/")
    page.wait_for_url(provider + "/oauth2/authorize**")
    page.get_by_placeholder("sub").fill("alice")
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(base + "/")
    context.clear_cookies()
    page.goto(base + "/stacks/app/dev")
    page.click("#sso")
    page.wait_for_url(provider + "/oauth2/authorize**")
    page.get_by_placeholder("sub").fill("alice")
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(base + "/stacks/app/dev")
    assert errors == []

"""Teams and access with the real CLI: users, stack permissions, revocation, OIDC login.

Users, teams and tokens are made with the server's own commands
(`pulumi_backend.py user/team/token ... --db DB`) while the server runs; the
CLI then works as each user through PULUMI_ACCESS_TOKEN or a stored login.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ORG, TOKEN
from server_process import SERVER_SCRIPT

sys.path.insert(0, str(SERVER_SCRIPT.parent))
from test_pulumi_backend import JWTKey  # noqa: E402  (throwaway keys via the openssl CLI)

FORBIDDEN = r"Forbidden: this needs the '{}' permission on stack {}"


def admin(srv, *args):
    """Run `pulumi_backend.py ARGS --db DB` beside the running server; return its stdout."""
    proc = subprocess.run([sys.executable, str(SERVER_SCRIPT), *args, "--db", str(srv.db)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def use_project(e2e, name):
    """Point the sandbox at project ``name`` (its Pulumi.yaml and stack paths)."""
    e2e.project = name
    (e2e.work / "Pulumi.yaml").write_text(f"name: {name}\nruntime: python\n")


def as_user(e2e, token):
    e2e.env["PULUMI_ACCESS_TOKEN"] = token


def audit_events(srv):
    return [json.loads(line) for line in admin(srv, "audit").splitlines()]


def test_three_users_and_their_permissions(e2e, make_server):
    from pulumi import automation as auto

    srv = make_server("--auth-token", TOKEN)
    admin(srv, "user", "add", "boss", "--role", "admin")
    admin(srv, "user", "add", "viewer")
    admin(srv, "user", "add", "member")
    for team, login, pattern, perm in (("viewers", "viewer", "*", "read"),
                                       ("devs", "member", "app/*", "write")):
        admin(srv, "team", "create", team)
        admin(srv, "team", "add-member", team, login)
        admin(srv, "team", "grant", team, pattern, perm)
    tokens = {u: admin(srv, "token", "create", "--user", u).strip()
              for u in ("boss", "viewer", "member")}
    e2e.use_server(srv, token=tokens["boss"])
    for user, token in tokens.items():
        as_user(e2e, token)
        assert f"User: {user}\n" in e2e.run("whoami", "-v").stdout

    # The admin makes app/dev (with a secret) and ops/prod.
    as_user(e2e, tokens["boss"])
    use_project(e2e, "ops")
    e2e.up(e2e.stack("prod"), {"outputs": {"k": "v"}})
    use_project(e2e, "app")
    dev = e2e.stack("dev")
    e2e.run("config", "set", "--secret", "--stack", "dev", "dbpass", "hunter2")
    e2e.up(dev, {"secret_outputs": {"token": "s3cret-out"}})

    # The viewer reads everything and changes nothing.
    as_user(e2e, tokens["viewer"])
    listed = e2e.run("stack", "ls", "--all").stdout
    assert re.search(r"^dev\*? ", listed, re.M) and "organization/ops/prod" in listed
    exported = e2e.run("stack", "export", "--stack", "dev").stdout
    assert "hunter2" not in exported and "s3cret-out" not in exported
    assert "requestedBy: boss" in e2e.run("stack", "history", "--stack", "dev").stdout
    assert "[secret]" in e2e.run("stack", "output", "--stack", "dev").stdout
    refusal = FORBIDDEN.format("write", "app/dev") + "; viewer has 'read'"
    with pytest.raises(auto.errors.CommandError, match=re.escape(refusal)):
        e2e.stack("dev", create=False).up(program=lambda: None)  # a workspace as the viewer
    e2e.fails("config", "set", "--secret", "--stack", "dev", "k", "v", match=refusal)
    e2e.fails("stack", "output", "--stack", "dev", "--show-secrets", match=refusal)
    e2e.fails("stack", "rm", "--yes", "dev",
              match=FORBIDDEN.format("admin", "app/dev") + "; viewer has 'read'")

    # The member writes in app/* only, and cannot delete.
    as_user(e2e, tokens["member"])
    e2e.up(e2e.stack("dev", create=False), {"secret_outputs": {"token": "s3cret-2"}})
    e2e.run("stack", "init", "feature")
    e2e.fails("stack", "rm", "--yes", "feature",
              match=FORBIDDEN.format("admin", "app/feature") + "; member has 'write'")
    use_project(e2e, "ops")
    e2e.fails("stack", "init", "other", match=FORBIDDEN.format("write", "ops/other"))
    with pytest.raises(auto.errors.CommandError,
                       match=FORBIDDEN.format("(read|write)", "ops/prod")):
        e2e.stack("prod", create=False).up(program=lambda: None)
    assert "organization/ops/prod" not in e2e.run("stack", "ls", "--all").stdout

    # The admin deletes; history says who ran each update.
    use_project(e2e, "app")
    as_user(e2e, tokens["boss"])
    e2e.run("stack", "rm", "--yes", "feature")
    history = json.loads(e2e.run("stack", "history", "--stack", "dev", "--json").stdout)
    assert [h["environment"]["requestedBy"] for h in history] == ["member", "boss"]

    # A revoked token: the member's stored login is refused at the next command.
    as_user(e2e, tokens["member"])
    e2e.run("login", srv.url)
    del e2e.env["PULUMI_ACCESS_TOKEN"]
    assert "User: member" in e2e.run("whoami", "-v").stdout
    member_id = [line.split("\t")[0] for line in admin(srv, "token", "list").splitlines()
                 if "personal:member" in line][0]
    admin(srv, "token", "revoke", member_id)
    e2e.fails("stack", "ls", match=r"requires logging in")

    # A team token names its team.
    as_user(e2e, admin(srv, "token", "create", "--team", "devs", "--name", "ci").strip())
    who = e2e.run("whoami", "-v").stdout
    assert "Token type: team: devs" in who and "Token name: ci" in who

    events = audit_events(srv)
    kinds = {e["event"] for e in events}
    assert kinds >= {"user_login", "stack_created", "update_started", "update_completed",
                     "secrets_decrypted", "stack_exported", "permission_denied",
                     "stack_deleted", "token_revoked", "login_failure"}
    denied = [e for e in events if e["event"] == "permission_denied"]
    assert {e["actor"] for e in denied} == {"viewer", "member"}
    text = json.dumps(events)
    for secret in [*tokens.values(), "hunter2", "s3cret-out", "s3cret-2"]:
        assert secret not in text


ISSUER = "https://gitlab.example.test"


def claims(**over):
    now = int(time.time())
    out = {"iss": ISSUER, "aud": "pulumi-backend", "sub": "project_path:infra/app:ref:main",
           "project_path": "infra/app", "iat": now, "nbf": now, "exp": now + 600}
    out.update(over)
    return out


def test_oidc_login(e2e, make_server, tmp_path):
    rsa, ec = JWTKey(tmp_path, "RSA", "gitlab-1"), JWTKey(tmp_path, "EC", "gitlab-ec")
    stranger = JWTKey(tmp_path, "RSA", "gitlab-1")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [rsa.jwk, ec.jwk]}))
    (tmp_path / "issuers.json").write_text(json.dumps({"issuers": [{
        "issuer": ISSUER, "audience": "pulumi-backend", "jwksFile": "jwks.json",
        "maxExpiration": "1h",
        "rules": [{"claims": {"project_path": "infra/*"}, "team": "ci"},
                  {"claims": {"sub": "deploy-bot"}, "org": "member"}]}]}))
    srv = make_server("--auth-token", TOKEN, "--oidc-issuers", str(tmp_path / "issuers.json"))
    admin(srv, "team", "create", "ci")
    admin(srv, "team", "grant", "ci", "*", "write")
    e2e.use_server(srv)
    e2e.run("stack", "init", "dev")
    del e2e.env["PULUMI_ACCESS_TOKEN"]  # the CLI refuses to exchange with one set

    def login(jwt, *flags):
        return e2e.run("login", "--oidc-token", jwt, "--oidc-org", ORG, *flags, srv.url,
                       check=False)

    proc = login(rsa.jwt(claims()), "--oidc-team", "ci", "--oidc-expiration", "30m")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    who = e2e.run("whoami", "-v").stdout
    assert "User: ci" in who and "Token type: team: ci" in who
    assert re.search(r"^dev\b", e2e.run("stack", "ls").stdout, re.M)
    proc = login(ec.jwt(claims(sub="deploy-bot", project_path="tools/bot")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Token type: organization: organization" in e2e.run("whoami", "-v").stdout

    now = int(time.time())
    refused = {"wrong audience": rsa.jwt(claims(aud="someone-else")),
               "unknown issuer": rsa.jwt(claims(iss="https://evil.test")),
               "expired": rsa.jwt(claims(exp=now - 600)),
               "bad signature": stranger.jwt(claims()),
               "unknown key id": rsa.jwt(claims(), kid="rotated-away")}
    for check, jwt in refused.items():
        proc = login(jwt, "--oidc-team", "ci")
        assert proc.returncode != 0, check
        assert "the OIDC token exchange was refused" in proc.stdout + proc.stderr, check
    failures = [e["description"] for e in audit_events(srv)
                if e["event"] == "token_exchange" and e["outcome"] == "failure"]
    assert len(failures) == len(refused)
    for check, failure in zip(refused, failures):
        assert check in failure
    successes = [e for e in audit_events(srv)
                 if e["event"] == "token_exchange" and e["outcome"] == "success"]
    assert [e["target"] for e in successes] == ["team:ci", f"org:{ORG}"]
    text = json.dumps(audit_events(srv)) + Path(srv.log).read_text()
    for jwt in refused.values():
        assert jwt.split(".")[2] not in text

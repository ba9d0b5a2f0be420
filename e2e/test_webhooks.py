"""Webhooks with the real CLI: `pulumi org webhook` and `pulumi stack webhook`.

A receiver (http.server on 127.0.0.1, which the server may reach through
--webhook-allow) records what the server posts; the tests check the event,
the Pulumi-Webhook-* headers and the HMAC signature, retries of a receiver
that is down (also across a server restart), redeliver and ping, and that a
receiver that hangs does not slow an update. Newest CLI only.
"""

import hashlib
import hmac
import http.server
import json
import re
import socket
import threading
import time

import pytest

from conftest import TOKEN, wait_for


class Receiver:
    """Records ``(headers, body)`` of each POST; answers ``status`` after ``delay`` s."""

    def __init__(self, port=0, status=200, delay=0.0):
        self.status, self.delay, self.got = status, delay, []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(receiver.delay)
                try:
                    self.send_response(receiver.status)
                    self.send_header("Content-Length", "8")
                    self.end_headers()
                    self.wfile.write(b"received")
                except OSError:
                    pass  # the server gave up waiting

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self):
        return [(h["pulumi-webhook-kind"], json.loads(b)) for h, b in self.got]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(**kw):
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def free_port():
    """A port nothing listens on (a receiver that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hook_server(make_server, *delays):
    return make_server("--auth-token", TOKEN, "--webhook-allow", "127.0.0.1/32",
                       "--webhook-retry-delays", ",".join(delays or ("1s", "1s")),
                       "--shutdown-timeout", "3")


def files(e2e, fail=False):
    import e2e_programs

    return e2e_programs.build({"dir": str(e2e.files), "files": {
        "a": {"content": "a-v2" if fail else "a-v1", "fail": fail}}})


def created_name(stdout):
    match = re.search(r'Created webhook "([0-9a-f]{8})"', stdout)
    assert match, stdout
    return match[1]


def verify(secret, headers, body):
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["pulumi-webhook-signature"], expected)


def test_org_and_stack_webhooks_with_the_cli(e2e, make_server, receivers):
    from pulumi import automation as auto

    e2e.use_server(hook_server(make_server))
    org_rx, stack_rx = receivers(), receivers()
    out = e2e.run("org", "webhook", "new", "--name", "all-stacks", "--url", org_rx.url,
                  "--group", "stacks", "--secret", "org-secret", "--yes").stdout
    org_hook = created_name(out)
    e2e.fails("org", "webhook", "new", "--name", "drift", "--url", org_rx.url,
              "--event", "drift_detected", "--yes",
              match="cannot produce 'drift_detected' events")
    e2e.fails("org", "webhook", "new", "--name", "meta", "--url",
              "http://169.254.169.254/latest", "--yes", match="link-local or cloud metadata")

    stack = e2e.stack("dev")  # stack_created, to the org's webhook
    out = e2e.run("stack", "webhook", "new", "--stack", "dev", "--name", "updates", "--url",
                  stack_rx.url, "--event", "update_succeeded", "--event", "update_failed",
                  "--secret", "stack-secret", "--yes").stdout
    stack_hook = re.search(r"ID:\s+([0-9a-f]{8})", out)[1]
    assert re.search(r"Name:\s+updates", out) and re.search(r"Has secret:\s+yes", out), out
    assert "stack-secret" not in out
    e2e.fails("stack", "webhook", "new", "--stack", "dev", "--name", "x", "--url",
              stack_rx.url, "--group", "deployments", "--yes",
              match="cannot produce the events of group 'deployments'")

    e2e.up(stack, {"dir": str(e2e.files), "files": {"a": {"content": "a-v1"}}})
    with pytest.raises(auto.errors.CommandError):
        stack.up(program=files(e2e, fail=True))
    wait_for(lambda: len(stack_rx.got) >= 2, "the stack webhook's two deliveries", timeout=30)
    wait_for(lambda: len(org_rx.got) >= 3, "the org webhook's deliveries", timeout=30)
    assert [(k, p["kind"], p["result"]) for k, p in stack_rx.events()] == [
        ("stack_update", "update", "succeeded"), ("stack_update", "update", "failed")]
    assert stack_rx.events()[0][1]["resourceChanges"] == {"create": 2}
    assert stack_rx.events()[0][1]["updateUrl"].startswith(e2e.server.url + "/stacks/")
    for headers, body in stack_rx.got:
        verify("stack-secret", headers, body)
        assert re.fullmatch(r"[0-9a-f]{32}", headers["pulumi-webhook-id"])
    for headers, body in org_rx.got:
        verify("org-secret", headers, body)
    assert org_rx.events()[0] == ("stack", {
        "user": {"name": "admin", "githubLogin": "admin", "avatarUrl": ""},
        "organization": {"name": "organization", "githubLogin": "organization",
                         "avatarUrl": ""},
        "projectName": e2e.project, "stackName": "dev", "action": "created"})
    assert sorted(p.get("result", "") for _, p in org_rx.events()) == ["", "failed",
                                                                       "succeeded"]

    out = e2e.run("stack", "webhook", "list", "--stack", "dev").stdout
    assert stack_hook in out and "1 webhook(s)" in out, out
    out = e2e.run("stack", "webhook", "get", stack_hook, "--stack", "dev").stdout
    assert re.search(r"Events:\s+update_succeeded, update_failed", out), out
    out = e2e.run("stack", "webhook", "delivery", "list", stack_hook, "--stack", "dev").stdout
    assert "update_succeeded" in out and "update_failed" in out and "2 delivery(ies)" in out
    deliveries = json.loads(e2e.run("stack", "webhook", "delivery", "list", stack_hook,
                                    "--stack", "dev", "--output", "json").stdout)
    assert [(d["kind"], d["responseCode"]) for d in deliveries["deliveries"]] == [
        ("update_failed", 200), ("update_succeeded", 200)]
    event = deliveries["deliveries"][1]["id"]
    out = e2e.run("stack", "webhook", "delivery", "redeliver", stack_hook, event,
                  "--stack", "dev").stdout
    assert re.search(r"Kind:\s+update_succeeded", out) and \
        re.search(r"Response code:\s+200", out), out
    assert stack_rx.got[-1][1] == stack_rx.got[0][1]  # the same payload, signed again
    verify("stack-secret", *stack_rx.got[-1])
    out = e2e.run("stack", "webhook", "ping", stack_hook, "--stack", "dev").stdout
    assert re.search(r"Kind:\s+ping", out) and re.search(r"Response code:\s+200", out), out
    assert stack_rx.got[-1][0]["pulumi-webhook-kind"] == "ping"
    out = e2e.run("stack", "webhook", "edit", stack_hook, "--stack", "dev",
                  "--remove-event", "update_failed", "--secret", "").stdout
    assert re.search(r"Has secret:\s+no", out) and "update_failed" not in out, out
    out = e2e.run("stack", "webhook", "remove", stack_hook, "--stack", "dev", "--yes").stdout
    assert f"Webhook '{stack_hook}' has been removed." in out

    out = e2e.run("org", "webhook", "list").stdout
    assert org_hook in out and "1 webhook(s)" in out, out
    out = e2e.run("org", "webhook", "delivery", "list", org_hook).stdout
    assert "stack_created" in out and "3 delivery(ies)" in out, out
    out = e2e.run("org", "webhook", "ping", org_hook).stdout
    assert re.search(r"Response code:\s+200", out), out
    out = e2e.run("org", "webhook", "edit", org_hook, "--active=false").stdout
    assert f'Updated webhook "{org_hook}"' in out
    e2e.run("stack", "rm", "dev", "--yes", "--force")
    time.sleep(1.5)
    assert "stack_deleted" not in [p.get("action") for _, p in org_rx.events()]  # inactive
    out = e2e.run("org", "webhook", "remove", org_hook, "--yes").stdout
    assert f"Webhook '{org_hook}' has been removed." in out


def test_webhook_retries_survive_a_restart_and_give_up(e2e, make_server, receivers):
    srv = hook_server(make_server, "2s", "5s")
    e2e.use_server(srv)
    later, never = free_port(), free_port()  # two receivers that are down
    stack = e2e.stack("dev")
    for name, port in (("later", later), ("never", never)):
        e2e.run("stack", "webhook", "new", "--stack", "dev", "--name", name, "--url",
                f"http://127.0.0.1:{port}/hook", "--yes")
    hooks = {h["displayName"]: h["name"] for h in srv.get(e2e.path("dev") + "/hooks")}

    def deliveries(name):
        return srv.get(f"{e2e.path('dev')}/hooks/{hooks[name]}/deliveries")

    e2e.up(stack, {"dir": str(e2e.files), "files": {"a": {"content": "a-v1"}}})
    wait_for(lambda: "attempt 1 of 3 failed" in deliveries("later")[0]["responseBody"],
             "the first failed attempt", timeout=30)
    srv.stop()  # the retry is due while the server is down ...
    rx = receivers(port=later)
    time.sleep(1.5)
    srv.start()  # ... and sent after it starts again
    wait_for(lambda: rx.got, "the retried delivery after the restart", timeout=30)
    assert [(k, p["result"]) for k, p in rx.events()] == [("stack_update", "succeeded")]
    wait_for(lambda: deliveries("later")[0]["responseCode"] == 200, "the recorded success")

    wait_for(lambda: "failed after 3 attempt(s)" in deliveries("never")[0]["responseBody"],
             "the receiver that stays down to be given up on", timeout=30)
    out = json.loads(e2e.run("stack", "webhook", "delivery", "list", hooks["never"],
                             "--stack", "dev", "--output", "json").stdout)
    failed = out["deliveries"][0]
    assert failed["responseCode"] == 0 and failed["kind"] == "update_succeeded"
    assert "Connection refused" in failed["responseBody"], failed
    up_again = receivers(port=never)
    out = e2e.run("stack", "webhook", "delivery", "redeliver", hooks["never"], failed["id"],
                  "--stack", "dev").stdout
    assert re.search(r"Response code:\s+200", out), out
    assert up_again.events()[0][1]["result"] == "succeeded"


def test_a_hanging_receiver_does_not_slow_an_update(e2e, make_server, receivers):
    e2e.use_server(hook_server(make_server))
    stack = e2e.stack("dev")
    program = {"dir": str(e2e.files), "files": {"a": {"content": "a-v1"}}}
    e2e.up(stack, program)  # the first up pays for the plugin's start-up
    t0 = time.monotonic()
    e2e.up(stack, program)
    without = time.monotonic() - t0
    hanging = receivers(delay=60)
    e2e.run("stack", "webhook", "new", "--stack", "dev", "--name", "slow", "--url",
            hanging.url, "--yes")
    t0 = time.monotonic()
    e2e.up(stack, program)
    e2e.up(stack, program)
    with_hook = (time.monotonic() - t0) / 2
    assert len(hanging.got) >= 1  # it was called, and held the connection
    assert with_hook < without + 5, (without, with_hook)

"""`pulumi login` in a browser, with the real CLI and Debian's Chromium (issue 24).

The CLI offers the browser only in a terminal, so `pulumi login URL` runs on a
pseudo-terminal and the test presses Enter at its prompt. The CLI opens the
console's /cli-login through xdg-open, which runs $BROWSER: a small script that
writes the URL to a file. The test then plays the browser: Playwright, signed in
to the console with the person's token (or signing in when the page asks, which
comes back to it), opens that URL, confirms, and follows the redirect to the CLI's
localhost port, which sends it on to /welcome/cli. The CLI
must end logged in as that person, with a token described as the CLI described it,
and work (a stack, a config value and an `up`).

Two ways for the CLI to find the console:
- ``PULUMI_CONSOLE_DOMAIN`` (one server name for everything);
- the ``api.``/``app.`` host names of one server (``--console-host``): the CLI
  derives ``app.example.test`` from ``api.example.test`` itself. Nothing on the
  machine is changed to reach those names: the CLI goes through HTTP_PROXY (HostProxy,
  a small forward proxy that sends each name to its server, Host kept), the browser
  through --host-resolver-rules.

The api./app. names also give `pulumi stack migrate` two servers it can tell apart
(it compares the console addresses the CLI derives, empty for an IP address).
"""

import http.client
import http.server
import json
import os
import pty
import re
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import TOKEN, unavailable, wait_for
from test_access import admin, audit_events, use_project
from test_console import CHROMIUM, CHROMIUM_ARGS

PERSON = "alice"
_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "te",
               "trailer", "upgrade", "proxy-authorization"}


class HostProxy:
    """A forward proxy for plain-http URLs (what HTTP_PROXY sees for http://NAME:PORT):
    each request goes to the 127.0.0.1 port of its host name in ``ports``, with its
    Host header kept; ``seen`` counts the requests per name."""

    def __init__(self, ports):
        proxy = self
        self.ports, self.seen = ports, {name: 0 for name in ports}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                target = urllib.parse.urlsplit(self.path)
                port = proxy.ports.get(target.hostname or "")
                if port is None:
                    self.send_error(502, f"no server for {target.hostname}")
                    return
                proxy.seen[target.hostname] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                try:
                    path = target.path + ("?" + target.query if target.query else "")
                    conn.request(self.command, path or "/", body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that went away: nothing to tell

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def proxied(env, proxy):
    """``env`` sending the CLI's (and its plugins') non-loopback http through ``proxy``."""
    loopback = "localhost,127.0.0.1,::1"
    return {**env, "HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": loopback,
            "no_proxy": loopback}


class Terminal:
    """A process on a pseudo-terminal; ``output`` is all it wrote so far."""

    def __init__(self, argv, env, cwd):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True, close_fds=True)
        os.close(slave)
        self.master, self.chunks = master, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the process closed the terminal
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def output(self):
        text = b"".join(self.chunks).decode(errors="replace")
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)

    def type(self, text):
        os.write(self.master, text)

    def wait(self, timeout):
        """The exit code, or None when it had to be killed after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(5)
            os.close(self.master)


@pytest.fixture
def chromium():
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium; see e2e/setup.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (see e2e/setup.sh)")
    with sync_playwright() as p:
        launched = []

        def launch(*extra_args):
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args))
            launched.append(b)
            return b

        try:
            yield launch
        finally:
            for b in launched:
                b.close()


def person_on(srv, project):
    """PERSON, a member of a team that may write ``project/*``; return their token."""
    admin(srv, "user", "add", PERSON, "--name", "Alice Example")
    admin(srv, "team", "create", "devs")
    admin(srv, "team", "add-member", "devs", PERSON)
    admin(srv, "team", "grant", "devs", f"{project}/*", "write")
    return admin(srv, "token", "create", "--user", PERSON).strip()


def sign_in(page, person_token):
    page.fill("#token", person_token)
    page.click("button[type=submit]")


def browser_login(e2e, browser, console, api_url, person_token, env, signed_in=True):
    """Run `pulumi login api_url` on a terminal and confirm in the browser, signed in to
    ``console`` before (``signed_in``) or when the CLI's page asks; return the CLI's output."""
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    if signed_in:
        page.goto(console + "/login")
        sign_in(page, person_token)
        page.wait_for_url(console + "/")

    opened = Path(e2e.env["HOME"]) / "opened-url"
    opener = Path(e2e.env["HOME"]) / "browser.sh"
    opener.write_text('#!/bin/sh\nprintf "%s" "$1" > "$OPENED_URL.tmp" && '
                      'mv "$OPENED_URL.tmp" "$OPENED_URL"\n')
    opener.chmod(0o755)
    env = {**env, "BROWSER": str(opener), "OPENED_URL": str(opened), "TERM": "xterm"}
    env.pop("PULUMI_ACCESS_TOKEN", None)
    term = Terminal([str(e2e.cli.binary), "login", api_url, "--color", "never"], env, e2e.work)
    try:
        # The prompt is a bubbletea widget: it reads keys once it has drawn itself, and
        # may drop what came before (on a loaded machine, seconds later): Enter again
        # until the CLI opens the browser.
        wait_for(lambda: "paste an access token" in term.output or term.proc.poll() is not None,
                 "the CLI's login prompt", timeout=90)
        deadline = time.monotonic() + 90
        while not opened.exists() and term.proc.poll() is None and time.monotonic() < deadline:
            if "Waiting for login" not in term.output:
                term.type(b"\r")  # Enter: log in with the browser
            time.sleep(2)
        assert opened.exists(), term.output
        url = opened.read_text()
        assert url.startswith(console + "/cli-login?"), url
        assert re.search(r"cliSessionPort=\d+(&|$)", url) and "cliSessionNonce=" in url, url

        page.goto(url)
        if not signed_in:  # the sign-in page first, which comes back to the CLI's page
            assert page.url.startswith(console + "/login?next=%2Fcli-login%3F"), page.url
            sign_in(page, person_token)
            page.wait_for_url(console + "/cli-login?**")
        text = page.inner_text("main")
        assert f"Log in the pulumi CLI on this computer as {PERSON}?" in text, text
        assert "Generated by pulumi login on" in text, text
        page.click("#cli-login")
        page.wait_for_url(console + "/welcome/cli", timeout=60000)
        assert "The pulumi CLI is logged in" in page.inner_text("main")
        code = term.wait(120)
        assert code == 0, term.output
    finally:
        if term.proc.poll() is None:
            term.wait(0)
    assert "Waiting for login to complete" in term.output, term.output
    assert f"as {PERSON}" in term.output, term.output

    # The token is on the person's Tokens page, with the CLI's description.
    page.goto(console + "/tokens")
    tokens = page.inner_text("main")
    assert re.search(r"Generated by pulumi login on \S+ at ", tokens), tokens
    assert not errors, errors  # a CSP refusal of the redirect would show here
    context.close()
    return term.output


def works_as_the_person(e2e, srv, env, backend_url):
    """whoami, a stack with config and an `up` with the stored login only."""
    e2e.env = env
    whoami = e2e.run("whoami", "-v").stdout
    assert f"User: {PERSON}\n" in whoami, whoami
    assert f"Backend URL: {backend_url}\n" in whoami, whoami
    assert "Token type: personal" in whoami, whoami
    dev = e2e.stack("dev")
    e2e.run("config", "set", "greeting", "hello", "--stack", "dev")
    changes = e2e.up(dev, {"outputs": {"k": "v"}})
    assert changes.get("create") == 1, changes
    assert e2e.run("stack", "output", "k", "--stack", "dev").stdout.strip() == "v"
    events = [e for e in audit_events(srv) if e["event"] == "cli_login"]
    assert [(e["actor"], e["target"]) for e in events] == [(PERSON, f"personal:{PERSON}")]
    # The token the CLI keeps never reaches the server's log.
    credentials = json.loads((Path(env["PULUMI_HOME"]) / "credentials.json").read_text())
    tokens = list(credentials["accessTokens"].values())
    assert len(tokens) == 1 and tokens[0].startswith("pul-"), credentials["accessTokens"].keys()
    log = srv.log.read_text(errors="replace")
    assert tokens[0] not in log and "accessToken" not in log


@pytest.mark.timeout_seconds(420)
def test_cli_login_in_a_browser_with_pulumi_console_domain(e2e, make_server, chromium):
    srv = make_server("--auth-token", TOKEN)
    use_project(e2e, "clilogin")
    person_token = person_on(srv, "clilogin")
    console = f"http://localhost:{srv.port}"  # the API at 127.0.0.1, the console's name apart
    env = {**e2e.env, "PULUMI_CONSOLE_DOMAIN": f"localhost:{srv.port}",
           "PULUMI_BACKEND_URL": srv.url}
    env.pop("PULUMI_ACCESS_TOKEN")
    browser_login(e2e, chromium(), console, srv.url, person_token, env)
    works_as_the_person(e2e, srv, env, console)


@pytest.mark.timeout_seconds(420)
def test_cli_login_in_a_browser_finds_the_app_host_of_the_api_host(e2e, make_server, chromium):
    srv = make_server("--auth-token", TOKEN, "--console-host", "app.example.test",
                      "--allowed-host", "api.example.test")
    use_project(e2e, "clilogin")
    person_token = person_on(srv, "clilogin")
    proxy = HostProxy({"api.example.test": srv.port})
    try:
        api = f"http://api.example.test:{srv.port}"
        console = f"http://app.example.test:{srv.port}"
        env = {**proxied(e2e.env, proxy), "PULUMI_BACKEND_URL": api}
        env.pop("PULUMI_ACCESS_TOKEN")
        env.pop("PULUMI_CONSOLE_DOMAIN", None)
        browser = chromium("--host-resolver-rules=MAP app.example.test 127.0.0.1, "
                           "MAP api.example.test 127.0.0.1")
        out = browser_login(e2e, browser, console, api, person_token, env, signed_in=False)
        assert "api.example.test" in out
        assert proxy.seen["api.example.test"] > 0  # the CLI reached the API through it
        works_as_the_person(e2e, srv, env, console)
        # The API's name sends a browser to the console's; the console's has no API.
        page = browser.new_page()
        page.goto(api + "/login")
        assert page.url == console + "/login"
        assert page.goto(console + "/api/capabilities").status == 404
        assert page.goto(api + "/api/capabilities").status == 200
    finally:
        proxy.stop()


@pytest.mark.timeout_seconds(420)
def test_stack_migrate_tells_two_servers_apart_by_their_api_host_names(e2e, make_server):
    one = make_server("--auth-token", TOKEN, "--console-host", "app.one.test",
                      "--allowed-host", "api.one.test")
    two = make_server("--auth-token", TOKEN, "--console-host", "app.two.test",
                      "--allowed-host", "api.two.test")
    use_project(e2e, "migrated")
    # By their IP addresses, the CLI finds no console for either and takes them for one.
    e2e.env["PULUMI_BACKEND_URL"] = two.url
    e2e.fails("stack", "migrate", one.url, "dev",
              match=r"source and target backends are the same")
    proxy = HostProxy({"api.one.test": one.port, "api.two.test": two.port})
    try:
        api_one = f"http://api.one.test:{one.port}"
        e2e.env = {**proxied(e2e.env, proxy), "PULUMI_BACKEND_URL": api_one}
        e2e.up(e2e.stack("dev"), {"outputs": {"k": "v"}})
        e2e.env["PULUMI_BACKEND_URL"] = f"http://api.two.test:{two.port}"
        out = e2e.run("stack", "migrate", api_one, "dev", "--yes").stdout
        assert f"from {api_one} to http://api.two.test:{two.port}" in out, out
        assert e2e.run("stack", "output", "k", "--stack", "dev").stdout.strip() == "v"
        assert proxy.seen["api.one.test"] > 0 and proxy.seen["api.two.test"] > 0
    finally:
        proxy.stop()
    migrated = two.get("/api/stacks/organization/migrated/dev/export")["deployment"]
    assert any(r["type"] == "pulumi:pulumi:Stack" for r in migrated["resources"])
    assert one.get("/api/stacks/organization/migrated/dev/export")["deployment"]["resources"]

"""`pulumi login` in a browser, with the real CLI and Debian's Chromium (issue 24).

The CLI offers the browser only in a terminal, so `pulumi login URL` runs on a
pseudo-terminal and the test presses Enter at its prompt. The CLI opens the
console's /cli-login through xdg-open, which runs $BROWSER: a small script that
writes the URL to a file. The test then plays the browser: Playwright, signed in
to the console with the person's token, opens that URL, confirms, and follows the
redirect to the CLI's localhost port, which sends it on to /welcome/cli. The CLI
must end logged in as that person, with a token described as the CLI described it,
and work (a stack, a config value and an `up`).

Two ways for the CLI to find the console:
- ``PULUMI_CONSOLE_DOMAIN`` (one server name for everything);
- the ``api.``/``app.`` host names of one server (``--console-host``): the CLI
  derives ``app.example.test`` from ``api.example.test`` itself. Nothing on the
  machine is changed to reach those names: the CLI goes through HTTP_PROXY (a local
  proxy that pipes every connection to the server, Host kept, the absolute-form
  target the server reads), the browser through --host-resolver-rules.
"""

import json
import os
import pty
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TOKEN, unavailable, wait_for
from tcp_proxy import RoundRobinProxy
from test_access import admin, audit_events, use_project
from test_console import CHROMIUM, CHROMIUM_ARGS

PERSON = "alice"


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


def browser_login(e2e, browser, console, api_url, person_token, env):
    """Sign in to ``console`` in the browser, run `pulumi login api_url` on a terminal,
    confirm in the browser; return the CLI's output."""
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(console + "/login")
    page.fill("#token", person_token)
    page.click("button[type=submit]")
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
        wait_for(lambda: "log in with your browser" in term.output or term.proc.poll() is not None,
                 "the CLI's login prompt", timeout=60)
        assert term.proc.poll() is None, term.output
        term.type(b"\r")  # Enter: log in with the browser
        wait_for(lambda: opened.exists() or term.proc.poll() is not None,
                 "the CLI to open the browser", timeout=60)
        assert opened.exists(), term.output
        url = opened.read_text()
        assert url.startswith(console + "/cli-login?"), url
        assert re.search(r"cliSessionPort=\d+(&|$)", url) and "cliSessionNonce=" in url, url

        page.goto(url)  # already signed in: the confirmation
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
    # Every connection to the proxy goes to the server: a forward proxy for http URLs,
    # since the server takes absolute-form targets (Host kept).
    proxy = RoundRobinProxy([("127.0.0.1", srv.port)])
    proxy.start()
    try:
        api = f"http://api.example.test:{srv.port}"
        console = f"http://app.example.test:{srv.port}"
        env = {**e2e.env, "HTTP_PROXY": proxy.url, "http_proxy": proxy.url,
               "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
               "PULUMI_BACKEND_URL": api}
        env.pop("PULUMI_ACCESS_TOKEN")
        env.pop("PULUMI_CONSOLE_DOMAIN", None)
        browser = chromium("--host-resolver-rules=MAP app.example.test 127.0.0.1, "
                           "MAP api.example.test 127.0.0.1")
        out = browser_login(e2e, browser, console, api, person_token, env)
        assert "api.example.test" in out
        assert proxy.connections[0] > 0  # the CLI reached api.example.test through it
        works_as_the_person(e2e, srv, env, console)
        # The API's name sends a browser to the console's; the console's has no API.
        page = browser.new_page()
        page.goto(api + "/login")
        assert page.url == console + "/login"
        assert page.goto(console + "/api/capabilities").status == 404
        assert page.goto(api + "/api/capabilities").status == 200
    finally:
        proxy.stop()
